"""The demo behind ``bash scripts/demo.sh``: text-to-image with the embedded ``shapes`` model, plain and
accelerated side by side.

In one process, on the same prompts and noise, it samples with the plain pipeline and with an
accelerated copy through ``hasten bench``'s engine (interleaved repetitions, median wall time, end
to end: text encoder, denoiser and VAE decode), writes one PNG with the two grids side by side
(plain left, accelerated right), and prints the speed-up, the denoiser rows per image (NFE), the
prompt adherence of both and the fidelity (PSNR/SSIM) of the accelerated images to the plain ones.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import hasten
from hasten.eval.bench_harness import Batch, BenchConfig, Prepared, run_interleaved
from hasten.eval.metrics import psnr, ssim
from hasten.eval.shapes_eval import eval_scenes, initial_noise, score_images
from hasten.pipeline import make_grid, save_grid
from hasten.specs import configs_from_specs

DEFAULT_ACCEL = ["block-cache:delta=0.1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--images", type=int, default=32, help="held-out captions to draw")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--accel", action="append", default=None, help="method spec (repeatable)")
    args = ap.parse_args()
    specs = args.accel or DEFAULT_ACCEL
    args.out.mkdir(parents=True, exist_ok=True)

    pipe = hasten.load_pipeline("shapes")
    scenes = eval_scenes(args.images)
    prompts = [s.caption for s in scenes]
    noise = initial_noise(pipe, len(prompts), seed=0)
    print(f"default model 'shapes': {len(prompts)} held-out captions, {args.steps} Euler steps, guidance "
          f"{pipe.default_guidance_scale}; accelerated with {' + '.join(specs)}")
    t0 = time.perf_counter()
    configs = configs_from_specs(pipe, specs, steps=args.steps)  # calibrates once where a spec needs it
    print(f"(calibration, once and not timed: {time.perf_counter() - t0:.1f} s)")

    # hasten bench's engine: each configuration on its own copy of the pipeline, installed once, warmed up,
    # then timed in interleaved repetitions (A B, A B, ...) on the same prompts and noise
    fast_pipe = copy.deepcopy(pipe)
    handle = hasten.accelerate(fast_pipe, *configs)

    def sampler(p):
        return lambda prompts_, _gen: p(prompts_, num_inference_steps=args.steps, latents=noise,
                                        output_type="pt").images

    measured = run_interleaved(
        [BenchConfig("plain", "baseline", {}, lambda: Prepared(sampler(pipe))),
         BenchConfig("accelerated", "hasten", {"accel": specs}, lambda: Prepared(sampler(fast_pipe)))],
        [Batch(prompts, 0)] * args.reps, warmup=Batch(prompts, 0), order="abba")
    for m in measured.values():
        if m.error:
            raise SystemExit(f"error: {m.name}: {m.error}")
    base, fast = measured["plain"].images[-1], measured["accelerated"].images[-1]
    # transformer rows per image and run (a CFG step counts 2), from hasten's report
    rep = handle.report(log=False)
    fast_nfe, base_nfe = rep["nfe"], 2 * args.steps
    handle.disable()
    times = {False: measured["plain"].times, True: measured["accelerated"].times}
    side = torch.cat([make_grid(base, nrow=8), torch.ones(3, make_grid(base, nrow=8).shape[1], 6),
                      make_grid(fast, nrow=8)], dim=2)
    path = save_grid(side[None], args.out / "demo_side_by_side.png", nrow=1, scale=3)
    (args.out / "demo_prompts.txt").write_text("\n".join(prompts) + "\n")
    q_base, q_fast = score_images(scenes, base), score_images(scenes, fast)
    tb, tf = statistics.median(times[False]), statistics.median(times[True])
    speedup = statistics.median(b / f for b, f in zip(times[False], times[True]))  # paired per repetition
    print(f"plain        {tb:6.2f} s  NFE/image {base_nfe:5.1f}  adherence {q_base['adherence']:.3f}")
    print(f"accelerated  {tf:6.2f} s  NFE/image {fast_nfe:5.1f}  adherence {q_fast['adherence']:.3f}")
    print(f"speed-up {speedup:.2f}x end to end (median of {args.reps} paired runs, ABBA order); accelerated vs plain "
          f"images from the same noise: PSNR {psnr(fast, base):.1f} dB, SSIM {ssim(fast, base):.4f}")
    print(f"wrote {path} (plain left, accelerated right; prompts in {args.out / 'demo_prompts.txt'})")


if __name__ == "__main__":
    main()
