"""``hasten bench --model shapes``: the benchmark on the text-to-image model, through the real pipeline.

Same harness and protocol as the digits bench (:mod:`hasten.eval.bench_harness`: every configuration
on its own copy of the transformer, interleaved repetitions, paired speed-ups against 50-step Euler
CFG); here the "labels" of a batch are indices into the held-out captions, and image i always starts
from its own noise (:func:`hasten.eval.shapes_eval.initial_noise`), whatever its batch. Times are end
to end (``pipe(prompts)``: text encoder, denoiser, VAE decode).

Two references. Speed: 50-step Euler CFG (1.00x), what users recognise. Quality: a converged solve
(``QUALITY_SOLVER`` at ``QUALITY_STEPS``; :func:`convergence_check` records its distance to a solve
with twice the steps), because 50 Euler steps are themselves off the ODE's solution and a more accurate
solver would be penalised for disagreeing with Euler's error. Quality per record: PSNR/SSIM against the
quality reference's images, FD-shapes and prompt adherence (``fd_shapes``, ``adherence``); the quality
levels add the text-to-image gates (adherence at most 1 point below the quality reference, FD-shapes at
most 5 % above), see :func:`hasten.eval.bench_results.quality_levels`.

Families: ``baseline`` is everything a user can do without a cache: every stock solver
(:func:`solver_scheduler`) from 30 down to 4 steps, guidance off, and guidance in a limited interval
(Kynkaenniemi et al. 2024); ``hasten`` is hasten's methods on 50-step Euler and composed with the best
solver (``BEST_SOLVER``) at reduced steps; ``peer`` is diffusers' hooks and cache-dit on both.

Peers run through their supported path on the pipeline: ``pipe.transformer.enable_cache(config)``
(the shapes transformer is a diffusers ``CacheMixin``; the pipeline sets the cache context around
every call). PyramidAttentionBroadcast reads the current timestep from a forward pre-hook, in
diffusers' convention (the pipeline passes 1000 sigma). MagCache is calibrated with diffusers' own
``MagCacheConfig(calibrate=True)`` on calibration captions. A peer that fails (FirstBlockCache on any
SD3 transformer in diffusers 0.42: its last block returns no text stream) is recorded with its error.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from collections.abc import Callable, Sequence

import torch

from .bench_harness import BenchConfig, Prepared, Unavailable

CALIBRATION_SAMPLES = 10


def copy_shapes(pipe, solver: str | None = None, cls: type | None = None):
    """A new pipeline of ``pipe``'s class (or of ``cls``, a subclass) around a deep copy of its transformer,
    with a copy of its scheduler or ``solver``'s stock one (:func:`stock_scheduler`); the other components
    are shared (nothing installs on them)."""
    scheduler = copy.deepcopy(pipe.scheduler) if solver is None else stock_scheduler(pipe, solver)
    own = (cls or type(pipe))(**{**pipe.components, "transformer": copy.deepcopy(pipe.transformer),
                                 "scheduler": scheduler})
    for attr in ("default_guidance_scale", "name"):
        if hasattr(pipe, attr):
            setattr(own, attr, getattr(pipe, attr))
    own.set_progress_bar_config(disable=True)
    return own


def stock_scheduler(pipe, solver: str):
    """``solver``'s diffusers scheduler (:func:`solver_scheduler`) keeping ``pipe``'s flow shift."""
    sched = solver_scheduler(solver)
    shift = float(getattr(pipe.scheduler, "config", {}).get("shift", 1.0) or 1.0)
    if shift != 1.0:
        key = "shift" if solver in ("euler", "heun") else "flow_shift"
        sched = type(sched).from_config({**sched.config, key: shift})
    return sched


class EvalSet:
    """The held-out captions and each image's initial noise, indexed by the harness's "labels"."""

    def __init__(self, pipe, samples: int, seed: int):
        from .shapes_eval import eval_scenes, initial_noise

        self.scenes = eval_scenes(samples)
        self.prompts = [s.caption for s in self.scenes]
        self.seed = seed
        self.noise = initial_noise(pipe, samples, seed)

    def sampler(self, pipe, steps: int, guidance_scale: float | None = None
                ) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
        def sample(idx: torch.Tensor, _gen: torch.Generator) -> torch.Tensor:
            i = idx.tolist()
            return pipe([self.prompts[k] for k in i], num_inference_steps=steps, guidance_scale=guidance_scale,
                        latents=self.noise[i], output_type="pt").images

        return sample


def solver_scheduler(solver: str):
    """A stock diffusers scheduler for the flow-matching model, as a user would configure it."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if solver == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=1.0)
    if solver == "heun":
        return FlowMatchHeunDiscreteScheduler(shift=1.0)
    if solver in ("unipc-bh2", "unipc-bh1"):
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2,
                                       solver_type=solver.split("-")[1], flow_shift=1.0)
    if solver == "dpm++2m":
        return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                           algorithm_type="dpmsolver++", solver_order=2, flow_shift=1.0)
    raise ValueError(f"unknown solver {solver!r}")


def _suffix(steps: int, solver: str) -> str:
    return f" @{steps}" + ("" if solver == "euler" else f" {solver}")


def baseline_config(pipe, data: EvalSet, steps: int, solver: str = "euler",
                    guidance: str | tuple[float, float] = "cfg") -> BenchConfig:
    """A user's own options: a stock solver at ``steps`` with CFG (``"cfg"``), guidance off (``"off"``, one
    branch) or guidance only for sigma in ``(lo, hi]`` (Kynkaenniemi et al. 2024; hasten's
    ``GuidanceInterval`` does the bookkeeping, the idea is the user's to apply)."""
    interval = guidance if isinstance(guidance, tuple) else None

    def setup() -> Prepared:
        own = copy_shapes(pipe, solver)
        close = None
        if interval is not None:
            from ..api import accelerate
            from ..methods.guidance import GuidanceInterval

            close = accelerate(own, GuidanceInterval(*interval)).disable
        gs = 1.0 if guidance == "off" else None
        return Prepared(sample=data.sampler(own, steps, gs), close=close, transformer=own.transformer)

    if interval is not None:
        name, g = f"guidance-interval:lo={interval[0]},hi={interval[1]}", f"interval({interval[0]},{interval[1]}]"
    else:
        name, g = ("cfg" if guidance == "cfg" else "no-guidance"), guidance
    return BenchConfig(name + _suffix(steps, solver), "baseline", {"steps": steps, "solver": solver, "guidance": g},
                       setup)


def hasten_config(pipe, data: EvalSet, specs: Sequence[str], steps: int, assets, solver: str = "euler"
                  ) -> BenchConfig:
    """hasten's methods (spec strings) on ``solver`` at ``steps``; plans are calibrated for that solver."""
    specs = list(specs)

    def setup() -> Prepared:
        from ..specs import accelerate_from_specs

        resolved = [assets.resolve(s, steps, solver) for s in specs]
        own = copy_shapes(pipe, solver)
        handle = accelerate_from_specs(own, resolved, steps=steps)
        return Prepared(sample=data.sampler(own, steps), close=handle.disable, transformer=own.transformer,
                        report=lambda: handle.report()["methods"])

    return BenchConfig(" + ".join(specs) + _suffix(steps, solver), "hasten",
                       {"steps": steps, "solver": solver, "specs": specs}, setup)


def peer_config(pipe, data: EvalSet, kind: str, params: dict, steps: int, solver: str = "euler") -> BenchConfig:
    """A diffusers cache hook through ``pipe.transformer.enable_cache(config)``, on ``solver``."""
    from .bench_peers import DIFFUSERS_KINDS, diffusers_hook_config

    if kind not in DIFFUSERS_KINDS:
        raise Unavailable(f"no recipe for diffusers hook {kind!r}")

    def setup() -> Prepared:
        own = copy_shapes(pipe, solver)
        tr = own.transformer
        now = [1000.0]
        tr.register_forward_pre_hook(
            lambda m, a, kw: now.__setitem__(0, float(torch.as_tensor(kw["timestep"]).flatten()[0])),
            with_kwargs=True)
        recipe = {**params, "steps": steps, "mag_ratios": mag_ratios(own, steps)} if kind == "mag-cache" else params
        # ShapesPipeline batches the pooled text with the guidance rows: FasterCache splits it with them
        cfg = diffusers_hook_config(kind, recipe, lambda: now[0],
                                    guided=own.default_guidance_scale > 1.0, split_kwargs=("pooled_projections",))
        tr.enable_cache(cfg)
        return Prepared(sample=data.sampler(own, steps), start_run=tr._reset_stateful_cache, transformer=tr)

    label = ",".join(f"{k}={v}" for k, v in params.items())
    return BenchConfig(f"diffusers:{kind}" + (f":{label}" if label else "") + _suffix(steps, solver), "peer",
                       {"steps": steps, "solver": solver, "library": "diffusers", "method": kind, **params}, setup)


def cache_dit_config(pipe, data: EvalSet, params: dict, steps: int, solver: str = "euler") -> BenchConfig:
    """cache-dit's DBCache (``threshold``, ``Fn``, ``Bn``, ``warmup_steps``; ``taylorseer`` adds its
    TaylorSeer calibrator, on the image stream only; ``mask`` = ``"fast"``/``"medium"``/``"slow"`` its steps
    computation mask) through ``cache_dit.enable_cache(BlockAdapter(...))``, cache-dit's documented path
    for a pipeline it does not know by name, with the block pattern of its own SD3 recipe
    (``ForwardPattern.Pattern_1``). CFG rows are batched in one call here, so ``enable_separate_cfg=False``.
    cache-dit patches the pipeline class's ``__call__``: each install uses a throwaway subclass."""
    def setup() -> Prepared:
        from .bench_peers import cache_dit_version

        if cache_dit_version() is None:
            raise Unavailable("cache-dit is not installed (pip install 'hasten[bench]')")
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig

        own = copy_shapes(pipe, solver, cls=type(f"{type(pipe).__name__}CacheDiT", (type(pipe),), {}))
        extra = {}
        if params.get("mask"):
            extra["steps_computation_mask"] = cache_dit.steps_mask(mask_policy=str(params["mask"]),
                                                                   total_steps=steps)
        cfg = DBCacheConfig(Fn_compute_blocks=int(params.get("Fn", 1)), Bn_compute_blocks=int(params.get("Bn", 0)),
                            residual_diff_threshold=float(params.get("threshold", 0.08)),
                            max_warmup_steps=int(params.get("warmup_steps", 4)), num_inference_steps=steps,
                            enable_separate_cfg=False, **extra)
        # the text stream is not forecast: SD3's last block returns none, so cache-dit's encoder calibrator
        # would look up a state it never set (AssertionError in cache-dit 1.5.3)
        cal = (TaylorSeerCalibratorConfig(taylorseer_order=int(params.get("taylorseer_order", 1)),
                                          enable_encoder_calibrator=False)
               if params.get("taylorseer") else None)
        adapter = BlockAdapter(pipe=own, transformer=own.transformer, blocks=own.transformer.transformer_blocks,
                               forward_pattern=ForwardPattern.Pattern_1, check_forward_pattern=True)
        cache_dit.enable_cache(adapter, cache_config=cfg, calibrator_config=cal)
        return Prepared(sample=data.sampler(own, steps), transformer=own.transformer)

    from .bench_peers import cache_dit_version

    label = ",".join(f"{k}={v}" for k, v in params.items())
    return BenchConfig(f"cache-dit:dbcache:{label}" + _suffix(steps, solver), "peer",
                       {"steps": steps, "solver": solver,
                        "library": f"cache-dit {cache_dit_version() or '(not installed)'}", "method": "DBCache",
                        **params}, setup)


def mag_ratios(pipe, steps: int) -> list[float]:
    """diffusers' MagCache calibration on a copy, on the calibration captions (not the bench's)."""
    from diffusers.hooks import MagCacheConfig

    from .bench_peers import parse_mag_ratios

    cal = copy_shapes(pipe)
    cal.scheduler = copy.deepcopy(pipe.scheduler)
    cal.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cal(cal.calibration_prompts(CALIBRATION_SAMPLES), num_inference_steps=steps, output_type="latent",
            generator=torch.Generator().manual_seed(3000))
    return parse_mag_ratios(buf.getvalue(), steps)


# The converged quality reference: the 2nd-order UniPC solve at QUALITY_STEPS (its change from a solve
# with twice the steps is measured by ``convergence_check`` and recorded); 50-step Euler CFG stays the
# speed reference (1.00x) that users recognise.
QUALITY_SOLVER, QUALITY_STEPS = "unipc-bh2", 100
BEST_SOLVER = "unipc-bh2"  # the solver hasten's methods and the peers are also run on at reduced steps
# Step grids of the default suite (cut to fit the 35-minute budget on 2 cores) and of ``--suite full``
# (finer grids; guidance off and in an interval on Euler 50, both intervals everywhere, LinearAG and
# scale-shift at every reduced step count, AG at two thresholds, every FlexiDiT share on Euler 50: longer).
SOLVER_STEPS = {"euler": (20, 10, 6, 4), "unipc-bh2": (30, 25, 20, 15, 10, 6, 4),
                "unipc-bh1": (4,), "dpm++2m": (10, 6, 4), "heun": (5,)}
SOLVER_STEPS_FULL = {"euler": (20, 15, 10, 8, 6, 4), "unipc-bh2": (30, 25, 20, 15, 10, 8, 6, 4),
                     "unipc-bh1": (8, 6, 4), "dpm++2m": (20, 15, 10, 8, 6, 4), "heun": (15, 10, 5)}
NO_GUIDANCE_STEPS = (20, 10, 6, 4)
GUIDANCE_INTERVALS = ((0.22, 0.84), (0.0, 0.84))


def quality_reference_config(pipe, data: EvalSet, steps: int = QUALITY_STEPS) -> BenchConfig:
    """The converged solve every record's PSNR/SSIM and the gates' adherence/FD are measured against."""
    cfg = baseline_config(pipe, data, steps, QUALITY_SOLVER)
    cfg.params["role"] = "quality-reference"
    return cfg


def flexidit_configs(flexi, data: EvalSet, assets, quick: bool = False, every: bool = False) -> list[BenchConfig]:
    """FlexiDiT on a flexified fine-tune of the model (``hasten flexify``): 60% compute on Euler 50 (``every``:
    also 80% and 45% and the paper's weak-guide variant; the whole curve is ``benchmarks/flexidit_shapes``),
    and on the best solver at 20 steps alone and at 20 and 15 composed with AG and Block Caching (``every``:
    also alone at 10 and with AG only). ``assets``
    calibrate on ``flexi`` (its plans are for its own weights)."""
    full = 50
    if quick:
        return [hasten_config(flexi, data, ["flexidit:compute=0.6"], full, assets),
                hasten_config(flexi, data, ["ag:threshold=0.99", "block-cache:delta=0.1", "flexidit:compute=0.6"], 10,
                              assets, BEST_SOLVER)]
    shares = (0.8, 0.6, 0.45) if every else (0.6,)
    cfgs = [hasten_config(flexi, data, [f"flexidit:compute={c}"], full, assets) for c in shares]
    if every:
        cfgs += [hasten_config(flexi, data, ["flexidit:weak_steps=15,weak_guide_steps=10"], full, assets)]
    cfgs += [hasten_config(flexi, data, ["flexidit:compute=0.6"], s, assets, BEST_SOLVER)
             for s in ((20, 10) if every else (20,))]
    for s in (20, 15):
        if every:
            cfgs.append(hasten_config(flexi, data, ["ag:threshold=0.99", "flexidit:compute=0.6"], s, assets,
                                      BEST_SOLVER))
        cfgs.append(hasten_config(flexi, data, ["ag:threshold=0.99", "block-cache:delta=0.1", "flexidit:compute=0.6"],
                                  s, assets, BEST_SOLVER))
    return cfgs


def student_configs(student, data: EvalSet) -> list[BenchConfig]:
    """A distilled few-step student of the model (``hasten distill``: ``shapes-ard4``, ``shapes-flash``) at each
    step count it samples at; guidance is distilled in, so each step is one branch."""
    return [student_config(student, data, k) for k in student.step_counts]


def student_config(student, data: EvalSet, steps: int) -> BenchConfig:
    """The ``student`` at ``steps`` steps (see :func:`student_configs`)."""
    params = {"steps": steps, "solver": "student", "student": student.name, "method": student.method}
    if hasattr(student.student, "layers_with_history"):  # ARD
        params["layers_with_history"] = student.student.layers_with_history
        params["history_gate"] = student.student.history_gate
        params["convention"] = student.student.convention

    def setup() -> Prepared:
        from ..distill.trajectories import check_eval_noise

        check_eval_noise(data.seed, [student])  # never score a student on noise it trained on: the row's error
        return Prepared(sample=data.sampler(student, steps), transformer=student.transformer,
                        denoiser=getattr(student.student, "denoiser", student.student))

    return BenchConfig(f"{student.name} @{steps} (student)", "hasten", params, setup)


def shapes_configs(pipe, data: EvalSet, assets, quick: bool = False, peers: bool = True, flexi=None,
                   students: Sequence = (), every: bool = False) -> list[BenchConfig]:
    """The configurations on ``shapes``: first the speed reference (50-step Euler CFG), second the
    converged quality reference; then the baselines (every solver from 30 down to 4 steps, guidance off
    and in an interval), hasten's methods on Euler at 50 steps and on the best solver at reduced steps,
    FlexiDiT when ``flexi`` (the flexified fine-tune of ``pipe``) is given, distilled ``students`` of
    ``pipe`` (their pipelines), and the peers on both. ``every`` (``--suite full``): the finer grids of
    ``SOLVER_STEPS_FULL`` (UniPC at 8 steps too), guidance off and in both intervals on Euler 50 too, AG at
    two thresholds and Block Caching at delta 0.05 and 0.2 on Euler 50, scale-shift and LinearAG at every
    reduced step count, AG with Block Caching at 10 steps, more FlexiDiT variants (:func:`flexidit_configs`),
    and on Euler 50 the second variants of the peers (TaylorSeer orders 1 and 2, MagCache 0.06, cache-dit 0.15
    without a calibrator)."""
    full = 50
    extra = [] if flexi is None else flexidit_configs(  # plans for the fine-tune's own weights
        flexi, data, type(assets)(flexi, assets.folder / "flexi", copier=assets.copier), quick, every)
    extra += [c for st in students for c in student_configs(st, data)]
    if quick:
        cfgs = [baseline_config(pipe, data, full), quality_reference_config(pipe, data),
                baseline_config(pipe, data, 10, BEST_SOLVER),
                hasten_config(pipe, data, ["block-cache:delta=0.1"], full, assets),
                hasten_config(pipe, data, ["ag:threshold=0.99"], 10, assets, BEST_SOLVER), *extra]
        if peers:
            cfgs.append(peer_config(pipe, data, "taylorseer-cache", {"cache_interval": 2}, full))
        return cfgs
    grids = SOLVER_STEPS_FULL if every else SOLVER_STEPS
    cfgs = [baseline_config(pipe, data, full), quality_reference_config(pipe, data)]
    for solver, steps in grids.items():
        cfgs += [baseline_config(pipe, data, s, solver) for s in steps]
    cfgs += [baseline_config(pipe, data, full, guidance="off")] if every else []
    cfgs += [baseline_config(pipe, data, s, BEST_SOLVER, "off")
             for s in (grids[BEST_SOLVER] if every else NO_GUIDANCE_STEPS)]
    first = GUIDANCE_INTERVALS[0]
    cfgs += [baseline_config(pipe, data, full, guidance=iv) for iv in (GUIDANCE_INTERVALS if every else [])]
    cfgs += [baseline_config(pipe, data, s, BEST_SOLVER, iv) for s in (20, 10)
             for iv in (GUIDANCE_INTERVALS if every else [first])]
    # hasten on Euler at 50 steps, as before, and on the best solver at reduced steps (they compose)
    cfgs += [hasten_config(pipe, data, [f"block-cache:delta={d}"], full, assets)
             for d in ((0.05, 0.1, 0.2) if every else (0.1,))]
    cfgs += [hasten_config(pipe, data, [f"ag:threshold={t}"], full, assets)
             for t in ((0.999, 0.99) if every else (0.99,))]
    # at 30 steps for the >= 40 dB level, where plain UniPC at 25-30 steps is the one to beat
    cfgs += [hasten_config(pipe, data, [f"block-cache:delta={d}"], 30, assets, BEST_SOLVER) for d in (0.08, 0.1)]
    for s in (20, 15, 10):
        cfgs += [hasten_config(pipe, data, [f"block-cache:delta={d}"], s, assets, BEST_SOLVER) for d in (0.1, 0.2)]
        if every or s == 20:  # on shapes, delta 0.1 at 10 steps reuses no block: nothing to train
            # 100 Adam updates (300 also in full: 2.7 min of setup, and no PSNR gain over Block Caching alone)
            cfgs += [hasten_config(pipe, data, [f"block-cache:delta=0.1,scale_shift=1,train_steps={n}"], s, assets,
                                   BEST_SOLVER) for n in ((100, 300) if every and s == 20 else (100,))]
        cfgs += [hasten_config(pipe, data, [f"ag:threshold={t}"], s, assets, BEST_SOLVER) for t in (0.999, 0.99)]
        if every or s == 10:  # each step count calibrates its own plan (24 full-CFG runs and a search)
            cfgs += [hasten_config(pipe, data, ["linear-ag"], s, assets, BEST_SOLVER)]
        if every or s != 10:  # on shapes, delta 0.1 at 10 steps reuses nothing: the images of AG alone
            cfgs += [hasten_config(pipe, data, ["ag:threshold=0.99", "block-cache:delta=0.1"], s, assets,
                                   BEST_SOLVER)]
    cfgs += extra
    if peers:
        # on Euler 50 the default keeps each peer's variant that some quality level can pick (TaylorSeer runs
        # on the best solver below; MagCache 0.06 and cache-dit 0.15 without a calibrator are slower than
        # MagCache 0.24 at every level both pass); --suite full runs them all
        cfgs += [peer_config(pipe, data, "first-block-cache", {"threshold": 0.1}, full),
                 *([peer_config(pipe, data, "taylorseer-cache", {"cache_interval": 2}, full),
                    peer_config(pipe, data, "taylorseer-cache", {"cache_interval": 4, "max_order": 2}, full)]
                   if every else []),
                 peer_config(pipe, data, "pyramid-attention-broadcast", {"skip_range": 2}, full),
                 peer_config(pipe, data, "faster-cache", {"skip_range": 2, "uncond_skip_range": 5}, full),
                 *([peer_config(pipe, data, "mag-cache", {"threshold": 0.06}, full)] if every else []),
                 peer_config(pipe, data, "mag-cache", {"threshold": 0.24}, full)]
        db = {"Fn": 1, "Bn": 0, "warmup_steps": 8}
        cfgs += [cache_dit_config(pipe, data, {"threshold": t, **db}, full)
                 for t in ((0.08, 0.15) if every else (0.08,))]
        cfgs += [cache_dit_config(pipe, data, {"threshold": 0.15, **db, "taylorseer": True}, full),
                 cache_dit_config(pipe, data, {"threshold": 0.15, **db, "mask": "fast"}, full)]
        db_short = {**db, "warmup_steps": 3}  # on the best solver's fewer steps
        cfgs += [cache_dit_config(pipe, data, {"threshold": 0.08, **db_short}, 30, BEST_SOLVER)]
        for s in (20, 10):
            cfgs += [peer_config(pipe, data, "taylorseer-cache", {"cache_interval": 2}, s, BEST_SOLVER),
                     peer_config(pipe, data, "mag-cache", {"threshold": 0.06}, s, BEST_SOLVER),
                     cache_dit_config(pipe, data, {"threshold": 0.15, **db_short}, s, BEST_SOLVER)]
    return cfgs


@torch.no_grad()
def convergence_check(pipe, data: EvalSet, samples: int = 16, reference: torch.Tensor | None = None,
                      euler: torch.Tensor | None = None) -> dict:
    """How far the quality reference is from the ODE's solution: PSNR of the reference solve
    (``QUALITY_SOLVER`` at ``QUALITY_STEPS``) and of 50-step Euler against the same solver at twice the
    steps, on the first ``samples`` evaluation captions (untimed). ``reference`` / ``euler``: those two
    solves' images of the evaluation captions when the bench already made them (only the finer solve
    then runs here); each image starts from its own noise whatever its batch, so they are the same solves."""
    from .metrics import psnr

    idx = torch.arange(min(samples, len(data.prompts)))
    gen = torch.Generator()

    def solve(solver: str, steps: int, done: torch.Tensor | None) -> torch.Tensor:
        if done is not None and done.shape[0] >= len(idx):
            return done[: len(idx)]
        return data.sampler(copy_shapes(pipe, solver), steps)(idx, gen)

    finer = solve(QUALITY_SOLVER, 2 * QUALITY_STEPS, None)
    ref = solve(QUALITY_SOLVER, QUALITY_STEPS, reference)
    euler = solve("euler", 50, euler)
    return {"reference": f"cfg @{QUALITY_STEPS} {QUALITY_SOLVER}",
            "finer": f"cfg @{2 * QUALITY_STEPS} {QUALITY_SOLVER}", "samples": len(idx),
            "reference_vs_finer_psnr": round(psnr(ref, finer), 2),
            "euler50_vs_finer_psnr": round(psnr(euler, finer), 2)}


class ShapesScorer:
    """PSNR/SSIM, FD-shapes and adherence; ``labels`` are indices into the evaluation captions."""

    def __init__(self, data: EvalSet):
        self.data = data

    def psnr(self, a: torch.Tensor, b: torch.Tensor) -> float:
        from .metrics import psnr

        return psnr(a, b)

    def ssim(self, a: torch.Tensor, b: torch.Tensor) -> float:
        from .metrics import ssim

        return ssim(a, b)

    def quality(self, images: torch.Tensor, idx: torch.Tensor) -> dict:
        from .shapes_eval import score_images

        r = score_images([self.data.scenes[i] for i in idx.tolist()], images)
        return {"fd_shapes": r["fd_shapes"], "adherence": r["adherence"]}
