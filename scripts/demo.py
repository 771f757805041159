"""The demo behind ``bash scripts/demo.sh``: generate digits with the default model, then show the speed-up.

In one process, on the same labels and seeds, it samples with the plain pipeline and with an
accelerated one (interleaved repetitions, median wall time), writes both grids and prints the speed-up,
the denoiser evaluations per image (NFE) and the fidelity of the accelerated images to the plain ones.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import hasten
from hasten.api import accelerate_from_specs
from hasten.eval import psnr, ssim
from hasten.eval.metrics import class_accuracy

DEFAULT_ACCEL = ["block-cache:delta=0.2", "ag:threshold=0.98"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--per-label", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--accel", action="append", default=None, help="method spec (repeatable)")
    args = ap.parse_args()
    specs = args.accel or DEFAULT_ACCEL
    args.out.mkdir(parents=True, exist_ok=True)

    pipe = hasten.load_pipeline("digits")
    labels = torch.arange(10).repeat_interleave(args.per_label)

    def run(accelerated: bool) -> tuple[torch.Tensor, float, float]:
        gen = torch.Generator().manual_seed(0)
        if not accelerated:
            t0 = time.perf_counter()
            out = pipe(labels, num_inference_steps=args.steps, generator=gen)
            return out.images, time.perf_counter() - t0, out.nfe
        handle = accelerate_from_specs(pipe, specs, steps=args.steps)
        try:
            t0 = time.perf_counter()
            out = pipe(labels, num_inference_steps=args.steps, generator=gen)
            wall = time.perf_counter() - t0
            return out.images, wall, handle.report()["nfe"]
        finally:
            handle.disable()

    print(f"default model 'digits': {len(labels)} images, {args.steps} Euler steps, "
          f"guidance {pipe.default_guidance_scale}; accelerated with {' + '.join(specs)}")
    run(False)  # warm-up
    times = {False: [], True: []}
    for _ in range(args.reps):  # interleaved: A B A B ...
        for acc in (False, True):
            images, wall, nfe = run(acc)
            times[acc].append(wall)
            if acc:
                fast, fast_nfe = images, nfe
            else:
                base, base_nfe = images, nfe
    base_path = hasten.pipeline.save_grid(base, args.out / "grid.png", nrow=args.per_label)
    fast_path = hasten.pipeline.save_grid(fast, args.out / "grid_accelerated.png", nrow=args.per_label)
    tb, tf = statistics.median(times[False]), statistics.median(times[True])
    print(f"plain        {tb:6.2f} s  NFE/image {base_nfe:5.1f}  class accuracy "
          f"{class_accuracy(base, labels):.3f}  -> {base_path}")
    print(f"accelerated  {tf:6.2f} s  NFE/image {fast_nfe:5.1f}  class accuracy "
          f"{class_accuracy(fast, labels):.3f}  -> {fast_path}")
    print(f"speed-up {tb / tf:.2f}x (median of {args.reps} interleaved runs; the one-off Block Caching "
          "calibration is not timed); accelerated vs plain images "
          f"from the same seeds: PSNR {psnr(fast, base):.1f} dB, SSIM {ssim(fast, base):.4f}")


if __name__ == "__main__":
    main()
