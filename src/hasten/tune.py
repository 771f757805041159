"""``hasten tune``: the fastest composed plan (solver, steps, Adaptive Guidance, Block Caching) that meets
a quality budget, confirmed on prompts and seeds it never tuned on.

    hasten tune --model shapes --min-psnr 35 --out plan.json
    hasten generate --model shapes --plan plan.json --prompt "a red circle above a blue square"
    hasten.accelerate(pipe, plan="plan.json")

The budget: mean PSNR against a converged solve (the bench's quality reference: UniPC at 100 steps)
of at least ``min_psnr``; where the model has an evaluator (``shapes`` on its own captions), also
adherence at most ``max_adherence_drop`` below and FD-shapes at most ``max_fd_increase`` above that
reference's. Speed is end-to-end time per image against the speed reference users recognise, 50-step
Euler CFG with the pipeline's own scheduler.

The search, in order (each candidate is one run on the tuning set, timed, then scored):

1. fewer steps: per stock solver (Euler, UniPC bh2, DPM-Solver++ 2M), step counts upwards from 4 until
   the first that meets the budget (quality rises with steps, so the rest of that solver's steps would
   only be slower);
2. methods on top: at that step count and the next finer one, Adaptive Guidance (thresholds 0.999,
   0.99), Block Caching (delta 0.1, 0.2; plans calibrated for that solver and step count on the tuning
   prompts, seeds 1000 and 1001) and both together; on a FlexiDiT fine-tune (``--model shapes-flexi``,
   ``hasten flexify``) also FlexiDiT at compute shares 0.8 and 0.6, alone, with AG and with AG and
   Block Caching;
3. the passing candidates by measured speed-up: the fastest is confirmed on held-out prompts and seeds,
   interleaved with the speed reference (paired speed-up, median); if it misses the budget there, the
   next one is tried (three at most). A Block Caching candidate whose schedule skips no block (every
   change exceeds its delta) is never picked: it is its solver and steps plus hooks, and its measured
   edge over them is noise.

``budget_minutes`` bounds steps 1 and 2 (the search stops measuring when it is spent and keeps what it
has); the confirmation is not bounded. Every measured candidate is written (atomically) to a state file
beside ``out``: re-running the same command resumes where it stopped. Scale-shift training for Block
Caching is not searched (its parameters live in a separate file; a plan file here is self-contained).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import HastenError
from .eval.bench_shapes import copy_shapes, stock_scheduler
from .io import atomic_write

SCHEMA = "hasten-tune/1"
SOLVERS = ("euler", "unipc-bh2", "dpm++2m")
STEP_GRID = (4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)
AG_THRESHOLDS = (0.999, 0.99)
BC_DELTAS = (0.1, 0.2)
FLEXI_COMPUTE = (0.8, 0.6)  # FlexiDiT compute shares, searched on flexified models
CALIBRATION_SEEDS = (1000, 1001)
MAX_CONFIRM = 3


@dataclass(frozen=True)
class QualityBudget:
    min_psnr: float
    max_fd_increase: float = 0.05
    max_adherence_drop: float = 0.01


@dataclass(frozen=True)
class Candidate:
    solver: str
    steps: int
    ag: float | None = None  # AdaptiveGuidance threshold
    bc: float | None = None  # Block Caching delta
    flexi: float | None = None  # FlexiDiT compute share

    @property
    def name(self) -> str:
        parts = [f"{self.solver} @{self.steps}"]
        if self.ag is not None:
            parts.append(f"ag:threshold={self.ag}")
        if self.bc is not None:
            parts.append(f"block-cache:delta={self.bc}")
        if self.flexi is not None:
            parts.append(f"flexidit:compute={self.flexi}")
        return " + ".join(parts)

    @classmethod
    def of(cls, rec: dict) -> Candidate:
        return cls(rec["solver"], rec["steps"], rec["ag"], rec["bc"], rec.get("flexi"))


# --------------------------------------------------------------------------- the sets of prompts
@dataclass
class PromptSet:
    """Prompts, the per-batch noise seeds, and (for ``shapes`` captions) the scenes the evaluator checks."""

    prompts: list[str]
    seed: int
    scenes: list | None = None
    batch_size: int = 16

    def batches(self) -> list[tuple[list[str], int]]:
        b = self.batch_size
        return [(self.prompts[i:i + b], self.seed + k) for k, i in enumerate(range(0, len(self.prompts), b))]


def shapes_sets(n_tune: int, n_confirm: int) -> tuple[PromptSet, PromptSet]:
    """Tuning and confirmation captions from the shapes grammar: held-out ranges disjoint from each other,
    from the bench's evaluation captions and from training."""
    from .data.shapes import HELD_OUT_SEED0, sample_scene

    if max(n_tune, n_confirm) > 50_000:
        raise HastenError("at most 50,000 tuning and confirmation captions each")
    # 50.7M and 50.75M: apart from the FD-shapes reference (50.5M) and the real-vs-real set (50.6M)
    tune = [sample_scene(HELD_OUT_SEED0 + 700_000 + i) for i in range(n_tune)]
    conf = [sample_scene(HELD_OUT_SEED0 + 750_000 + i) for i in range(n_confirm)]
    return (PromptSet([s.caption for s in tune], 7000, tune), PromptSet([s.caption for s in conf], 8000, conf))


def file_sets(prompts: Sequence[str], n_tune: int | None = None) -> tuple[PromptSet, PromptSet]:
    """User prompts: the first half tunes, the second half confirms (at least 2 prompts)."""
    prompts = [p for p in prompts if p.strip()]
    if len(prompts) < 2:
        raise HastenError("hasten tune needs at least 2 prompts (half tune, half confirm)")
    k = n_tune or len(prompts) // 2
    return PromptSet(prompts[:k], 7000), PromptSet(prompts[k:], 8000)


# --------------------------------------------------------------------------- running one configuration
def run_images(pipe: Any, data: PromptSet, steps: int) -> tuple[torch.Tensor, float]:
    """(images in [0, 1], seconds) of ``pipe`` over ``data`` at ``steps``."""
    out, t0 = [], time.perf_counter()
    for prompts, seed in data.batches():
        out.append(pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                        output_type="pt").images.float())
    return torch.cat(out), time.perf_counter() - t0


def methods_for(cand: Candidate, plans: dict[str, dict]) -> list:
    from .methods.block_cache import BlockCache
    from .methods.flexidit import FlexiDiT
    from .methods.guidance import AdaptiveGuidance

    out: list = []
    if cand.ag is not None:
        out.append(AdaptiveGuidance(threshold=cand.ag))
    if cand.bc is not None:
        out.append(BlockCache(delta=cand.bc, plan=plans["block-cache"]))
    if cand.flexi is not None:
        out.append(FlexiDiT(compute=cand.flexi))
    return out


def quality(data: PromptSet, images: torch.Tensor, ref: torch.Tensor) -> dict:
    from .eval.metrics import psnr

    q = {"psnr": round(psnr(images, ref), 3)}
    if data.scenes is not None:
        from .eval.shapes_eval import score_images

        s = score_images(data.scenes, images)
        q.update(adherence=s["adherence"], fd_shapes=round(s["fd_shapes"], 4))
    return q


def meets(q: dict, ref_q: dict, budget: QualityBudget) -> bool:
    if q["psnr"] < budget.min_psnr:
        return False
    if "adherence" in ref_q:
        if q["adherence"] < ref_q["adherence"] - budget.max_adherence_drop - 1e-9:
            return False
        if q["fd_shapes"] > ref_q["fd_shapes"] * (1 + budget.max_fd_increase):
            return False
    return True


# --------------------------------------------------------------------------- the search
class Tuner:
    """One tuning run; ``state`` (a JSON file beside the output) makes it resumable."""

    def __init__(self, pipe: Any, tune: PromptSet, confirm: PromptSet, budget: QualityBudget, out: Path,
                 budget_minutes: float = 20.0, model_name: str = "", progress: bool = True,
                 quality_solver: tuple[str, int] = ("unipc-bh2", 100), reference_steps: int = 50,
                 say: Callable[[str], None] | None = None, solvers: Sequence[str] = SOLVERS,
                 step_grid: Sequence[int] = STEP_GRID):
        self.pipe, self.tune, self.confirm, self.budget = pipe, tune, confirm, budget
        self.solvers, self.step_grid = tuple(solvers), tuple(sorted(step_grid))
        self.out, self.minutes, self.model_name, self.progress = Path(out), budget_minutes, model_name, progress
        self.quality_solver, self.reference_steps = quality_solver, reference_steps
        self.say = say or (lambda _m: None)
        self.state_path = self.out.with_name(f".{self.out.name}.tune-state.json")
        self.refs_path = self.out.with_name(f".{self.out.name}.tune-refs.pt")
        self.key = self._key()
        self._search_t0: float | None = None
        self.state = self._load()
        self.measured_now = 0  # candidates measured in this process (not resumed): tests count them

    def _key(self) -> str:
        """Everything a measurement depends on: a state (or reference file) with another key is not reused."""
        from .plans import scheduler_fingerprint, weights_hash

        text = json.dumps({"budget": asdict(self.budget), "tune": self.tune.prompts, "seed": self.tune.seed,
                           "weights": weights_hash(self.pipe.transformer), "q": self.quality_solver,
                           "space": [self.solvers, self.step_grid],
                           "guidance": getattr(self.pipe, "default_guidance_scale", None),
                           "scheduler": scheduler_fingerprint(getattr(self.pipe, "scheduler", None)),
                           "speed_ref": self.reference_steps}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _load(self) -> dict:
        if self.state_path.is_file():
            st = json.loads(self.state_path.read_text())
            if st.get("key") == self.key:
                return st
            self.say("a tuning state for another model, budget or prompt set was found: starting over")
        return {"key": self.key, "measured": {}, "search_s": 0.0}

    def _save(self) -> None:
        atomic_write(self.state_path, lambda tmp: Path(tmp).write_text(json.dumps(self.state, indent=1)))

    # ---- references
    def references(self) -> None:
        """The converged quality reference's images and quality, and the speed reference's time."""
        if self.refs_path.is_file() and "reference" in self.state:
            saved = torch.load(self.refs_path)
            if isinstance(saved, dict) and saved.get("key") == self.key:  # this run's, not another's
                self.ref_images = saved["images"]
                return
        solver, steps = self.quality_solver
        self.say(f"quality reference: {solver} @{steps}")
        self.ref_images, _ = run_images(copy_shapes(self.pipe, solver), self.tune, steps)
        _, t_ref = run_images(copy_shapes(self.pipe, None), self.tune, self.reference_steps)
        q = quality(self.tune, self.ref_images, self.ref_images)
        saved = {"key": self.key, "images": self.ref_images}
        atomic_write(self.refs_path, lambda tmp: torch.save(saved, tmp))
        self.state["reference"] = {"quality": q, "speed_s": t_ref, "name": f"{solver} @{steps}"}
        self._save()

    def plan_for(self, solver: str, steps: int) -> dict:
        """Block Caching's plan for ``solver`` at ``steps`` (calibrated on the tuning prompts; kept in the state)."""
        key = f"{solver} @{steps}"
        plans = self.state.setdefault("plans", {})
        if key not in plans:
            from .api import calibrate
            from .methods.block_cache import BlockCache

            self.say(f"calibrating Block Caching for {key}")
            own = copy_shapes(self.pipe, solver)
            prompts = own.calibration_prompts() if hasattr(own, "calibration_prompts") else self.tune.prompts
            plan = calibrate(own, BlockCache(delta=0.0), steps=steps, seeds=CALIBRATION_SEEDS, prompts=prompts)
            plans[key] = {k: v for k, v in plan.items() if not k.startswith("_")}  # runtime notes stay out
            self._save()
        return plans[key]

    def measure(self, cand: Candidate) -> dict:
        done = self.state["measured"].get(cand.name)
        if done is not None:
            return done
        own = copy_shapes(self.pipe, cand.solver)
        handle = None
        try:
            plans = {"block-cache": self.plan_for(cand.solver, cand.steps)} if cand.bc is not None else {}
            from .api import accelerate

            methods = methods_for(cand, plans)
            handle = accelerate(own, *methods) if methods else None
            images, secs = run_images(own, self.tune, cand.steps)
            q = quality(self.tune, images, self.ref_images)
            rec = {**asdict(cand), "quality": q, "seconds": secs,
                   "speedup": self.state["reference"]["speed_s"] / secs,
                   "meets": meets(q, self.state["reference"]["quality"], self.budget), "error": None}
        except HastenError as e:  # a method refusing this setting is a result, not a crash
            rec = {**asdict(cand), "quality": None, "seconds": None, "speedup": None, "meets": False,
                   "error": str(e)}
        finally:
            if handle is not None:
                handle.disable()
        self.state["measured"][cand.name] = rec
        self.measured_now += 1
        if self._search_t0 is not None:  # the time spent so far survives an interruption
            self.state["search_s"] = time.perf_counter() - self._search_t0
        self._save()
        return rec

    def search(self) -> list[dict]:
        t0 = self._search_t0 = time.perf_counter() - self.state.get("search_s", 0.0)
        over = lambda: time.perf_counter() - t0 > 60 * self.minutes  # noqa: E731
        bar = tqdm(desc="tune", disable=not self.progress, unit="config", dynamic_ncols=True)
        found: dict[str, int] = {}
        for solver in self.solvers:  # 1. fewer steps
            for steps in self.step_grid:
                if over():
                    break
                rec = self.measure(Candidate(solver, steps))
                bar.update()
                if rec["meets"]:
                    found[solver] = steps
                    break
        flexible = getattr(self.pipe.transformer, "flex_patch_sizes", None) is not None
        for solver, steps in found.items():  # 2. methods on top, at that step count and the next finer one
            finer = [s for s in self.step_grid if s > steps][:1]
            for s in (steps, *finer):
                ag, bc = AG_THRESHOLDS[-1], BC_DELTAS[0]
                flexi = ([Candidate(solver, s, flexi=c) for c in FLEXI_COMPUTE]
                         + [Candidate(solver, s, ag=ag, flexi=FLEXI_COMPUTE[-1]),
                            Candidate(solver, s, ag=ag, bc=bc, flexi=FLEXI_COMPUTE[-1])]) if flexible else []
                for c in ([Candidate(solver, s, ag=t) for t in AG_THRESHOLDS]
                          + [Candidate(solver, s, bc=d) for d in BC_DELTAS]
                          + [Candidate(solver, s, ag=ag, bc=bc)] + flexi):
                    if over():
                        break
                    self.measure(c)
                    bar.update()
        bar.close()
        self.state["search_s"] = time.perf_counter() - t0
        self._save()
        return list(self.state["measured"].values())

    def skips_nothing(self, rec: dict) -> bool:
        """A Block Caching candidate whose schedule computes every block (every change exceeds its delta) is
        its solver and steps plus hooks: the same images, and any speed difference is noise; never pick it."""
        if rec.get("bc") is None:
            return False
        from .methods.block_cache.schedule import ideal_speedup, schedule_from_changes

        plan = self.state.get("plans", {}).get(f"{rec['solver']} @{rec['steps']}")
        return plan is not None and ideal_speedup(schedule_from_changes(plan["l1rel"], rec["bc"])) <= 1.0

    # ---- confirmation
    def confirm_one(self, rec: dict) -> dict:
        """The candidate on the held-out prompts, interleaved with the speed reference batch by batch."""
        cand = Candidate.of(rec)
        solver, steps = self.quality_solver
        ref_images, _ = run_images(copy_shapes(self.pipe, solver), self.confirm, steps)
        base = copy_shapes(self.pipe, None)
        own = copy_shapes(self.pipe, cand.solver)
        from .api import accelerate

        plans = {"block-cache": self.plan_for(cand.solver, cand.steps)} if cand.bc is not None else {}
        methods = methods_for(cand, plans)
        handle = accelerate(own, *methods) if methods else None
        ratios, imgs = [], []
        try:
            for prompts, seed in self.confirm.batches():
                one = PromptSet(prompts, seed, batch_size=len(prompts))
                _, tb = run_images(base, one, self.reference_steps)
                im, tc = run_images(own, one, cand.steps)
                ratios.append(tb / tc)
                imgs.append(im)
        finally:
            if handle is not None:
                handle.disable()
        images = torch.cat(imgs)
        q = quality(self.confirm, images, ref_images)
        ref_q = quality(self.confirm, ref_images, ref_images)
        return {"candidate": cand.name, "speedup": round(statistics.median(ratios), 4), "quality": q,
                "reference_quality": ref_q, "meets": meets(q, ref_q, self.budget),
                "samples": len(self.confirm.prompts)}

    def run(self) -> dict:
        self.references()
        records = self.search()
        passing = sorted((r for r in records if r["meets"] and not self.skips_nothing(r)), key=lambda r: -r["speedup"])
        if not passing:
            scored = [r for r in records if r["quality"] is not None]
            if not scored:
                raise HastenError("hasten tune measured no configuration (budget too small?)")
            best = max(scored, key=lambda r: r["quality"]["psnr"])
            closest = Candidate.of(best).name
            gates = ", adherence and FD" if "adherence" in best["quality"] else ""
            raise HastenError(f"no configuration reached the budget (PSNR >= {self.budget.min_psnr:g} dB{gates}); "
                              f"the closest: {closest} at {best['quality']['psnr']:.1f} dB")
        tried = []
        for rec in passing[:MAX_CONFIRM]:
            self.say(f"confirming {Candidate.of(rec).name}")
            conf = self.confirm_one(rec)
            tried.append(conf)
            if conf["meets"]:
                return self.write(rec, conf, tried)
        best = max(tried, key=lambda t: t["quality"]["psnr"])
        gates = "".join(f", {k} {best['quality'][k]:.4g} (reference {best['reference_quality'][k]:.4g})"
                        for k in ("adherence", "fd_shapes") if k in best["quality"])
        raise HastenError(f"the {len(tried)} fastest configurations that met the budget on the tuning prompts "
                          f"missed it on the held-out ones (best held-out: {best['candidate']}, PSNR "
                          f"{best['quality']['psnr']:.1f} dB{gates}); on few prompts the adherence and FD "
                          "gates are within sampling noise: try --max-adherence-drop / --max-fd-increase")

    def write(self, rec: dict, conf: dict, tried: list[dict]) -> dict:
        """The plan file: solver (as the diffusers scheduler class and config), steps, guidance scale,
        methods (with Block Caching's calibrated plan inline), budget and the confirmed figures."""
        cand = Candidate.of(rec)
        sched = stock_scheduler(self.pipe, cand.solver)
        methods = []
        if cand.ag is not None:
            methods.append({"method": "AdaptiveGuidance", "threshold": cand.ag})
        if cand.bc is not None:
            methods.append({"method": "BlockCache", "delta": cand.bc,
                            "plan": self.state["plans"][f"{cand.solver} @{cand.steps}"]})
        if cand.flexi is not None:  # the plan then needs the flexified model (plan["model"])
            methods.append({"method": "FlexiDiT", "compute": cand.flexi})
        plan = {"schema": SCHEMA, "model": self.model_name, "candidate": cand.name, "solver": cand.solver,
                "scheduler": {"class": type(sched).__name__, "config": dict(sched.config)},
                "steps": cand.steps, "guidance_scale": getattr(self.pipe, "default_guidance_scale", None),
                "methods": methods, "budget": asdict(self.budget),
                "tuning": {"prompts": len(self.tune.prompts), "seed": self.tune.seed, "speedup": rec["speedup"],
                           "quality": rec["quality"], "reference": self.state["reference"]["name"],
                           "reference_quality": self.state["reference"]["quality"],
                           "candidates_measured": len(self.state["measured"]),
                           "search_s": round(self.state.get("search_s", 0.0), 1)},
                "confirmed": conf, "confirm_tries": len(tried)}
        atomic_write(self.out, lambda tmp: Path(tmp).write_text(json.dumps(plan, indent=1, default=str) + "\n"))
        return plan


def tune(pipe: Any, min_psnr: float, out: str | Path, max_fd_increase: float = 0.05,
         max_adherence_drop: float = 0.01, budget_minutes: float = 20.0, prompts: Sequence[str] | None = None,
         samples: int = 32, confirm_samples: int = 32, model_name: str = "", progress: bool = True,
         say: Callable[[str], None] | None = None, **kwargs: Any) -> dict:
    """Search, confirm and write the plan (see the module docstring); returns the plan dict."""
    if not (0 < min_psnr < 100):
        raise HastenError(f"--min-psnr must be in (0, 100) dB, got {min_psnr}")
    if max_fd_increase < 0 or max_adherence_drop < 0:
        raise HastenError("--max-fd-increase and --max-adherence-drop must be >= 0")
    if budget_minutes <= 0:
        raise HastenError(f"--budget-minutes must be > 0, got {budget_minutes}")
    if not hasattr(pipe, "scheduler") or not hasattr(pipe, "transformer"):
        raise HastenError("hasten tune needs a diffusers pipeline with a transformer and a flow-matching scheduler")
    if prompts is None:
        if getattr(pipe, "name", "") != "shapes" and not hasattr(pipe, "calibration_prompts"):
            raise HastenError("this model has no prompt set of its own: pass --prompts FILE")
        tune_set, confirm_set = shapes_sets(samples, confirm_samples)
    else:
        tune_set, confirm_set = file_sets(prompts)
    budget = QualityBudget(min_psnr, max_fd_increase, max_adherence_drop)
    return Tuner(pipe, tune_set, confirm_set, budget, Path(out), budget_minutes, model_name, progress,
                 say=say, **kwargs).run()
