"""``hasten bench --model shapes``: the benchmark on the text-to-image model, through the real pipeline.

Same harness and protocol as the digits bench (:mod:`hasten.eval.bench_harness`: every configuration
on its own copy of the transformer, interleaved repetitions, paired speed-ups against 50-step Euler
CFG); here the "labels" of a batch are indices into the held-out captions, and image i always starts
from its own noise (:func:`hasten.eval.shapes_eval.initial_noise`), whatever its batch. Times are end
to end (``pipe(prompts)``: text encoder, denoiser, VAE decode).

Quality per record: PSNR/SSIM against the reference's images, FD-shapes and prompt adherence
(``fd_shapes``, ``adherence``); the quality levels add the text-to-image gates (adherence at most 1
point below the reference, FD-shapes at most 5 % above), see
:func:`hasten.eval.bench_results.quality_levels`.

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
from collections.abc import Callable, Sequence

import torch

from .bench_harness import BenchConfig, Prepared, Unavailable

CALIBRATION_SAMPLES = 10


def copy_shapes(pipe):
    """A new pipeline around a deep copy of the transformer (and scheduler); VAE and text encoder shared
    (nothing installs on them)."""
    own = type(pipe)(transformer=copy.deepcopy(pipe.transformer), vae=pipe.vae,
                     scheduler=copy.deepcopy(pipe.scheduler), text_encoder=pipe.text_encoder,
                     tokenizer=pipe.tokenizer)
    own.default_guidance_scale, own.name = pipe.default_guidance_scale, pipe.name
    own.set_progress_bar_config(disable=True)
    return own


class EvalSet:
    """The held-out captions and each image's initial noise, indexed by the harness's "labels"."""

    def __init__(self, pipe, samples: int, seed: int):
        from .shapes_eval import eval_scenes, initial_noise

        self.scenes = eval_scenes(samples)
        self.prompts = [s.caption for s in self.scenes]
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


def baseline_config(pipe, data: EvalSet, steps: int, solver: str = "euler", guidance: str = "cfg") -> BenchConfig:
    def setup() -> Prepared:
        own = copy_shapes(pipe)
        own.scheduler = solver_scheduler(solver)
        gs = 1.0 if guidance == "off" else None
        return Prepared(sample=data.sampler(own, steps, gs), transformer=own.transformer)

    name = f"{'cfg' if guidance == 'cfg' else 'no-guidance'} @{steps}" + ("" if solver == "euler" else f" {solver}")
    return BenchConfig(name, "baseline", {"steps": steps, "solver": solver, "guidance": guidance}, setup)


def hasten_config(pipe, data: EvalSet, specs: Sequence[str], steps: int, assets) -> BenchConfig:
    specs = list(specs)

    def setup() -> Prepared:
        from ..specs import accelerate_from_specs

        resolved = [assets.resolve(s, steps) for s in specs]
        own = copy_shapes(pipe)
        handle = accelerate_from_specs(own, resolved, steps=steps)
        return Prepared(sample=data.sampler(own, steps), close=handle.disable, transformer=own.transformer)

    return BenchConfig(f"{' + '.join(specs)} @{steps}", "hasten", {"steps": steps, "solver": "euler",
                                                                    "specs": specs}, setup)


def peer_config(pipe, data: EvalSet, kind: str, params: dict, steps: int) -> BenchConfig:
    def setup() -> Prepared:
        import diffusers.hooks as H

        own = copy_shapes(pipe)
        tr = own.transformer
        now = [1000.0]
        tr.register_forward_pre_hook(
            lambda m, a, kw: now.__setitem__(0, float(torch.as_tensor(kw["timestep"]).flatten()[0])),
            with_kwargs=True)
        if kind == "first-block-cache":
            cfg = H.FirstBlockCacheConfig(threshold=float(params["threshold"]))
        elif kind == "taylorseer-cache":
            cfg = H.TaylorSeerCacheConfig(cache_interval=int(params["cache_interval"]),
                                          disable_cache_before_step=int(params.get("warmup_steps", 3)),
                                          max_order=int(params.get("max_order", 1)),
                                          taylor_factors_dtype=torch.float32)
        elif kind == "pyramid-attention-broadcast":
            cfg = H.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(params["skip_range"]),
                                                    spatial_attention_timestep_skip_range=(100, 800),
                                                    current_timestep_callback=lambda: now[0])
        elif kind == "mag-cache":
            cfg = H.MagCacheConfig(threshold=float(params["threshold"]), max_skip_steps=int(params.get("max_skip", 3)),
                                   retention_ratio=float(params.get("retention", 0.2)), num_inference_steps=steps,
                                   mag_ratios=mag_ratios(own, steps))
        else:
            raise Unavailable(f"no recipe for diffusers hook {kind!r}")
        tr.enable_cache(cfg)
        return Prepared(sample=data.sampler(own, steps), start_run=tr._reset_stateful_cache, transformer=tr)

    label = ",".join(f"{k}={v}" for k, v in params.items())
    return BenchConfig(f"diffusers:{kind}" + (f":{label}" if label else "") + f" @{steps}", "peer",
                       {"steps": steps, "solver": "euler", "library": "diffusers", "method": kind, **params}, setup)


def mag_ratios(pipe, steps: int) -> list[float]:
    """diffusers' MagCache calibration on a copy, on the calibration captions (not the bench's)."""
    from diffusers.hooks import MagCacheConfig

    from .bench_peers import parse_mag_ratios

    cal = copy_shapes(pipe)
    cal.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cal(cal.calibration_prompts(CALIBRATION_SAMPLES), num_inference_steps=steps, output_type="latent",
            generator=torch.Generator().manual_seed(3000))
    return parse_mag_ratios(buf.getvalue(), steps)


def shapes_configs(pipe, data: EvalSet, assets, quick: bool = False, peers: bool = True) -> list[BenchConfig]:
    """The configurations on ``shapes``; the first is the reference (50-step Euler CFG)."""
    full = 50
    if quick:
        cfgs = [baseline_config(pipe, data, full), baseline_config(pipe, data, 20),
                hasten_config(pipe, data, ["block-cache:delta=0.1"], full, assets)]
        if peers:
            cfgs.append(peer_config(pipe, data, "taylorseer-cache", {"cache_interval": 2}, full))
        return cfgs
    cfgs = [baseline_config(pipe, data, s) for s in (full, 30, 20, 15, 10)]
    cfgs += [baseline_config(pipe, data, s, "unipc-bh2") for s in (20, 10)]
    cfgs += [baseline_config(pipe, data, s, "dpm++2m") for s in (20, 10)]
    cfgs += [baseline_config(pipe, data, s, guidance="off") for s in (full, 20)]
    cfgs += [hasten_config(pipe, data, [f"block-cache:delta={d}"], full, assets) for d in (0.05, 0.1, 0.2)]
    cfgs += [hasten_config(pipe, data, ["block-cache:delta=0.1"], 20, assets)]
    cfgs += [hasten_config(pipe, data, [f"ag:threshold={t}"], full, assets) for t in (0.999, 0.99)]
    if peers:
        cfgs += [peer_config(pipe, data, "first-block-cache", {"threshold": 0.1}, full),
                 peer_config(pipe, data, "taylorseer-cache", {"cache_interval": 2}, full),
                 peer_config(pipe, data, "taylorseer-cache", {"cache_interval": 4, "max_order": 2}, full),
                 peer_config(pipe, data, "pyramid-attention-broadcast", {"skip_range": 2}, full),
                 peer_config(pipe, data, "mag-cache", {"threshold": 0.06}, full),
                 peer_config(pipe, data, "mag-cache", {"threshold": 0.24}, full)]
    return cfgs


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
