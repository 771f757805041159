"""Sampling throughput (images/s) and peak memory of an embedded model, end to end.

    python benchmarks/throughput.py --out benchmarks/results/throughput.json                 # digits: 1, 16, 64
    python benchmarks/throughput.py --model shapes --out benchmarks/results/throughput_shapes.json  # 1, 16

For ``shapes`` the time is end to end (text encoder + denoiser + VAE decode, as ``pipe(prompts)``
runs them) and ``denoiser_share`` is the share of it spent inside the transformer (timed by forward
hooks), beside the text encoder's and the VAE decoder's shares.

Each batch size runs in its own subprocess, timed by ``hasten bench``'s engine
(:func:`hasten.eval.bench_harness.run_interleaved`). ``peak_rss_mb`` is that process's peak resident
memory while sampling (the engine's sampler, every 2 ms); ``peak_extra_mb`` is that peak minus the
resident memory after the model was loaded and warmed up at batch 1, i.e. what sampling itself adds.
50 Euler steps with CFG (2 rows per image per step), median of ``--reps`` timed runs after one
untimed run at full size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def part_timers(pipe) -> dict[str, list[float]]:
    """Wall time spent in the text encoder, the transformer and the VAE decoder (forward hooks)."""
    acc: dict[str, list[float]] = {}
    for name, module in (("text_encoder", pipe.text_encoder), ("denoiser", pipe.transformer),
                         ("vae_decode", pipe.vae.decoder)):
        acc[name] = [0.0]
        start = [0.0]
        module.register_forward_pre_hook(lambda m, a, s=start: s.__setitem__(0, time.perf_counter()))
        module.register_forward_hook(lambda m, a, o, s=start, t=acc[name]: t.__setitem__(
            0, t[0] + time.perf_counter() - s[0]))
    return acc


def measure(batch: int, steps: int, reps: int, threads: int, model: str = "digits") -> dict:
    """One batch size, timed by ``hasten bench``'s engine (one configuration, ``reps`` repetitions after an
    untimed one at full size) with its RSS sampler."""
    import torch

    from hasten import load_pipeline
    from hasten.eval.bench_harness import Batch, BenchConfig, Prepared, RssSampler, run_interleaved

    torch.set_num_threads(threads)
    pipe = load_pipeline(model)
    text = hasattr(pipe, "encode_prompt")
    if text:
        from hasten.eval.shapes_eval import eval_scenes

        conds = [s.caption for s in eval_scenes(batch)]
        parts = part_timers(pipe)
        pipe(conds[:1], num_inference_steps=2)  # warm-up at batch 1
    else:
        conds = (torch.arange(batch) % 10).tolist()
        pipe([0], num_inference_steps=2)  # warm-up at batch 1
    base = rss_mb()
    shares = []

    def sample(inputs, gen):
        if text:
            for v in parts.values():
                v[0] = 0.0
        t0 = time.perf_counter()
        out = pipe(inputs, num_inference_steps=steps, generator=gen)
        if text:
            wall = time.perf_counter() - t0
            shares.append({k: v[0] / wall for k, v in parts.items()})
        return out.images if isinstance(getattr(out, "images", None), torch.Tensor) else torch.zeros(1)

    got = run_interleaved([BenchConfig(model, "baseline", {"batch": batch}, lambda: Prepared(sample))],
                          [Batch(conds, r) for r in range(1, reps + 1)], warmup=Batch(conds, 0),
                          rss=RssSampler(interval_s=0.002))[model]
    if got.error:
        raise RuntimeError(got.error)
    med = statistics.median(got.times)
    row = {"model": model, "batch": batch, "steps": steps, "wall_s_median": med, "images_per_s": batch / med,
           "peak_rss_mb": got.peak_rss_mb, "peak_extra_mb": got.peak_rss_mb - base, "reps": reps}
    if text:
        row["guidance_scale"] = pipe.default_guidance_scale
        timed = shares[1:]  # the first entry is the untimed warm-up
        for k in timed[0]:
            row[f"{k}_share" if k != "denoiser" else "denoiser_share"] = statistics.median(s[k] for s in timed)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="digits", help="digits | shapes")
    ap.add_argument("--batches", default=None, help="comma-separated (default: digits 1,16,64; shapes 1,16)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.steps, args.reps, args.threads, args.model)))
        return
    import torch

    rows = []
    batches = args.batches or ("1,16,64" if args.model == "digits" else "1,16")
    for batch in (int(b) for b in batches.split(",")):
        r = subprocess.run([sys.executable, __file__, "--one", str(batch), "--steps", str(args.steps),
                            "--reps", str(args.reps), "--threads", str(args.threads), "--model", args.model],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    what = ("end to end: text encoder + denoiser + VAE decode" if args.model == "shapes" else "denoiser")
    result = {"benchmark": f"sampling throughput, embedded {args.model} model, {args.steps} Euler steps, CFG, {what}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": {
                  "cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from hasten.io import write_json

    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
