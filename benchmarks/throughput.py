"""Sampling throughput (images/s) and peak memory of the default model at batch 1, 16 and 64.

    python benchmarks/throughput.py --out benchmarks/results/throughput.json

Each batch size runs in its own subprocess. ``peak_rss_mb`` is that process's peak resident memory
while sampling (a thread polls /proc every 2 ms); ``peak_extra_mb`` is that peak minus the resident
memory after the model was loaded and warmed up at batch 1, i.e. what sampling itself adds.
50 Euler steps with CFG (2 rows per image per step), median
of ``--reps`` timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(batch: int, steps: int, reps: int, threads: int) -> dict:
    import torch

    from hasten import load_pipeline

    torch.set_num_threads(threads)
    pipe = load_pipeline("digits")
    labels = torch.arange(batch) % 10
    pipe([0], num_inference_steps=2)  # warm-up at batch 1
    base = rss_mb()
    peak, done = [base], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    times = []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(r))
        if r:
            times.append(time.perf_counter() - t0)
    done.set()
    poller.join()
    peak = peak[0]
    med = statistics.median(times)
    return {"batch": batch, "steps": steps, "wall_s_median": med, "images_per_s": batch / med,
            "peak_rss_mb": peak, "peak_extra_mb": peak - base, "reps": reps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.steps, args.reps, args.threads)))
        return
    import torch

    rows = []
    for batch in (1, 16, 64):
        r = subprocess.run([sys.executable, __file__, "--one", str(batch), "--steps", str(args.steps),
                            "--reps", str(args.reps), "--threads", str(args.threads)],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    result = {"benchmark": "sampling throughput, default digits model, 50 Euler steps, CFG",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": {
                  "cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from hasten.io import write_json

    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
