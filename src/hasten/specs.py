"""How the command line spells acceleration methods: ``--accel NAME:key=value,...`` specs and the options of
``hasten calibrate``. Outside the core: the core (``hooks``, ``plans``, ``methods``, ``adapters``, ``api``)
knows configs, not strings.

    block-cache:plan=plan.json            block-cache:delta=0.5 (calibrates on the fly)
    ag  |  ag:threshold=0.99  |  ag:plan=plan.json      linear-ag:plan=plan.json[,threshold=0.99]
    guidance-interval:lo=0.2,hi=0.8   (classifier-free guidance only for noise levels in (lo, hi])
    flexidit:compute=0.6  |  flexidit:weak_steps=10[,weak_guide_steps=5]   (a model from hasten flexify)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api import MIN_CONDITIONS, CalibrationRun, _check_counts, accelerate, calibrate
from .errors import HastenError
from .hooks import Handle, resolve_target
from .io import atomic_write, check_writable
from .methods import by_name
from .methods.block_cache import BlockCache, load_block_cache_plan
from .methods.block_cache import calibrate as record_block_cache_plan
from .methods.guidance import (
    DEFAULT_MIN_PSNR,
    GUIDANCE_INTERVAL,
    LINEAR_AG,
    AdaptiveGuidance,
    GuidanceInterval,
    LinearAG,
    load_ag_plan,
    load_linear_ag_plan,
)
from .plans import check_guidance, check_plan, save_plan
from .scale_shift import SS_TRAIN_STEPS, train_scale_shift


@dataclass(frozen=True)
class SpecParser:
    """One method's command-line spelling: ``from_spec(options, ctx) -> config`` for ``--accel``,
    ``from_options(options) -> config`` for ``hasten calibrate``, and optionally ``cli_calibrate(run,
    options, out) -> plan`` when calibrating writes more than the plan."""

    from_spec: Callable[..., Any]
    from_options: Callable[[dict], Any]
    cli_calibrate: Callable[..., dict] | None = None


def block_cache_cli_calibrate(run, options: dict, out: Path) -> dict:
    """``hasten calibrate --method block-cache --delta D [--scale-shift --train-steps N]``."""
    if options.get("delta") is None:
        raise HastenError("block-cache calibration needs --delta (e.g. --delta 0.5)")
    plan = record_block_cache_plan(run, BlockCache(delta=options["delta"]))
    if options.get("scale_shift"):
        from safetensors.torch import save_file

        steps = SS_TRAIN_STEPS if options.get("train_steps") is None else int(options["train_steps"])
        if steps < 1:
            raise HastenError(f"--train-steps must be >= 1, got {steps}")
        state, info = train_scale_shift(run.target, plan, train_steps=steps, labels=run.conditions, run=run)
        ss_path = Path(out).with_suffix(".scale_shift.safetensors")
        atomic_write(ss_path, lambda tmp: save_file(state, tmp))
        plan["scale_shift_file"] = ss_path.name
        plan["scale_shift_train"] = info
    return plan


def block_cache_from_spec(opts: dict[str, str], ctx) -> BlockCache:
    """``block-cache:plan=plan.json`` or ``block-cache:delta=0.5`` (calibrates on the fly).

    Options: ``plan=PATH``, ``delta=D`` (with a plan: re-derive the schedule from its curves),
    ``scale_shift=1|0|PATH`` (1: the plan's parameters if trained for this delta, else trained now on
    the fly, ``train_steps=N`` Adam updates, default 1000), ``train_steps=N``.
    """
    unknown = set(opts) - {"plan", "delta", "scale_shift", "train_steps"}
    if unknown:
        raise HastenError(f"unknown block-cache option {sorted(unknown)[0]!r}: use plan=PATH or delta=NUMBER")
    try:
        train_steps = int(opts.get("train_steps", SS_TRAIN_STEPS))
    except ValueError:
        raise HastenError(f"block-cache train_steps must be an integer, got {opts['train_steps']!r}") from None
    delta = None
    if "delta" in opts:
        try:
            delta = float(opts["delta"])
        except ValueError:
            raise HastenError(f"block-cache delta must be a number, got {opts['delta']!r}") from None
    ss: Any = None
    if "scale_shift" in opts:
        ss = {"0": False, "false": False, "off": False, "1": True, "true": True, "on": True}.get(
            opts["scale_shift"].lower(), opts["scale_shift"])
    if "plan" in opts:
        plan = load_block_cache_plan(opts["plan"])
        tr = getattr(ctx.pipe, "transformer", ctx.pipe)
        check_plan(plan, tr, steps=ctx.steps, solver=ctx.solver, schedule=ctx.schedule)
    elif delta is None:
        raise HastenError("block-cache needs plan=PATH or delta=NUMBER, e.g. --accel block-cache:delta=0.5")
    else:
        BlockCache(delta=delta)  # validates delta before the expensive part
        plan = calibrate(ctx.pipe, BlockCache(delta=delta), steps=ctx.steps, solver=ctx.solver,
                             schedule=ctx.schedule, guidance_scale=ctx.guidance_scale, seeds=(1000, 1001))
    if ss is True:
        use = plan["delta"] if delta is None else delta
        if not (plan.get("scale_shift_file") and plan.get("delta") == use):
            ss, _ = train_scale_shift(ctx.pipe, plan, delta=use, train_steps=train_steps)  # on the fly
    return BlockCache(delta=delta, plan=plan, scale_shift=ss)


def block_cache_from_options(opts: dict) -> BlockCache:
    return BlockCache(delta=opts.get("delta"))


def _only(opts: dict[str, str], allowed: set[str], name: str) -> None:
    bad = sorted(set(opts) - allowed)
    if bad:
        raise HastenError(f"unknown option {bad[0]!r} for {name}; options: {', '.join(sorted(allowed))}")


def ag_from_spec(opts: dict[str, str], ctx: Any = None) -> AdaptiveGuidance:
    """``ag:threshold=0.99`` -> ``AdaptiveGuidance(0.99)``; ``ag:plan=FILE`` -> the calibrated threshold;
    ``ag`` -> the plan shipped with the model for the run's guidance scale."""

    _only(opts, {"threshold", "plan"}, "ag")
    if "plan" in opts:
        if "threshold" in opts:
            raise HastenError("ag takes threshold= or plan=, not both")
        plan = load_ag_plan(opts["plan"])
        if ctx is not None:
            check_plan(plan, ctx.pipe.transformer)
            check_guidance(plan, getattr(ctx, "guidance_scale", None))
        return AdaptiveGuidance(plan=plan)
    return AdaptiveGuidance(threshold=opts.get("threshold"))


def ag_from_options(opts: dict) -> AdaptiveGuidance:
    """``hasten calibrate --method ag [--min-psnr DB]``: the config to calibrate."""
    return AdaptiveGuidance(min_psnr=opts.get("min_psnr") or DEFAULT_MIN_PSNR)


def linear_ag_from_spec(opts: dict[str, str], ctx: Any = None) -> LinearAG:
    """``linear-ag:plan=plan.json[,threshold=0.99]``; the plan is checked against the run's settings."""

    _only(opts, {"plan", "threshold"}, LINEAR_AG)
    if "plan" not in opts:
        raise HastenError("linear-ag needs plan=PATH: make one with `hasten calibrate --method linear-ag`")
    plan = load_linear_ag_plan(opts["plan"])
    if ctx is not None:
        check_plan(plan, ctx.pipe.transformer, steps=ctx.steps, solver=ctx.solver, schedule=ctx.schedule)
    return LinearAG(plan=plan, threshold=opts.get("threshold"))


def linear_ag_from_options(opts: dict) -> LinearAG:
    """``hasten calibrate --method linear-ag [--threshold T]``: the config to calibrate."""
    return LinearAG(threshold=opts.get("threshold"), min_psnr=opts.get("min_psnr") or DEFAULT_MIN_PSNR)

def guidance_interval_from_spec(opts: dict[str, str], ctx: Any = None) -> GuidanceInterval:
    """``guidance-interval:lo=0.2,hi=0.8`` -> ``GuidanceInterval(0.2, 0.8)`` (defaults 0 and 1)."""
    _only(opts, {"lo", "hi"}, GUIDANCE_INTERVAL)
    return GuidanceInterval(sigma_lo=opts.get("lo", 0.0), sigma_hi=opts.get("hi", 1.0))


def _not_calibrated(opts: dict) -> Any:
    raise HastenError("guidance-interval has nothing to calibrate: give the interval with --accel "
                      "guidance-interval:lo=...,hi=...")


def flexidit_from_spec(opts: dict[str, str], ctx: Any = None) -> Any:
    """``flexidit:weak_steps=10`` or ``flexidit:compute=0.6`` (``,weak_guide_steps=G``, ``,patch=4``) ->
    ``FlexiDiT(...)``; the model must be a flexified one (``hasten flexify``)."""
    from .methods.flexidit import FlexiDiT

    _only(opts, {"weak_steps", "compute", "weak_guide_steps", "patch"}, "flexidit")

    def number(key: str, cast: Any, default: Any = None) -> Any:
        try:
            return cast(opts[key]) if key in opts else default
        except ValueError:
            raise HastenError(f"flexidit {key} must be a number, got {opts[key]!r}") from None

    # built outside the conversions: FlexiDiT's own errors (HastenError is a ValueError) reach the user as they are
    return FlexiDiT(weak_steps=number("weak_steps", int), compute=number("compute", float),
                    weak_patch=number("patch", int), weak_guide_steps=number("weak_guide_steps", int, 0))


def _flexidit_not_calibrated(opts: dict) -> Any:
    raise HastenError("flexidit has nothing to calibrate: fine-tune with hasten flexify, then use "
                      "--accel flexidit:compute=0.6")


PARSERS: dict[str, SpecParser] = {
    "block-cache": SpecParser(block_cache_from_spec, block_cache_from_options, block_cache_cli_calibrate),
    "ag": SpecParser(ag_from_spec, ag_from_options),
    "adaptive-guidance": SpecParser(ag_from_spec, ag_from_options),
    LINEAR_AG: SpecParser(linear_ag_from_spec, linear_ag_from_options),
    GUIDANCE_INTERVAL: SpecParser(guidance_interval_from_spec, _not_calibrated),
    "flexidit": SpecParser(flexidit_from_spec, _flexidit_not_calibrated),
}


def parser(name: str) -> SpecParser:
    by_name(name)  # a clear error for unknown names, listing the registered methods
    if name not in PARSERS:
        raise HastenError(f"method {name!r} cannot be given on the command line")
    return PARSERS[name]


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
    name = name.strip()
    opts: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise HastenError(f"cannot read --accel {spec!r}: options are key=value, "
                              "e.g. block-cache:delta=0.5")
        if key.strip() in opts:
            raise HastenError(f"--accel {spec!r} gives {key.strip()!r} twice")
        opts[key.strip()] = value.strip()
    if not name:
        raise HastenError(f"cannot read --accel {spec!r}: expected NAME[:key=value,...]")
    return name, opts


def configs_from_specs(pipe: Any, specs: Sequence[str], steps: int, solver: str = "euler",
                       schedule: str | None = "linear", guidance_scale: float | None = None) -> list:
    """The method config of each ``--accel`` spec (calibrating once where a spec asks for it)."""
    ctx = SpecContext(pipe, int(steps), solver, schedule, guidance_scale)
    configs = []
    for spec in specs:
        name, opts = parse_spec(spec)
        configs.append(parser(name).from_spec(opts, ctx))
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
    from .pipeline import load_pipeline

    info = by_name(method)
    spelled = parser(method)
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
    if spelled.cli_calibrate is not None:
        kind, transformer, _ = resolve_target(pipe)
        _check_conditions(pipe, labels, seeds, steps)
        run = CalibrationRun(pipe, kind, transformer, list(labels), [int(s) for s in seeds], int(steps), solver,
                             schedule, guidance_scale)
        plan = spelled.cli_calibrate(run, options, out)
    else:
        plan = calibrate(pipe, spelled.from_options(options), **run_args)
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
