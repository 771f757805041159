"""``hasten bench``: hasten's methods against fewer steps and against peer libraries, in one process.

    hasten bench --model digits --out benchmarks/bench            # the full run (<= 20 min, 2 cores)
    hasten bench --model digits --out /tmp/b --quick              # the CI smoke test (<= 3 min)

Writes ``results.json`` (schema in ``benchmarks/README_bench.md``), ``results.md`` and ``pareto.png``.
The timing protocol and the counters are in :mod:`hasten.eval.bench_harness`, the peers in
:mod:`hasten.eval.bench_peers`, the schema and the quality-level comparison in
:mod:`hasten.eval.bench_results`, the table and figure in :mod:`hasten.eval.bench_report`.

hasten configurations are spec strings, as ``hasten generate --accel`` takes them, applied with
:func:`hasten.specs.accelerate_from_specs`. Methods that need a calibrated plan (Block Caching, LinearAG)
get one made here first, once per step count, from seeds the benchmark does not use, written to
``DIR/plans/`` and passed as ``plan=PATH``; the plan's cost is not timed (it is paid once per model).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import HastenError
from ..io import check_out_folder
from ..pipeline import HastenPipeline
from .bench_harness import (
    Batch,
    BenchConfig,
    Measurement,
    Prepared,
    RssSampler,
    Unavailable,
    error_text,
    make_batches,
    paired_speedup,
    run_in_turn,
    run_interleaved,
)
from .bench_peers import (
    DIFFUSERS_KINDS,
    cache_dit_version,
    copy_pipeline,
    install_cache_dit,
    install_diffusers_hook,
)
from .bench_results import SCHEMA, new_record, quality_levels

SOLVER, SCHEDULE = "euler", "linear"
CALIBRATION_SEEDS = (1000, 1001)  # Block Caching plans: 2 seeds x every class
LINEAR_AG_SEEDS = tuple(range(2000, 2024))  # LinearAG: 20 fitting seeds (x 10 classes = 200) + 4 held out
AG_SEEDS = (3000, 3001, 3002, 3003)  # AG threshold search (calibration conditions x 4 seeds)
MAG_CALIBRATION_SEED = 12345  # MagCache's calibration batch (bench_peers.calibrate_mag_ratios' default)


@dataclass(frozen=True)
class Budget:
    """Sample counts of a run. Default: the <= 20-minute full run; quick: the <= 3-minute smoke test."""

    samples: int
    batch_size: int
    warmup_samples: int
    realistic: bool

    @property
    def reps(self) -> int:
        return -(-self.samples // self.batch_size)


FULL = Budget(samples=160, batch_size=40, warmup_samples=4, realistic=True)
QUICK = Budget(samples=20, batch_size=10, warmup_samples=4, realistic=False)
# shapes: about 3000 denoiser-call equivalents per sample over the default grid (~5.5 ms each on the 2-core
# machine), so 96 samples (three interleaved batches of 32) keep the default run under its 35-minute budget;
# a warm-up of 2 samples per configuration is enough to fill its caches and first-call allocations
SHAPES = Budget(samples=96, batch_size=32, warmup_samples=2, realistic=False)


# --------------------------------------------------------------------------- configurations
def baseline_config(pipe: HastenPipeline, steps: int, guidance_scale: float | None = None) -> BenchConfig:
    def setup() -> Prepared:
        own = copy_pipeline(pipe)
        return Prepared(sample=_sampler(own, steps, guidance_scale), transformer=own.transformer)

    if guidance_scale == 1.0:  # one branch: guidance off
        return BenchConfig(f"no-guidance @{steps}", "baseline", {"steps": steps, "guidance": "off"}, setup)
    return BenchConfig(f"cfg @{steps}", "baseline", {"steps": steps, "guidance": "cfg"}, setup)


def _sampler(pipe: HastenPipeline, steps: int, guidance_scale: float | None = None
             ) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    def sample(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return pipe(labels, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen,
                    schedule=SCHEDULE, solver=SOLVER).images

    return sample


class HastenAssets:
    """Plans for hasten's calibrated methods, made once per step count and kept in ``folder``."""

    def __init__(self, pipe: HastenPipeline, folder: Path, copier: Callable = copy_pipeline):
        self.pipe = pipe
        self.folder = folder
        self.copier = copier
        self._plans: dict[tuple[str, int, str | None], Path | Exception] = {}  # a failure is kept: not retried

    def plan(self, method: str, steps: int, solver: str | None = None) -> Path:
        """The plan for ``method`` at ``steps``; ``solver`` (a diffusers pipeline's stock scheduler, see
        :func:`hasten.eval.bench_shapes.solver_scheduler`) calibrates on a copy with that scheduler, since
        a plan is only valid for the scheduler it was made with."""
        key = (method, steps, solver)
        if key not in self._plans:
            try:
                self._plans[key] = self._make(method, steps, solver)
            except Exception as e:  # noqa: BLE001 - every configuration needing this plan fails with it, once
                self._plans[key] = e
        made = self._plans[key]
        if isinstance(made, Exception):
            raise made
        return made

    def _make(self, method: str, steps: int, solver: str | None) -> Path:
        try:
            from ..api import calibrate
            from ..plans import save_plan
        except ImportError as e:
            raise Unavailable(f"hasten.api has no calibrate in this build ({e})") from None
        own = self.copier(self.pipe) if solver is None else self.copier(self.pipe, solver)
        if method == "block-cache":
            from ..methods.block_cache import BlockCache

            plan = calibrate(own, BlockCache(delta=0.0), steps=steps, solver=SOLVER, schedule=SCHEDULE,
                             seeds=CALIBRATION_SEEDS)
        elif method == "linear-ag":
            from ..methods.guidance import LinearAG

            plan = calibrate(own, LinearAG(), steps=steps, solver=SOLVER, schedule=SCHEDULE,
                             seeds=LINEAR_AG_SEEDS)
        elif method == "ag":
            from ..methods.guidance import AdaptiveGuidance

            plan = calibrate(own, AdaptiveGuidance(), steps=steps, solver=SOLVER, schedule=SCHEDULE,
                             seeds=AG_SEEDS)
        else:
            raise Unavailable(f"no plan recipe for {method!r}")
        self.folder.mkdir(parents=True, exist_ok=True)
        return save_plan(self.folder / (f"{method}-{steps}" + (f"-{solver}" if solver else "") + ".json"), plan)

    def resolve(self, spec: str, steps: int, solver: str | None = None) -> str:
        """Add ``plan=PATH`` to the specs of methods that need one."""
        name, _, rest = spec.partition(":")
        if name in ("block-cache", "linear-ag") or (name == "ag" and "threshold" not in rest and "plan" not in rest):
            path = self.plan(name, steps, solver)
            return f"{name}:plan={path}" + (f",{rest}" if rest else "")
        return spec


def hasten_config(pipe: HastenPipeline, specs: Sequence[str], steps: int, assets: HastenAssets | None
                  ) -> BenchConfig:
    specs = list(specs)

    def setup() -> Prepared:
        try:
            from ..specs import accelerate_from_specs
        except ImportError as e:
            raise Unavailable(f"hasten.api is not in this build ({e})") from None
        resolved = [assets.resolve(s, steps) if assets is not None else s for s in specs]
        own = copy_pipeline(pipe)
        handle = accelerate_from_specs(own, resolved, steps=steps, solver=SOLVER, schedule=SCHEDULE)
        return Prepared(sample=_sampler(own, steps), close=handle.disable, transformer=own.transformer)

    return BenchConfig(f"{' + '.join(specs)} @{steps}", "hasten", {"steps": steps, "specs": specs}, setup)


def diffusers_peer_config(pipe: HastenPipeline, kind: str, params: dict, steps: int) -> BenchConfig:
    if kind not in DIFFUSERS_KINDS:
        raise HastenError(f"unknown diffusers hook {kind!r}")
    shown = {k: v for k, v in params.items() if k != "calibration"}

    def setup() -> Prepared:
        own = copy_pipeline(pipe)
        ctx = install_diffusers_hook(own, kind, {**params, "steps": steps})
        return Prepared(sample=_sampler(own, steps), start_run=ctx.start_run, transformer=own.transformer)

    label = ",".join(f"{k}={v}" for k, v in shown.items())
    return BenchConfig(f"diffusers:{kind}" + (f":{label}" if label else "") + f" @{steps}", "peer",
                       {"steps": steps, "library": "diffusers", "method": kind, **shown}, setup)


def cache_dit_config(pipe: HastenPipeline, params: dict, steps: int) -> BenchConfig:
    def setup() -> Prepared:
        if cache_dit_version() is None:
            raise Unavailable("cache-dit is not installed (pip install 'hasten[bench]')")
        own = install_cache_dit(pipe, {**params, "steps": steps})
        return Prepared(sample=_sampler(own, steps), transformer=own.transformer)

    label = ",".join(f"{k}={v}" for k, v in params.items())
    return BenchConfig(f"cache-dit:dbcache:{label} @{steps}", "peer",
                       {"steps": steps, "library": f"cache-dit {cache_dit_version() or '(not installed)'}",
                        "method": "DBCache", **params}, setup)


def digits_configs(pipe: HastenPipeline, assets: HastenAssets | None, quick: bool = False,
                   peers: bool = True) -> list[BenchConfig]:
    """The benchmark's configurations on the digits model; the first is the reference (full-step CFG)."""
    full = 50
    if quick:
        cfgs = [baseline_config(pipe, full), baseline_config(pipe, 25), baseline_config(pipe, 15),
                hasten_config(pipe, ["block-cache:delta=0.2"], full, assets),
                hasten_config(pipe, ["ag:threshold=0.98"], full, assets),
                hasten_config(pipe, ["ag:threshold=0.98", "block-cache:delta=0.2"], 25, assets),
                hasten_config(pipe, ["ag:threshold=0.95"], 8, assets)]
        if peers:
            cfgs += [diffusers_peer_config(pipe, "first-block-cache", {"threshold": 0.1}, full),
                     cache_dit_config(pipe, {"threshold": 0.12, "Fn": 1, "Bn": 0, "warmup_steps": 8}, full)]
        return cfgs
    cfgs = [baseline_config(pipe, s) for s in (full, 25, 20, 15, 12, 10, 8, 6, 5, 4)]
    # Block Caching deltas per step count: the per-call change L1rel grows as steps shrink, so the same
    # share of reuse needs a larger delta (on the digits model, delta 0.05 / 0.1 / 0.2 / 0.3 at 50 steps
    # computes about 80 / 50 / 30 / 20 % of the blocks). AG thresholds: gamma starts near 0.93 on this
    # model, so 0.99 / 0.98 switch samples part-way and 0.95 switches most of them after one or two calls
    # (thresholds >= 0.999 never switch here and would only re-time the baseline).
    sweeps = ((full, (0.05, 0.1, 0.2, 0.3), (0.2,), (0.99, 0.98), (0.98, 0.2)),
              (25, (0.1, 0.2, 0.4), (0.2,), (0.98,), (0.98, 0.2)),
              (15, (0.15, 0.3), (), (0.98, 0.95), (0.95, 0.3)))
    for steps, deltas, ss_deltas, ags, (combo_ag, combo_delta) in sweeps:
        cfgs += [hasten_config(pipe, [f"block-cache:delta={d}"], steps, assets) for d in deltas]
        cfgs += [hasten_config(pipe, [f"block-cache:delta={d},scale_shift=1,train_steps=300"], steps, assets)
                 for d in ss_deltas]  # 300 Adam updates (1000 is the default) to fit the time budget
        cfgs += [hasten_config(pipe, [f"ag:threshold={t}"], steps, assets) for t in ags]
        cfgs += [hasten_config(pipe, ["linear-ag"], steps, assets),
                 hasten_config(pipe, [f"ag:threshold={combo_ag}", f"block-cache:delta={combo_delta}"], steps,
                               assets)]
    # AG on top of few steps: where the trajectories are nearly straight, only the combination can beat
    # the fewer-steps frontier
    for steps in (12, 10, 8, 6, 5, 4):
        cfgs += [hasten_config(pipe, [f"ag:threshold={t}"], steps, assets) for t in (0.98, 0.95)]
    if not peers:
        return cfgs
    for th in (0.05, 0.1, 0.2, 0.3):
        cfgs.append(diffusers_peer_config(pipe, "first-block-cache", {"threshold": th}, full))
    cfgs.append(diffusers_peer_config(pipe, "first-block-cache", {"threshold": 0.1}, 25))
    for interval, order in ((2, 1), (4, 2)):
        ts = {"cache_interval": interval, "max_order": order, "warmup_steps": 3}
        cfgs.append(diffusers_peer_config(pipe, "taylorseer-cache", ts, full))
    for th in (0.06, 0.24):
        mag = {"threshold": th, "max_skip": 3, "retention": 0.2, "calibration": {"samples": 20, "seed": 3000}}
        cfgs.append(diffusers_peer_config(pipe, "mag-cache", mag, full))
    cfgs.append(diffusers_peer_config(pipe, "faster-cache", {"skip_range": 2, "uncond_skip_range": 5}, full))
    cfgs.append(diffusers_peer_config(pipe, "pyramid-attention-broadcast", {"skip_range": 2}, full))
    db = {"Fn": 1, "Bn": 0, "warmup_steps": 8}
    for th in (0.08, 0.15, 0.3):
        cfgs.append(cache_dit_config(pipe, {"threshold": th, **db}, full))
    for th in (0.15, 0.3):
        cfgs.append(cache_dit_config(pipe, {"threshold": th, **db, "taylorseer": True}, full))
    cfgs.append(cache_dit_config(pipe, {"threshold": 0.2, "Fn": 1, "Bn": 0, "warmup_steps": 4}, 25))
    # the peers on top of fewer steps too, as hasten's methods are
    for th in (0.1, 0.2):
        cfgs.append(diffusers_peer_config(pipe, "first-block-cache", {"threshold": th}, 15))
    cfgs.append(cache_dit_config(pipe, {"threshold": 0.2, "Fn": 1, "Bn": 0, "warmup_steps": 3}, 15))
    return cfgs


# Guidance intervals (flow-matching sigma, 1 = noise) for ``--suite interval``. The paper's ImageNet-512 EDM2
# interval sigma_EDM in (0.28, 5.42] maps to (0.22, 0.84] by sigma_EDM = s / (1 - s) (rectified flow
# x_s = (1 - s) x + s e has the noise-to-signal ratio s / (1 - s)); beside it its two halves.
INTERVALS = ((0.22, 0.84), (0.0, 0.84), (0.22, 1.0))


def guidance_configs(pipe: Any, assets: HastenAssets, data: Any = None,
                     suite: str = "guidance") -> list[BenchConfig]:
    """``--suite guidance``: Adaptive Guidance and LinearAG at the run's guidance scale, 50 Euler steps.

    The reference is CFG; beside it: guidance off (what dropping guidance everywhere gives), AG and
    LinearAG with thresholds calibrated for 35 dB on calibration seeds (plans made first, untimed), and
    both at the paper's fixed threshold 0.991 (what a fixed number does on this model).
    ``--suite interval``: the same reference and guidance off, and guidance in the limited ``INTERVALS``
    (``GuidanceInterval``)."""
    full = 50
    if data is not None:  # text-to-image (shapes)
        from . import bench_shapes as bs

        base = [bs.baseline_config(pipe, data, full), bs.baseline_config(pipe, data, full, guidance="off")]

        def hc(specs: list[str]) -> BenchConfig:
            return bs.hasten_config(pipe, data, specs, full, assets)
    else:
        base = [baseline_config(pipe, full), baseline_config(pipe, full, guidance_scale=1.0)]

        def hc(specs: list[str]) -> BenchConfig:
            return hasten_config(pipe, specs, full, assets)
    if suite == "interval":
        return base + [hc([f"guidance-interval:lo={lo},hi={hi}"]) for lo, hi in INTERVALS]
    return base + [hc(["ag"]), hc(["linear-ag"]), hc(["ag:threshold=0.991"]),
                   hc(["linear-ag:threshold=0.991"])]


# --------------------------------------------------------------------------- scoring
class Scorer:
    """Quality metrics (``hasten.eval.metrics``); tests pass a stand-in with the same four methods."""

    def psnr(self, a: torch.Tensor, b: torch.Tensor) -> float:
        from .metrics import psnr

        return psnr(a, b)

    def ssim(self, a: torch.Tensor, b: torch.Tensor) -> float:
        from .metrics import ssim

        return ssim(a, b)

    def fd_digits(self, images: torch.Tensor) -> float:
        from .metrics import fd_to_held_out

        return fd_to_held_out(images)

    def class_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        from .metrics import class_accuracy

        return class_accuracy(images, labels)


def build_records(configs: Sequence[BenchConfig], measured: dict[str, Measurement], batches: Sequence[Batch],
                  scorer: Any, with_quality: bool = True, quality_reference: str | None = None) -> list[dict]:
    """One record per configuration (errors included). The first configuration is the speed reference
    (speedups are paired against it); PSNR/SSIM are against ``quality_reference`` (default: the first)."""
    ref = measured[configs[0].name]
    if ref.error is not None or not ref.times:
        raise HastenError(f"the reference configuration {configs[0].name!r} failed: {ref.error}")
    qref = measured[quality_reference or configs[0].name]
    if qref.error is not None or not qref.times:
        raise HastenError(f"the quality reference {qref.name!r} failed: {qref.error}")
    ref_images = torch.cat(qref.images)
    records = []
    for c in configs:
        m = measured[c.name]
        if m.error is not None or not m.times:
            records.append(new_record(c.name, c.family, c.params, setup_s=_round(m.setup_s, 1),
                                      error=m.error or "no timed batch"))
            continue
        vals: dict[str, Any] = {
            "wall_s_median": _round(statistics.median(m.times), 4),
            "speedup": _round(paired_speedup(ref.times, m.times), 4),
            "nfe": _round(m.nfe, 4), "block_evals": _round(m.block_evals, 4),
            "peak_rss_mb": _round(m.peak_rss_mb, 1), "setup_s": _round(m.setup_s, 1)}
        flexi = (m.report or {}).get("flexidit")
        if flexi:  # analytic transformer FLOPs over the full model's on the same calls
            vals["transformer_flops_share"] = flexi["compute_share"]
        if m.denoiser_times and len(m.denoiser_times) == len(m.times):
            vals.update(denoiser_s_median=_round(statistics.median(m.denoiser_times), 4),
                        denoiser_share=_round(sum(m.denoiser_times) / sum(m.times), 4) if sum(m.times) else None,
                        denoiser_speedup=_round(paired_speedup(ref.denoiser_times, m.denoiser_times), 4))
        if with_quality:
            images = torch.cat(m.images)
            bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
            if bad:  # e.g. a solver that diverges at few steps: a result to record, not to score
                records.append(new_record(c.name, c.family, c.params, **vals,
                                          error=f"non-finite output: {bad} of {images.shape[0]} images hold NaN/inf"))
                continue
            labels = torch.cat([b.labels for b in batches])[: images.shape[0]]
            vals.update(psnr=_round(scorer.psnr(images, ref_images[: images.shape[0]]), 4),
                        ssim=_round(scorer.ssim(images, ref_images[: images.shape[0]]), 5))
            if hasattr(scorer, "quality"):  # text-to-image: FD-shapes and adherence
                q = scorer.quality(images, labels)
                vals.update(fd_shapes=_round(q["fd_shapes"], 5), adherence=_round(q["adherence"], 4))
            else:
                vals.update(fd_digits=_round(scorer.fd_digits(images), 5),
                            class_accuracy=_round(scorer.class_accuracy(images, labels), 4))
        records.append(new_record(c.name, c.family, c.params, **vals))
    return records


def _round(v: float | None, nd: int) -> float | None:
    return None if v is None else round(float(v), nd)


# --------------------------------------------------------------------------- machine
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(), "diffusers": diffusers.__version__,
            "cache_dit": cache_dit_version(), "platform": platform.platform()}


# --------------------------------------------------------------------------- realistic size
REALISTIC_ARCH = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=4,
                      num_layers=28, sample_size=16, patch_size=2, num_embeds_ada_norm=1000,
                      norm_num_groups=32)
REALISTIC_STEPS = 4


@dataclass
class SharedConfig:
    """A configuration installed on a shared pipeline and removed after its run (for models too big to copy).

    ``install(pipe) -> (pipeline to sample with, per-run reset or None, uninstall)``.
    """

    name: str
    family: str
    params: dict
    install: Callable[[HastenPipeline], tuple[HastenPipeline, Callable[[], None] | None, Callable[[], None]]]


def realistic_configs(steps: int = REALISTIC_STEPS, num_blocks: int = 28, peers: bool = True
                      ) -> list[SharedConfig]:
    """The same methods at DiT-XL/2 size. Block Caching uses an explicit schedule (every block computed at
    calls 0, 2, 4, ... and the last) because calibrating a plan for a 750M-parameter model on 2 CPU cores
    does not fit the budget; overhead is read against the ideal given by the block-evaluation count."""
    every_other = [[n % 2 == 0 or n == steps - 1 for n in range(steps)] for _ in range(num_blocks)]

    def hasten_install(methods: Callable[[], list]) -> Callable:
        def install(pipe: HastenPipeline) -> tuple:
            from ..api import accelerate

            handle = accelerate(pipe, *methods())
            return pipe, None, handle.disable

        return install

    def block_cache() -> list:
        from ..methods.block_cache import BlockCache

        return [BlockCache(schedule=every_other)]

    def ag() -> list:
        from ..methods.guidance import AdaptiveGuidance

        return [AdaptiveGuidance(threshold=0.99)]

    def diffusers_install(kind: str, params: dict) -> Callable:
        def install(pipe: HastenPipeline) -> tuple:
            ctx = install_diffusers_hook(pipe, kind, {**params, "steps": steps})
            return pipe, ctx.start_run, ctx.remove

        return install

    def cache_dit_install(params: dict) -> Callable:
        def install(pipe: HastenPipeline) -> tuple:
            if cache_dit_version() is None:
                raise Unavailable("cache-dit is not installed (pip install 'hasten[bench]')")
            return install_cache_dit(pipe, {**params, "steps": steps}, copy_model=False), None, lambda: None

        return install

    cfgs = [SharedConfig(f"block-cache:schedule=every-other-call @{steps}", "hasten",
                         {"steps": steps, "method": "BlockCache(schedule=...)", "computed_calls": "0,2,4,...,last"},
                         hasten_install(block_cache)),
            SharedConfig(f"ag:threshold=0.99 @{steps}", "hasten", {"steps": steps, "specs": ["ag:threshold=0.99"]},
                         hasten_install(ag))]
    if peers:
        for kind, params in (("first-block-cache", {"threshold": 0.1}),
                             ("taylorseer-cache", {"cache_interval": 2, "max_order": 1, "warmup_steps": 2}),
                             ("pyramid-attention-broadcast", {"skip_range": 2}),
                             ("faster-cache", {"skip_range": 2, "uncond_skip_range": 5})):
            label = ",".join(f"{k}={v}" for k, v in params.items())
            cfgs.append(SharedConfig(f"diffusers:{kind}:{label} @{steps}", "peer",
                                     {"steps": steps, "library": "diffusers", "method": kind, **params},
                                     diffusers_install(kind, params)))
        db = {"threshold": 0.12, "Fn": 1, "Bn": 0, "warmup_steps": 2}
        cfgs.append(SharedConfig(f"cache-dit:dbcache:{','.join(f'{k}={v}' for k, v in db.items())} @{steps}",
                                 "peer", {"steps": steps, "library": f"cache-dit {cache_dit_version()}",
                                          "method": "DBCache", **db}, cache_dit_install(db)))  # last: no undo
    return cfgs


def run_shared(pipe: HastenPipeline, configs: Sequence[SharedConfig], steps: int, batch: Batch,
               timer: Callable[[], float] = time.perf_counter, progress: Callable[[str], None] | None = None
               ) -> list[dict]:
    """Records for ``configs`` installed in turn on ``pipe`` (the engine's :func:`run_in_turn` mode)."""

    def installer(c: SharedConfig) -> Callable[[], tuple[Prepared, Callable[[], None]]]:
        def install() -> tuple[Prepared, Callable[[], None]]:
            own, start, uninstall = c.install(pipe)
            return Prepared(sample=_sampler(own, steps), start_run=start), uninstall

        return install

    base_m, measured = run_in_turn(Prepared(sample=_sampler(pipe, steps)), [(c.name, installer(c)) for c in configs],
                                   batch, pipe.transformer, timer, progress)
    n = len(batch.labels)
    records = []
    for c in configs:
        m = measured[c.name]
        if m.error or not m.times:
            records.append(new_record(c.name, c.family, c.params, error=m.error))
            continue
        t = m.times[0]
        records.append(new_record(
            c.name, c.family, c.params, wall_s_median=_round(t, 4), speedup=_round(m.base_time / t, 4),
            nfe=_round(m.rows / n, 4), block_evals=_round(m.block_rows / n, 4), peak_rss_mb=_round(m.peak_rss_mb, 1)))
    ref = new_record(f"cfg @{steps}", "baseline", {"steps": steps, "guidance": "cfg"},
                     wall_s_median=_round(statistics.median(base_m.times), 4) if base_m.times else None,
                     speedup=1.0, nfe=_round(base_m.rows / n, 4), block_evals=_round(base_m.block_rows / n, 4),
                     peak_rss_mb=_round(base_m.peak_rss_mb, 1))
    return [ref, *records]


def run_realistic(peers: bool, progress: Callable[[str], None]) -> dict:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(**REALISTIC_ARCH).eval()
    pipe = HastenPipeline(transformer, guidance_scale=4.0, name="dit-xl2-random")
    n_params = sum(p.numel() for p in transformer.parameters())
    batch = make_batches(2, 2, 0, pipe.num_classes)[0]
    records = run_shared(pipe, realistic_configs(REALISTIC_STEPS, len(transformer.transformer_blocks), peers),
                         REALISTIC_STEPS, batch, progress=progress)
    del pipe, transformer
    return {"architecture": f"DiTTransformer2DModel at DiT-XL/2 size ({n_params / 1e6:.0f}M parameters, "
                            "28 blocks, width 1152), random weights, 16x16x4 latent (128 px), 2 samples, CFG",
            "config": REALISTIC_ARCH, "steps": REALISTIC_STEPS, "samples": 2,
            "note": "Overhead and memory only: random weights make quality meaningless. The methods are "
                    "installed on the one model in turn and removed after their run (cache-dit, which cannot "
                    "be removed, runs last); each run is paired with a baseline run just before it. Ideal "
                    "speedup from the work skipped: the baseline's block evals / the configuration's.",
            "records": records}


# --------------------------------------------------------------------------- the run
def check_args(out: Path, samples: int | None, batch_size: int | None, threads: int | None) -> None:
    check_out_folder(out)
    if samples is not None and samples < 10:
        raise HastenError(f"--samples must be >= 10, got {samples}")
    if batch_size is not None and batch_size < 1:
        raise HastenError(f"--batch-size must be >= 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise HastenError(f"--threads must be >= 1, got {threads}")
    parent = out.parent if str(out.parent) else Path(".")
    if not out.exists() and not parent.is_dir():
        raise HastenError(f"cannot create --out {out}: folder {parent} does not exist")


def _write_all(out: Path, results: dict) -> None:
    from .bench_report import plot_pareto, write_markdown
    from .bench_results import write_results

    write_results(out / "results.json", results)
    write_markdown(out / "results.md", results)
    plot_pareto(out / "pareto.png", results)


def run_bench(model: str, out: str | os.PathLike, quick: bool = False, samples: int | None = None,
              batch_size: int | None = None, seed: int | None = None, peers: bool = True, realistic: bool | None = None,
              threads: int | None = None, progress: Callable[[str], None] | None = None,
              configs: Sequence[BenchConfig] | None = None, scorer: Any = None,
              pipe: HastenPipeline | None = None, timer: Callable[[], float] = time.perf_counter,
              suite: str = "default", guidance_scale: float | None = None, flexi: Any = None,
              students: Any = None) -> dict:
    """Run the benchmark and write ``results.json``, ``results.md`` and ``pareto.png`` into ``out``.

    ``suite``: ``default`` (every method, solvers and peers), ``full`` (on ``shapes``, the default suite with
    finer step grids and more variants: :func:`hasten.eval.bench_shapes.shapes_configs`; elsewhere the
    default), ``guidance`` or ``interval`` (:func:`guidance_configs`);
    ``guidance_scale``: run every configuration (and calibrate every plan) at this scale instead of
    the model's default; ``flexi``: a flexified fine-tune of the model (a folder or embedded name from
    ``hasten flexify``, or the pipeline) whose FlexiDiT configurations join the default suite; for
    ``model="shapes"`` the embedded ``shapes-flexi`` by default (``"none"``: without FlexiDiT); ``students``:
    distilled students of the model (names or folders from ``hasten distill``), for ``model="shapes"`` the
    shipped students (:func:`hasten.distill.student.shipped_students`) by default (``"none"``: without);
    ``seed``: digits: batch k samples from seed ``seed + k`` (default 0); text-to-image: image i starts from
    the noise of :func:`hasten.eval.shapes_eval.image_noise_seed` (seed, i), default 1 (seed 0 is the noise
    ARD's trajectories start from, which a student is refused on)."""
    from ..distill.student import shipped_students
    from ..pipeline import load_pipeline

    out = Path(out)
    check_args(out, samples, batch_size, threads)
    say = progress or (lambda _m: None)
    if suite not in ("default", "full", "guidance", "interval"):
        raise HastenError(f"unknown suite {suite!r}: default | full | guidance | interval")
    broad = suite in ("default", "full")  # every family, not one method's study
    if threads is not None:
        torch.set_num_threads(threads)
    pipe = pipe if pipe is not None else load_pipeline(model)
    budget = QUICK if quick else SHAPES if hasattr(pipe, "encode_prompt") else FULL
    n = samples or budget.samples
    bs = min(batch_size or budget.batch_size, n)
    if guidance_scale is not None:
        if not (guidance_scale >= 1.0):
            raise HastenError(f"--cfg must be >= 1, got {guidance_scale}")
        pipe.default_guidance_scale = float(guidance_scale)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    quality_ref, convergence = None, None
    if hasattr(pipe, "encode_prompt"):  # text-to-image (shapes): see hasten.eval.bench_shapes
        from .bench_shapes import EvalSet, ShapesScorer, convergence_check, copy_shapes, shapes_configs

        seed = 1 if seed is None else seed
        data = EvalSet(pipe, n, seed)
        assets = HastenAssets(pipe, out / "plans", copier=copy_shapes)
        if configs is None:
            if flexi is None and model == "shapes" and broad and not quick:
                flexi = "shapes-flexi"  # the embedded FlexiDiT fine-tune of the embedded model
            if str(flexi).lower() == "none":
                flexi = None
            if isinstance(flexi, (str, os.PathLike)):
                flexi = load_pipeline(flexi)
                flexi.set_progress_bar_config(disable=True)
            if flexi is not None and guidance_scale is not None:  # --cfg applies to every configuration
                flexi.default_guidance_scale = float(guidance_scale)
            if students is None:
                students = shipped_students() if model == "shapes" and broad and not quick else []
            elif isinstance(students, str):
                students = [] if students.lower() == "none" else [s for s in students.split(",") if s]
            students = [load_pipeline(s) if isinstance(s, (str, os.PathLike)) else s for s in students]
            configs = (guidance_configs(pipe, assets, data, suite) if not broad
                       else shapes_configs(pipe, data, assets, quick, peers, flexi=flexi, students=students,
                                           every=suite == "full"))
        configs = list(configs)
        batches = make_batches(n, bs, seed, n)  # "labels" are indices into the evaluation captions
        warm = Batch(torch.arange(min(budget.warmup_samples, n)), seed)
        scorer = scorer if scorer is not None else ShapesScorer(data)
        realistic = False if realistic is None else realistic
        if broad and len(configs) > 1 and configs[1].params.get("role") == "quality-reference":
            quality_ref = configs[1].name
    else:
        seed = 0 if seed is None else seed
        assets = HastenAssets(pipe, out / "plans")
        if configs is None:
            configs = (guidance_configs(pipe, assets, suite=suite) if not broad
                       else digits_configs(pipe, assets, quick=quick, peers=peers))
        configs = list(configs)
        batches = make_batches(n, bs, seed, pipe.num_classes)
        warm = make_batches(budget.warmup_samples, budget.warmup_samples, seed + 10_000, pipe.num_classes)[0]
        used = {b.seed for b in batches} | {warm.seed}
        reserved = {*CALIBRATION_SEEDS, *LINEAR_AG_SEEDS, *AG_SEEDS, MAG_CALIBRATION_SEED}
        if used & reserved:  # the plans would be scored on the very samples they were calibrated on
            raise HastenError(f"--seed {seed}: the batches' seeds ({min(used)}..{max(used)}) overlap the calibration "
                              f"seeds {sorted(used & reserved)}; choose another --seed")
    measured = run_interleaved(configs, batches, warmup=warm, timer=timer, rss=RssSampler(), progress=say)
    if quality_ref is not None:  # reuses the images of the two references the interleaved runs made
        say("convergence check of the quality reference")

        euler50 = {"steps": 50, "solver": "euler", "guidance": "cfg"}

        def made(name: str) -> torch.Tensor | None:
            m = measured[name]
            return torch.cat(m.images) if m.error is None and m.images else None

        convergence = convergence_check(pipe, data, samples=4 if quick else 16, reference=made(quality_ref),
                                        euler=made(configs[0].name) if configs[0].params == euler50 else None)
    say("scoring")
    records = build_records(configs, measured, batches, scorer if scorer is not None else Scorer(),
                            quality_reference=quality_ref)
    levels = quality_levels(records, quality_ref or configs[0].name, samples=n)
    do_real = (budget.realistic and broad) if realistic is None else realistic
    results = {
        "schema": SCHEMA, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "model": model,
        "protocol": {"samples": n, "batch_size": bs, "reps": len(batches), "seed": seed,
                     "warmup_samples": budget.warmup_samples, "guidance_scale": pipe.default_guidance_scale,
                     "solver": SOLVER, "schedule": SCHEDULE, "reference": configs[0].name,
                     "quality_reference": quality_ref or configs[0].name, "convergence": convergence, "quick": quick,
                     "suite": suite,
                     "calibration_seeds": {"block-cache": list(CALIBRATION_SEEDS), "ag": list(AG_SEEDS),
                                           "linear-ag": [LINEAR_AG_SEEDS[0], LINEAR_AG_SEEDS[-1]]},
                     "total_wall_s": round(time.perf_counter() - t_start, 1)},
        "records": records, "quality_levels": levels, "realistic": None}
    _write_all(out, results)  # the digits results are safe on disk before the realistic-size check
    if do_real:
        say("realistic-size check")
        try:
            results["realistic"] = run_realistic(peers, say)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: keep the digits results, say why
            results["realistic"] = {"architecture": "DiT-XL/2 size", "error": error_text(e), "records": []}
        results["protocol"]["total_wall_s"] = round(time.perf_counter() - t_start, 1)
        _write_all(out, results)
    return results
