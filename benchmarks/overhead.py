"""Overhead of hasten's hooks: Block Caching with a plan that recomputes every block (and Adaptive Guidance that
never switches) against no hooks at all, on the shipped models, timed by ``hasten bench``'s engine
(:func:`hasten.eval.bench_harness.run_interleaved`) in back-to-back pairs in ABBA order.

    python benchmarks/overhead.py                      # both models -> benchmarks/overhead/results.json
    python benchmarks/overhead.py --pairs 4 --out /tmp/overhead.json     # a quick check

Each repetition samples the same inputs with and without the hooks, in alternating order (A B, B A, ...),
so a drift of the machine's speed hits both members; the figure is the median of the per-pair ratios
T(hooks) / T(no hooks), with quartiles. Both configurations compute the same images (checked: bitwise),
so the ratio is the hooks' cost alone: one registry hook on the transformer and one per block, the
per-call plan check and the decision log. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
from pathlib import Path

import torch

import hasten
from hasten.eval.bench import machine_info
from hasten.eval.bench_harness import Batch, BenchConfig, Prepared, run_interleaved
from hasten.io import write_json

PROMPTS = ["a red circle", "two blue squares", "a small yellow triangle above a large green square",
           "three purple circles"]
MODELS = {"digits": {"steps": 50, "batch": 10}, "shapes": {"steps": 25, "batch": 2}}


def sampler(pipe, model: str, steps: int):
    def sample(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            if model == "digits":
                return pipe(labels.tolist(), num_inference_steps=steps, generator=gen).images
            return pipe([PROMPTS[i % len(PROMPTS)] for i in labels.tolist()], num_inference_steps=steps,
                        generator=gen, output_type="latent").images
    return sample


def measure(model: str, pairs: int) -> dict:
    steps, n = MODELS[model]["steps"], MODELS[model]["batch"]
    pipe = hasten.load_pipeline(model)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    plan = hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), steps=steps, seeds=(1000, 1001))
    smallest = min(v for c in plan["l1rel"] for v in c if v is not None)
    methods = (hasten.BlockCache(plan=plan, delta=smallest / 2), hasten.AdaptiveGuidance(threshold=2.0))
    hooked = copy.deepcopy(pipe)
    handle = hasten.accelerate(hooked, *methods)
    configs = [BenchConfig("no hooks", "baseline", {}, lambda: Prepared(sampler(pipe, model, steps))),
               BenchConfig("hooks", "hasten", {}, lambda: Prepared(sampler(hooked, model, steps)))]
    batches = [Batch(torch.arange(n), seed) for seed in range(pairs)]
    measured = run_interleaved(configs, batches, warmup=Batch(torch.arange(n), 10_000), order="abba",
                               progress=lambda msg: print(f"{model}: {msg}", file=sys.stderr))
    rep = handle.report(log=False)
    handle.disable()
    plain, hooks = measured["no hooks"], measured["hooks"]
    for m in (plain, hooks):
        if m.error:
            raise RuntimeError(f"{model} {m.name}: {m.error}")
    equal = all(torch.equal(a, b) for a, b in zip(plain.images, hooks.images, strict=True))
    assert equal and sum(rep["methods"]["block-cache"]["reused"]) == 0, "a recompute-everything plan must be exact"
    ratios = [h / p for h, p in zip(hooks.times, plain.times, strict=True)]
    q = statistics.quantiles(ratios, n=4)
    med = statistics.median(ratios)
    return {"steps": steps, "samples_per_run": n, "pairs": pairs, "median_ratio": round(med, 4),
            "quartiles": [round(q[0], 4), round(q[2], 4)], "overhead_pct": round(100 * (med - 1), 2),
            "bitwise_equal": equal, "blocks": len(plan["blocks"]), "calls_per_run": plan["calls"],
            "median_run_s": {"no hooks": round(statistics.median(plain.times), 4),
                             "hooks": round(statistics.median(hooks.times), 4)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,shapes")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/overhead/results.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = {m: measure(m, a.pairs) for m in a.models.split(",")}
    command = " ".join(["python", "benchmarks/overhead.py", *(argv if argv is not None else sys.argv[1:])])
    payload = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "command": command,
               "target": "median ratio within 1.02 (2%)", "results": results}
    write_json(Path(a.out), payload)
    print(f"wrote {a.out}: " + ", ".join(f"{m} {r['overhead_pct']:+.2f}%" for m, r in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
