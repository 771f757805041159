"""Calibration plans: JSON files naming the model, solver and step count they are valid for.

Generic for every calibrated method (Block Caching, LinearAG, ...). A plan is a dict::

    {"hasten_plan": 1, "method": "block-cache",
     "model": {"class": "DiTTransformer2DModel", "config_hash": "<sha256 of the config>"},
     "solver": "euler", "steps": 50, "time_schedule": "linear", "guidance_scale": 3.0,
     "calls": 50, "timesteps": [0.0, 20.0, ...],      # as sent to the transformer, per call
     ...method fields...}

Validation (:func:`check_plan`) rejects another model (config hash), other weights (weights hash), another
scheduler (class and config hash, for diffusers pipelines), another method, solver, step count or time
schedule; :func:`check_guidance` rejects a run at another guidance scale (checked at every run, since the
scale is a call argument). Plans written before a field was recorded skip that check.
While running, :func:`check_call_timestep` compares each call's timestep
with the plan's, so a plan applied through the Python API to a run with another step count fails at
the first call whose timestep differs (call 1 at the latest), not silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import HastenError
from .io import write_json

PLAN_VERSION = 1
REQUIRED = ("method", "model", "solver", "steps", "calls", "timesteps")


def config_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the model class and its config (diffusers ``model.config``)."""
    cfg = getattr(model, "config", None)
    items = dict(cfg) if cfg is not None else {}
    items = {k: v for k, v in items.items() if not k.startswith("_")}
    text = json.dumps({"class": type(model).__name__, "config": items}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_hash(model: nn.Module) -> str | None:
    """sha256 (first 16 hex digits) of the model's parameters and buffers as float32, in state-dict order:
    a plan calibrated on some weights is refused for others with the same config (a retrained model).
    None when the weights cannot be read here (offloaded to the meta device by accelerate's hooks)."""
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):
        return None
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def scheduler_fingerprint(scheduler: Any) -> dict | None:
    """``{"class", "config_hash"}`` of a diffusers scheduler (``None`` for anything without a config)."""
    cfg = getattr(scheduler, "config", None)
    if scheduler is None or cfg is None:
        return None
    items = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    text = json.dumps({"class": type(scheduler).__name__, "config": items}, sort_keys=True, default=str)
    return {"class": type(scheduler).__name__, "config_hash": hashlib.sha256(text.encode()).hexdigest()[:16]}


def check_scheduler(plan: dict, scheduler: Any) -> None:
    """Raise when ``scheduler`` (a pipeline's) is not the one the plan was calibrated with."""
    want = plan.get("scheduler")
    have = scheduler_fingerprint(scheduler)
    if want is None or have is None or have == want:
        return
    same = have["class"] == want["class"]
    raise HastenError(f"this {plan['method']} plan was calibrated with {want['class']}"
                      f"{' of another configuration' if same else ''}, not this pipeline's {have['class']}: "
                      "calibrate again with this scheduler")


def new_plan(method: str, model: nn.Module, *, solver: str, steps: int, time_schedule: str | None,
             guidance_scale: float | None, timesteps: list[float], **fields: Any) -> dict:
    """A plan dict for ``method`` on ``model`` (``timesteps``: one per denoiser call of a run)."""
    if any(t is None for t in timesteps):
        raise HastenError("the model's timestep could not be read at every call (hasten reads an argument named "
                          "timestep): a plan needs one per call")
    plan = {"hasten_plan": PLAN_VERSION, "method": method,
            "model": {"class": type(model).__name__, "config_hash": config_hash(model),
                      "weights_hash": weights_hash(model)},
            "solver": solver, "steps": int(steps), "time_schedule": time_schedule,
            "guidance_scale": guidance_scale, "calls": len(timesteps),
            "timesteps": [float(t) for t in timesteps]}
    plan.update(fields)
    return plan


def save_plan(path: str | os.PathLike, plan: dict) -> Path:
    """Write ``plan`` atomically (keys starting with ``_`` are runtime notes and are not saved)."""
    return write_json(path, {k: v for k, v in plan.items() if not k.startswith("_")})


def _read_plan(path: str | os.PathLike | dict) -> tuple[Any, str]:
    """(the parsed JSON, how to name it in errors); a dict passes through."""
    if isinstance(path, dict):
        return path, "plan"
    p = Path(path)
    if not p.is_file():
        raise HastenError(f"plan {p} not found")
    try:
        return json.loads(p.read_text()), str(p)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HastenError(f"plan {p} is not valid JSON ({first})") from None


def load_plan(path: str | os.PathLike | dict, method: str, required: Sequence[str] = ()) -> dict:
    """Read and sanity-check a plan file for ``method`` (a dict passes through the same checks), with the
    method's own ``required`` keys beside the common ones."""
    plan, where = _read_plan(path)
    if not isinstance(plan, dict) or plan.get("hasten_plan") != PLAN_VERSION:
        raise HastenError(f"{where} is not a hasten plan (version {PLAN_VERSION})")
    missing = [k for k in REQUIRED if k not in plan]
    if missing:
        raise HastenError(f"{where} is incomplete: missing {', '.join(missing)}")
    if plan["method"] != method:
        raise HastenError(f"{where} is a {plan['method']!r} plan, not a {method!r} plan")
    if not isinstance(plan["model"], dict):
        raise HastenError(f"{where} is corrupt: its model entry is not a record of the model")
    missing = [k for k in required if k not in plan]
    if missing:
        raise HastenError(f"{where} is incomplete: missing {', '.join(missing)}")
    if not isinstance(plan["timesteps"], list) or len(plan["timesteps"]) != plan["calls"]:
        raise HastenError(f"{where} is corrupt: {plan['calls']} calls but {len(plan['timesteps'])} timesteps")
    if not isinstance(path, dict):
        plan["_path"] = str(path)  # files named in the plan (safetensors) are read beside it
    return plan


def check_plan(plan: dict, model: nn.Module, steps: int | None = None, solver: str | None = None,
               schedule: str | None = None, scheduler: Any = None) -> None:
    """Raise ``HastenError`` unless ``plan`` was calibrated for this model (and steps/solver/schedule and
    the pipeline's ``scheduler`` object, when given)."""
    want = config_hash(model)
    have = plan["model"].get("config_hash") if isinstance(plan.get("model"), dict) else None
    if have != want:
        raise HastenError(f"this plan was calibrated for another model ({plan['model'].get('class')} "
                          f"config {have}), not this {type(model).__name__} (config {want})")
    have_w = plan["model"].get("weights_hash")
    if have_w is not None and have_w != (weights_hash(model) or have_w):  # unreadable (offloaded): not checked
        raise HastenError(f"this plan was calibrated for other weights of this {type(model).__name__} "
                          f"(weights {have_w}): calibrate again for these weights")
    if plan.get("solver") == "first-run":  # recorded from a run's own calls: the per-call timesteps decide
        steps = solver = None
    if steps is not None and int(steps) != plan["steps"]:
        raise HastenError(f"this plan was calibrated for {plan['steps']} steps, not {steps}: "
                          f"calibrate again with --steps {steps}")
    if solver is not None and solver != plan["solver"]:
        raise HastenError(f"this plan was calibrated for the {plan['solver']} solver, not {solver}")
    have_sched = plan.get("time_schedule")
    if schedule is not None and have_sched is not None and schedule != have_sched:
        raise HastenError(f"this plan was calibrated for the {have_sched} time schedule, not {schedule}")
    check_scheduler(plan, scheduler)


def check_call_timestep(plan: dict, call_index: int, t: float | None) -> None:
    """Raise when call ``call_index`` of a run does not match the plan (other steps/solver/schedule)."""
    n = plan["calls"]
    if call_index >= n:
        raise HastenError(f"this run makes more denoiser calls than the plan's {n} "
                          f"({plan['steps']} {plan['solver']} steps): calibrate for this step count")
    if t is None:
        return
    want = plan["timesteps"][call_index]
    if not math.isclose(t, want, rel_tol=1e-4, abs_tol=1e-3):
        raise HastenError(f"call {call_index} of this run has timestep {t:g} but the plan expects {want:g}: "
                          f"the plan was made for {plan['steps']} {plan['solver']} steps "
                          f"({plan.get('time_schedule')} schedule); calibrate for this run's settings")


def check_run(plan: dict, handle: Any) -> None:
    """The checks a plan needs at the start of every run: the run's guidance scale, and the pipeline's
    scheduler (it may have been swapped since ``accelerate``)."""
    check_guidance(plan, handle.guidance_scale)
    check_scheduler(plan, getattr(handle.pipeline, "scheduler", None))


def same_guidance(a: float, b: float) -> bool:
    """Whether two guidance scales are the same one (up to float round-off of JSON and CLI parsing)."""
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)


def check_guidance(plan: dict, guidance_scale: float | None) -> None:
    """Raise when a run's guidance scale (``None``: unknown, not checked) differs from the plan's."""
    want = plan.get("guidance_scale")
    if guidance_scale is None or want is None:
        return
    if not same_guidance(guidance_scale, want):
        raise HastenError(f"this {plan['method']} plan was calibrated at guidance scale {want:g}, not "
                          f"{guidance_scale:g}: calibrate again with --cfg {guidance_scale:g}")


def model_folder(pipeline: Any) -> Path | None:
    """Where a pipeline was loaded from (``hasten.load_pipeline`` or diffusers ``from_pretrained``)."""
    folder = getattr(pipeline, "model_dir", None)
    if folder is None:
        folder = getattr(getattr(pipeline, "config", None), "_name_or_path", None)
    return Path(folder) if folder and Path(folder).is_dir() else None


def shipped_plans(pipeline: Any, method: str, model: nn.Module) -> list[dict]:
    """The valid ``method`` plans for ``model`` in ``<model folder>/plans/*.json`` (calibrated by
    ``hasten calibrate`` and shipped with the model); unreadable or foreign files are skipped."""
    folder = model_folder(pipeline)
    if folder is None or not (folder / "plans").is_dir():
        return []
    found = []
    for path in sorted((folder / "plans").glob("*.json")):
        try:
            plan = load_plan(path, method)
            check_plan(plan, model, scheduler=getattr(pipeline, "scheduler", None))
        except HastenError:
            continue
        found.append(plan)
    return found


TUNED_SCHEMA = "hasten-tune/1"


def load_tuned_plan(path: str | os.PathLike | dict) -> dict:
    """Read a ``hasten tune`` plan file (solver, steps, methods with their calibrated plans inline)."""
    plan, where = _read_plan(path)
    if not isinstance(plan, dict) or plan.get("schema") != TUNED_SCHEMA:
        raise HastenError(f"{where} is not a hasten tune plan ({TUNED_SCHEMA}); method plans go to the "
                          "method, e.g. hasten.BlockCache(plan=...)")
    missing = [k for k in ("scheduler", "steps", "methods") if k not in plan]
    if missing:
        raise HastenError(f"{where} is incomplete: missing {', '.join(missing)}")
    return plan
