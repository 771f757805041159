"""The public door: ``accelerate``, ``calibrate`` and ``accelerate_from_specs``.

    handle = hasten.accelerate(pipe, hasten.BlockCache(plan="plan.json"))   # or a diffusers pipeline,
    out = pipe([3, 5, 7])                                                  # or a bare transformer
    print(handle.report()["nfe"])
    handle.disable()                                    # bitwise back to the original model

    with hasten.accelerate(pipe, hasten.BlockCache(delta=0.5, plan=plan)) as h: ...

``target`` is a :class:`hasten.HastenPipeline`, a diffusers pipeline (its ``.transformer`` is
accelerated and each ``pipe(...)`` is one run) or a bare diffusers transformer. Methods are config
objects; ``accelerate`` installs call-level methods (guidance) before block-level ones (caching), so
guidance is the outermost wrapper. The handle contract (call index, ``active_rows``, runs, NFE) is
written in :mod:`hasten.hooks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import HastenError
from .hooks import Handle


def resolve_target(target: Any) -> tuple[str, nn.Module, Any]:
    """(kind, transformer, pipeline) for a hasten pipeline, a diffusers pipeline or a bare model."""
    from .pipeline import HastenPipeline

    if isinstance(target, HastenPipeline):
        return "hasten", target.transformer, target
    if isinstance(target, Handle):
        raise HastenError("pass the pipeline or model to accelerate, not a handle")
    tr = getattr(target, "transformer", None)
    if isinstance(tr, nn.Module) and not isinstance(target, nn.Module):
        return "diffusers", tr, target
    if isinstance(target, nn.Module):
        return "transformer", target, None
    raise HastenError(f"cannot accelerate a {type(target).__name__}: pass a hasten pipeline, a diffusers "
                      "pipeline or a diffusers transformer model")


def accelerate(target: Any, *methods: Any, blocks: Sequence | None = None) -> Handle:
    """Install ``methods`` on ``target``; returns the handle (a context manager; ``disable()`` undoes).

    ``blocks`` lists the transformer blocks for models hasten does not know (modules, dotted names
    or :class:`hasten.adapters.BlockSpec`); see :mod:`hasten.adapters.diffusers`.
    """
    from .methods import LEVELS, info_for

    kind, transformer, pipeline = resolve_target(target)
    infos = [(info_for(m), m) for m in methods]
    names = [type(m).__name__ for m in methods]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise HastenError(f"method {sorted(dup)[0]} given twice")
    infos.sort(key=lambda im: LEVELS.get(im[0].level, 1))
    handle = Handle(target, transformer, pipeline, kind, blocks)
    handle._install_core()
    try:
        for info, cfg in infos:
            info.install(handle, cfg)
            handle.methods.append(cfg)
    except BaseException:
        handle.disable()
        raise
    return handle


@dataclass
class CalibrationRun:
    """How to run full-compute samples for calibration: one ``run(seed)`` per seed.

    hasten pipeline: one batch with every label per seed. diffusers pipeline: ``pipe(prompt=prompts,
    num_inference_steps=steps, generator=..., output_type="latent")`` per seed.
    """

    target: Any
    kind: str
    transformer: nn.Module
    conditions: list
    seeds: list[int]
    steps: int
    solver: str = "euler"
    schedule: str | None = "linear"
    guidance_scale: float | None = None
    pipeline_kwargs: dict = field(default_factory=dict)
    runner: Callable[[int], Any] | None = None

    def run(self, seed: int) -> Any:
        if self.runner is not None:
            return self.runner(int(seed))
        gen = torch.Generator().manual_seed(int(seed))
        if self.kind == "hasten":
            return self.target(self.conditions, num_inference_steps=self.steps,
                               guidance_scale=self.guidance_scale, generator=gen, schedule=self.schedule,
                               solver=self.solver)
        kwargs = dict(self.pipeline_kwargs)
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        return self.target(prompt=list(self.conditions), num_inference_steps=self.steps, generator=gen,
                           output_type="latent", **kwargs)

    def images(self, seed: int) -> torch.Tensor:
        """One run's output as images in [0, 1] (what PSNR targets are measured on): hasten's pipeline
        returns them; a diffusers pipeline is asked for ``output_type="pt"``; a runner's return value is
        taken as it is."""
        if self.runner is not None:
            return torch.as_tensor(self.runner(int(seed)))
        if self.kind == "hasten":
            return self.run(seed).images
        gen = torch.Generator().manual_seed(int(seed))
        kwargs = dict(self.pipeline_kwargs)
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        return self.target(prompt=list(self.conditions), num_inference_steps=self.steps, generator=gen,
                           output_type="pt", **kwargs).images

    def run_all(self) -> None:
        for s in self.seeds:
            self.run(s)

    def plan_fields(self) -> dict:
        gs = self.guidance_scale
        if gs is None:
            gs = getattr(self.target, "default_guidance_scale", None)
        from .plans import scheduler_fingerprint

        scheduler = None if self.kind == "hasten" else scheduler_fingerprint(getattr(self.target, "scheduler", None))
        return {"solver": self.solver, "scheduler": scheduler,
                "steps": self.steps, "time_schedule": self.schedule, "guidance_scale": gs,
                "conditions": [c if isinstance(c, (int, str)) else str(c) for c in self.conditions],
                "seeds": list(self.seeds)}


MIN_CONDITIONS, MIN_SEEDS = 8, 2


def calibrate(target: Any, method: Any, labels: Sequence | None = None, seeds: Sequence[int] = (0, 1),
              steps: int = 50, solver: str = "euler", schedule: str | None = "linear",
              guidance_scale: float | None = None, prompts: Sequence[str] | None = None,
              runner: Callable[[int], Any] | None = None, **pipeline_kwargs: Any) -> dict:
    """Calibrate ``method`` on ``target`` from full-compute runs; returns the plan (a dict).

    ``labels`` (hasten pipeline, default: every class) or ``prompts`` (diffusers pipeline) are the
    conditions; at least 8 conditions (or all classes when the model has fewer) and 2 seeds.
    ``runner(seed)`` replaces the pipeline call (needed for a bare transformer: it runs one sampling
    loop over the conditions for that seed, calling the model once per denoiser call); ``steps``,
    ``solver`` and ``schedule`` are then only recorded in the plan. Save the plan with
    :func:`hasten.plans.save_plan`.
    """
    from .methods import info_for

    kind, transformer, _ = resolve_target(target)
    info = info_for(method)
    if info.calibrate is None:
        raise HastenError(f"{type(method).__name__} needs no calibration")
    if kind == "transformer" and runner is None:
        raise HastenError("calibrating a bare transformer needs runner=fn (fn(seed) runs one sampling loop); "
                          "or pass a hasten or diffusers pipeline")
    if runner is not None:
        conds, need = list(labels or prompts or []), 0
    elif kind == "hasten":
        conds = list(range(target.num_classes)) if labels is None else [int(x) for x in labels]
        target.check_labels(conds)
        need = min(MIN_CONDITIONS, target.num_classes)
    else:
        if prompts is None and hasattr(target, "calibration_prompts"):
            prompts = target.calibration_prompts()  # an embedded text-to-image model knows its domain
        if prompts is None:
            raise HastenError("calibrating a diffusers pipeline needs prompts=[...] (at least 8)")
        conds, need = list(prompts), MIN_CONDITIONS
    _check_counts(conds, need, seeds, steps)
    seeds = [int(s) for s in seeds]
    run = CalibrationRun(target, kind, transformer, conds, seeds, int(steps), solver, schedule,
                         guidance_scale, pipeline_kwargs, runner)
    return info.calibrate(run, method)


def _check_counts(conds: Sequence, need: int, seeds: Sequence[int], steps: int) -> None:
    if len(set(conds)) < need:
        raise HastenError(f"calibration needs at least {need} different conditions, got {len(set(conds))}")
    if len({int(s) for s in seeds}) < MIN_SEEDS:
        raise HastenError(f"calibration needs at least {MIN_SEEDS} different seeds, got {len(set(seeds))}")
    if int(steps) < 1:
        raise HastenError(f"steps must be >= 1, got {steps}")


def _check_conditions(pipe: Any, labels: Sequence[int], seeds: Sequence[int], steps: int) -> None:
    pipe.check_labels(list(labels))
    _check_counts(list(labels), min(MIN_CONDITIONS, pipe.num_classes), seeds, steps)


@dataclass
class SpecContext:
    """What ``--accel`` spec parsers may use: the pipeline and the run settings."""

    pipe: Any
    steps: int
    solver: str
    schedule: str | None
    guidance_scale: float | None


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"block-cache:delta=0.5,plan=p.json"`` -> ``("block-cache", {"delta": "0.5", "plan": "p.json"})``."""
    name, _, rest = spec.strip().partition(":")
    opts: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise HastenError(f"cannot read --accel {spec!r}: options are key=value, "
                              "e.g. block-cache:delta=0.5")
        opts[key.strip()] = value.strip()
    if not name:
        raise HastenError(f"cannot read --accel {spec!r}: expected NAME[:key=value,...]")
    return name, opts


def configs_from_specs(pipe: Any, specs: Sequence[str], steps: int, solver: str = "euler",
                       schedule: str | None = "linear", guidance_scale: float | None = None) -> list:
    """The method config of each ``--accel`` spec (calibrating once where a spec asks for it)."""
    from .methods import by_name

    ctx = SpecContext(pipe, int(steps), solver, schedule, guidance_scale)
    configs = []
    for spec in specs:
        name, opts = parse_spec(spec)
        info = by_name(name)
        if info.from_spec is None:
            raise HastenError(f"method {name!r} cannot be given as --accel")
        configs.append(info.from_spec(opts, ctx))
    return configs


def accelerate_from_specs(pipe: Any, specs: Sequence[str], steps: int, solver: str = "euler",
                          schedule: str | None = "linear", guidance_scale: float | None = None) -> Handle:
    """``hasten generate --accel ...``: build each method from its spec, then :func:`accelerate`."""
    return accelerate(pipe, *configs_from_specs(pipe, specs, steps, solver, schedule, guidance_scale))


def calibrate_cli(model: str, method: str, out: Any, options: dict, plot: Any = None, steps: int = 50,
                  solver: str = "euler", schedule: str = "linear", guidance_scale: float | None = None,
                  labels: Sequence[int] | None = None, seeds: Sequence[int] = (1000, 1001)) -> dict:
    """``hasten calibrate``: calibrate ``method`` (by name) on ``model``, write the plan (and plot).

    ``options`` holds the method's CLI options (``delta``, ``scale_shift``, ``train_steps``, ...);
    each method reads the ones it knows. Returns a summary dict for printing.
    """
    from pathlib import Path

    from .io import check_writable
    from .methods import by_name
    from .pipeline import load_pipeline
    from .plans import save_plan

    info = by_name(method)
    if info.calibrate is None:
        raise HastenError(f"method {method!r} needs no calibration")
    out = check_writable(Path(out))
    if plot is not None:
        plot = check_writable(Path(plot))
        if info.plot is None:
            raise HastenError(f"method {method!r} has no plot")
    pipe = load_pipeline(model)
    if labels is None and hasattr(pipe, "num_classes"):
        labels = list(range(pipe.num_classes))
    run_args = dict(labels=labels, seeds=seeds, steps=steps, solver=solver, schedule=schedule,
                    guidance_scale=guidance_scale)
    if info.cli_calibrate is not None:
        kind, transformer, _ = resolve_target(pipe)
        _check_conditions(pipe, labels, seeds, steps)
        run = CalibrationRun(pipe, kind, transformer, list(labels), [int(s) for s in seeds], int(steps), solver,
                             schedule, guidance_scale)
        plan = info.cli_calibrate(run, options, out)
    else:
        if info.from_options is None:
            raise HastenError(f"method {method!r} cannot be calibrated from the command line")
        plan = calibrate(pipe, info.from_options(options), **run_args)
    save_plan(out, plan)
    summary = {"out": str(out), "method": method, "model": model, "steps": steps, "solver": solver,
               "calls": plan.get("calls")}
    for key in ("delta", "ideal_speedup", "scale_shift_file", "scale_shift_train", "threshold", "guidance_scale",
                "calibration", "held_out"):
        if key in plan:
            summary[key] = plan[key]
    if plot is not None:
        info.plot(plan, plot)
        summary["plot"] = str(plot)
    return summary
