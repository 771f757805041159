"""The public door: ``accelerate`` and ``calibrate``.

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

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import HastenError
from .hooks import Handle, attach, resolve_target
from .methods import LEVELS, info_for
from .plans import load_tuned_plan


def accelerate(target: Any, *methods: Any, blocks: Sequence | None = None, plan: Any = None) -> Handle:
    """Install ``methods`` on ``target``; returns the handle (a context manager; ``disable()`` undoes).

    ``blocks`` lists the transformer blocks for models hasten does not know (modules, dotted names
    or :class:`hasten.adapters.BlockSpec`); see :mod:`hasten.adapters.diffusers`.
    ``plan``: instead of methods, a plan file (or dict) from ``hasten tune``: the pipeline's scheduler
    becomes the plan's (``disable()`` restores it) and the plan's methods are installed; call the
    pipeline with ``num_inference_steps=handle.tuned_plan["steps"]`` (a Block Caching plan refuses
    other step counts).
    """
    tuned = None
    if plan is not None:
        if methods:
            raise HastenError("give methods or plan=..., not both")
        tuned = load_tuned_plan(plan)
        methods = tuple(_tuned_methods(tuned))
    infos = [(info_for(m), m) for m in methods]
    names = [type(m).__name__ for m in methods]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise HastenError(f"method {sorted(dup)[0]} given twice")
    shrinking = [type(m).__name__ for i, m in infos if i.level == "call" and type(m).__name__ != "FlexiDiT"]
    if len(shrinking) > 1:
        raise HastenError(f"{shrinking[0]} and {shrinking[1]} cannot be combined: both shrink the guidance "
                          "batch; choose one")
    infos.sort(key=lambda im: LEVELS.get(im[0].level, 1))
    handle = attach(target, blocks)
    try:
        if tuned is not None:
            _use_tuned_scheduler(handle, target, tuned)
        for info, cfg in infos:
            info.install(handle, cfg)
            handle.methods.append(cfg)
    except BaseException:
        handle.disable()
        raise
    return handle


def _tuned_methods(tuned: dict) -> list:
    from .methods.block_cache import BlockCache
    from .methods.guidance import AdaptiveGuidance

    out = []
    for m in tuned["methods"]:
        if m.get("method") == "AdaptiveGuidance":
            out.append(AdaptiveGuidance(threshold=float(m["threshold"])))
        elif m.get("method") == "BlockCache":
            out.append(BlockCache(delta=float(m["delta"]), plan=m["plan"]))
        elif m.get("method") == "FlexiDiT":
            from .methods.flexidit import FlexiDiT

            out.append(FlexiDiT(compute=float(m["compute"])))
        else:
            raise HastenError(f"unknown method {m.get('method')!r} in the tuned plan")
    return out


def _use_tuned_scheduler(handle: Handle, target: Any, tuned: dict) -> None:
    """Swap in the plan's diffusers scheduler (class and config), undone by ``handle.disable()``."""
    import diffusers

    if not hasattr(target, "scheduler"):
        raise HastenError("a tuned plan applies to a pipeline with a scheduler, not a bare transformer")
    cls = getattr(diffusers, str(tuned["scheduler"]["class"]), None)
    if cls is None:
        raise HastenError(f"unknown scheduler {tuned['scheduler']['class']!r} in the tuned plan")
    handle.set_attr(target, "scheduler", cls.from_config(tuned["scheduler"]["config"]))
    handle.watch_scheduler()  # runs start, and their guidance scale is read, at the new scheduler's set_timesteps
    handle.set_attr(handle, "tuned_plan", tuned)


@dataclass
class CalibrationRun:
    """How to run full-compute samples for calibration: one ``run(seed)`` per seed.

    hasten pipeline: one batch with every label per seed. diffusers pipeline: ``pipe(prompt=prompts, ...)`` or
    ``pipe(class_labels=labels, ...)`` (whichever it takes), ``num_inference_steps=steps``, a generator
    seeded with the seed and ``output_type="latent"`` where the pipeline has one, per seed.
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
    blocks: Sequence | None = None  # the transformer blocks of a model hasten does not know (see accelerate)

    def run(self, seed: int) -> Any:
        if self.runner is not None:
            return self.runner(int(seed))
        if self.kind == "hasten":
            return self.target(self.conditions, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                               generator=torch.Generator().manual_seed(int(seed)), schedule=self.schedule,
                               solver=self.solver)
        return self._diffusers_call(seed, "latent")

    def images(self, seed: int) -> torch.Tensor:
        """One run's output as images in [0, 1] (what PSNR targets are measured on): hasten's pipeline
        returns them; a diffusers pipeline is asked for ``output_type="pt"``; a runner's return value is
        taken as it is."""
        if self.runner is not None:
            return torch.as_tensor(self.runner(int(seed)))
        if self.kind == "hasten":
            return self.run(seed).images
        return self._diffusers_call(seed, "pt").images

    def _diffusers_call(self, seed: int, output_type: str) -> Any:
        """``pipe(prompt=...)`` for text-conditioned pipelines, ``pipe(class_labels=...)`` for class-conditional
        ones (``DiTPipeline``): whichever the pipeline's ``__call__`` takes for these conditions."""
        params = inspect.signature(type(self.target).__call__).parameters
        labels = all(isinstance(c, int) for c in self.conditions)
        key = "class_labels" if labels and "class_labels" in params else "prompt"
        if key not in params:
            raise HastenError(f"{type(self.target).__name__} takes neither prompt= nor class_labels=: pass "
                              "runner=fn to hasten.calibrate (fn(seed) runs the pipeline once)")
        kwargs = dict(self.pipeline_kwargs)
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        if "output_type" in params:
            kwargs["output_type"] = output_type if output_type != "latent" or key == "prompt" else "pt"
        return self.target(**{key: list(self.conditions)}, num_inference_steps=self.steps,
                           generator=torch.Generator().manual_seed(int(seed)), **kwargs)

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
              runner: Callable[[int], Any] | None = None, blocks: Sequence | None = None,
              **pipeline_kwargs: Any) -> dict:
    """Calibrate ``method`` on ``target`` from full-compute runs; returns the plan (a dict).

    ``labels`` (hasten pipeline, default: every class; or a class-conditional diffusers pipeline) or
    ``prompts`` (text-conditioned diffusers pipeline) are the conditions; at least 8 conditions (or all
    classes when the model has fewer) and 2 seeds. ``runner(seed)`` replaces the pipeline call (needed for
    a bare transformer: it runs one sampling loop over the conditions for that seed, calling the model
    once per denoiser call); ``steps``, ``solver`` and ``schedule`` are then only recorded in the plan.
    ``blocks``: as for :func:`accelerate`, for a model whose blocks hasten does not know.
    Save the plan with :func:`hasten.plans.save_plan`.
    """
    info = info_for(method)
    if info.calibrate is None:
        raise HastenError(f"{type(method).__name__} needs no calibration")
    run = calibration_run(target, labels, seeds, steps, solver, schedule, guidance_scale, prompts, runner,
                          blocks, **pipeline_kwargs)
    return info.calibrate(run, method)


def calibration_run(target: Any, labels: Sequence | None = None, seeds: Sequence[int] = (0, 1), steps: int = 50,
                    solver: str = "euler", schedule: str | None = "linear", guidance_scale: float | None = None,
                    prompts: Sequence[str] | None = None, runner: Callable[[int], Any] | None = None,
                    blocks: Sequence | None = None, **pipeline_kwargs: Any) -> CalibrationRun:
    """The checked :class:`CalibrationRun` for ``target`` (see :func:`calibrate` for the arguments): the one
    runner that calibration and scale-shift training drive, whatever the pipeline."""
    kind, transformer, _ = resolve_target(target)
    if kind == "transformer" and runner is None:
        raise HastenError("calibrating a bare transformer needs runner=fn (fn(seed) runs one sampling loop); "
                          "or pass a hasten or diffusers pipeline")
    if runner is not None:
        conds, need = list(labels or prompts or []), 0
    elif kind == "hasten":
        conds = list(range(target.num_classes)) if labels is None else [int(x) for x in labels]
        target.check_labels(conds)
        need = min(MIN_CONDITIONS, target.num_classes)
    elif labels is not None and prompts is None:  # a class-conditional diffusers pipeline (DiTPipeline)
        conds, need = [int(x) for x in labels], MIN_CONDITIONS
    else:
        if prompts is None and hasattr(target, "calibration_prompts"):
            prompts = target.calibration_prompts()  # an embedded text-to-image model knows its domain
        if prompts is None:
            raise HastenError("calibrating a diffusers pipeline needs prompts=[...] (or labels=[...] for a "
                              "class-conditional one), at least 8")
        conds, need = list(prompts), MIN_CONDITIONS
    _check_counts(conds, need, seeds, steps)
    return CalibrationRun(target, kind, transformer, conds, [int(s) for s in seeds], int(steps), solver, schedule,
                          guidance_scale, pipeline_kwargs, runner, blocks)


def _check_counts(conds: Sequence, need: int, seeds: Sequence[int], steps: int) -> None:
    if len(set(conds)) < need:
        raise HastenError(f"calibration needs at least {need} different conditions, got {len(set(conds))}")
    if len({int(s) for s in seeds}) < MIN_SEEDS:
        raise HastenError(f"calibration needs at least {MIN_SEEDS} different seeds, got {len(set(seeds))}")
    if int(steps) < 1:
        raise HastenError(f"steps must be >= 1, got {steps}")
