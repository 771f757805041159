"""Adaptive Guidance / LinearAG / AG + Block Caching on a hasten model: NFE, wall time, FD-digits, class
accuracy, SSIM and PSNR against the CFG images from the same seeds, plus an AG threshold sweep.

    python benchmarks/guidance.py --model digits --out benchmarks/results/guidance.json

One process; every configuration samples the same labels from the same seeds (batch k uses seed
``seed + k``), and the batches are interleaved (batch k of every configuration, then batch k + 1), so
machine load drifts hit all configurations alike. Each configuration has its own copy of the pipeline
(its own handle). Plans (LinearAG, Block Caching) are calibrated first on seeds the evaluation does not
use, and their cost is not timed. Writes the JSON table, and a sweep plot beside it (``*_sweep.png``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import hasten
from hasten.api import accelerate, calibrate
from hasten.eval.metrics import class_accuracy, eval_labels, fd_to_held_out, psnr, real_vs_real_fd, ssim
from hasten.io import write_json
from hasten.methods.block_cache import BlockCache
from hasten.methods.guidance import AdaptiveGuidance, LinearAG, cosine_per_sample, is_guidance_call, layout_for
from hasten.plans import save_plan

LINEAR_AG_SEEDS = tuple(range(2000, 2020))  # 20 seeds x 10 classes = 200 calibration trajectories
BLOCK_CACHE_SEEDS = (1000, 1001)


def gamma_profile(pipe, steps: int, samples: int, seed: int) -> dict:
    """cos(v_c, v_u) per call over ``samples`` full-CFG samples: mean and quantiles per call."""
    layout = layout_for(pipe)
    rows: list[torch.Tensor] = []

    def rec(inner, *a, **k):
        out = inner(*a, **k)
        if is_guidance_call(layout, a, k):
            s = out.sample
            u, c = layout.halves(s.shape[0] // 2)
            rows.append(cosine_per_sample(s[u], s[c]))
        return out

    h = accelerate(pipe)
    h.wrap_call(rec, "gamma")
    try:
        pipe(eval_labels(samples), num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    finally:
        h.disable()
    g = torch.stack(rows)  # (calls, samples)
    q = torch.quantile(g, torch.tensor([0.05, 0.5, 0.95], dtype=g.dtype), dim=1)
    return {"mean": [round(float(v), 5) for v in g.mean(1)], "q05": [round(float(v), 5) for v in q[0]],
            "median": [round(float(v), 5) for v in q[1]], "q95": [round(float(v), 5) for v in q[2]]}


def make_configs(args, pipe, plans_dir: Path) -> dict[str, Callable[[object], object]]:
    """name -> install(pipe_copy) returning a handle (or None for plain CFG)."""
    lag_plan = plans_dir / f"guidance_linear_ag_{args.steps}.json"
    if not lag_plan.is_file() or args.recalibrate:
        t0 = time.perf_counter()
        plan = calibrate(pipe, LinearAG(threshold=args.lag_threshold), seeds=LINEAR_AG_SEEDS, steps=args.steps)
        plan["calibration_s"] = round(time.perf_counter() - t0, 2)
        save_plan(lag_plan, plan)
    bc_plan = plans_dir / f"guidance_block_cache_{args.steps}.json"
    if not bc_plan.is_file() or args.recalibrate:
        save_plan(bc_plan, calibrate(pipe, BlockCache(delta=args.bc_delta), seeds=BLOCK_CACHE_SEEDS,
                                     steps=args.steps))
    configs: dict[str, Callable] = {"cfg": lambda p: None}
    for thr in args.thresholds:
        configs[f"ag@{thr:g}"] = lambda p, thr=thr: accelerate(p, AdaptiveGuidance(thr))
    configs[f"linear-ag@{args.lag_threshold:g}"] = lambda p: accelerate(
        p, LinearAG(plan=lag_plan, threshold=args.lag_threshold))
    for d in args.bc_deltas:
        configs[f"ag@{args.ag_threshold:g}+block-cache@{d:g}"] = lambda p, d=d: accelerate(
            p, BlockCache(plan=bc_plan, delta=d), AdaptiveGuidance(args.ag_threshold))
        configs[f"block-cache@{d:g}"] = lambda p, d=d: accelerate(p, BlockCache(plan=bc_plan, delta=d))
    return configs


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    pipe = hasten.load_pipeline(args.model)
    out_path = Path(args.out)
    configs = make_configs(args, pipe, out_path.parent)
    labels = eval_labels(args.samples)
    batches = [labels[i:i + args.batch_size] for i in range(0, args.samples, args.batch_size)]
    pipes = {name: copy.deepcopy(pipe) for name in configs}
    handles = {name: make(pipes[name]) for name, make in configs.items()}
    images: dict[str, list[torch.Tensor]] = {n: [] for n in configs}
    wall = dict.fromkeys(configs, 0.0)
    cfg_rows = 0.0
    for name in configs:  # warm-up (not timed)
        pipes[name](labels[:10], num_inference_steps=args.steps, generator=torch.Generator().manual_seed(99))
        if handles[name] is not None:
            handles[name].clear_report()
    for k, lab in enumerate(batches):
        print(f"batch {k + 1}/{len(batches)}", file=sys.stderr, flush=True)
        for name in configs:
            gen = torch.Generator().manual_seed(args.seed + k)
            t0 = time.perf_counter()
            res = pipes[name](lab, num_inference_steps=args.steps, generator=gen)
            wall[name] += time.perf_counter() - t0
            images[name].append(res.images)
            if name == "cfg":
                cfg_rows += res.nfe * len(lab)
    ref = torch.cat(images["cfg"])
    rows = []
    for name in configs:
        imgs = torch.cat(images[name])
        h = handles[name]
        nfe = h.report(log=False)["nfe"] if h is not None else cfg_rows / args.samples
        rows.append({"config": name, "nfe": round(nfe, 3), "wall_s": round(wall[name], 3),
                     "fd_digits": round(fd_to_held_out(imgs), 4),
                     "class_accuracy": round(class_accuracy(imgs, labels), 4),
                     "ssim_vs_cfg": round(ssim(imgs, ref), 4), "psnr_vs_cfg": round(psnr(imgs, ref), 2)})
        if h is not None:
            h.disable()
    base = rows[0]
    for r in rows:
        r["nfe_saving"] = round(1 - r["nfe"] / base["nfe"], 4)
        r["speedup"] = round(base["wall_s"] / r["wall_s"], 3)
        r["fd_ratio_vs_cfg"] = round(r["fd_digits"] / base["fd_digits"], 4)
        r["accuracy_drop_points"] = round(100 * (base["class_accuracy"] - r["class_accuracy"]), 2)
        r["within_quality_bounds"] = r["fd_ratio_vs_cfg"] <= 1.05 and r["accuracy_drop_points"] <= 1.0
    return {"benchmark": "guidance", "model": args.model, "steps": args.steps, "solver": "euler",
            "schedule": "linear", "guidance_scale": pipe.default_guidance_scale, "samples": args.samples,
            "batch_size": args.batch_size, "seed": args.seed, "threads": args.threads,
            "fd_real_vs_real": round(real_vs_real_fd(), 4),
            "quality_bounds": {"fd_ratio_max": 1.05, "accuracy_drop_max_points": 1.0},
            "targets": {"ag_nfe_saving": 0.25, "linear_ag_nfe_saving": 0.35, "ag_block_cache_speedup": 2.0},
            "gamma_profile": gamma_profile(pipe, args.steps, 100, args.seed + 500),
            "rows": rows, "machine": {"platform": platform.platform(), "torch": torch.__version__},
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in result["rows"] if r["config"].startswith("ag@") and "+" not in r["config"]]
    thr = [float(r["config"][3:]) for r in sweep]
    base = result["rows"][0]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, key, label in zip(axes.flat, ["nfe", "wall_s", "fd_digits", "class_accuracy", "ssim_vs_cfg"],
                              ["NFE per image", "wall time (s)", "FD-digits", "class accuracy", "SSIM vs CFG"],
                              strict=False):
        ax.plot(thr, [r[key] for r in sweep], "o-", label="AG")
        ax.axhline(base[key], color="gray", ls="--", label="CFG")
        ax.set_xlabel("AG threshold")
        ax.set_title(label)
        ax.legend(fontsize=8)
    g = result["gamma_profile"]
    ax = axes.flat[5]
    ax.plot(g["mean"], label="mean")
    ax.fill_between(range(len(g["q05"])), g["q05"], g["q95"], alpha=0.3, label="5-95%")
    ax.set_xlabel("denoiser call")
    ax.set_title("cos(v_c, v_u) under CFG")
    ax.legend(fontsize=8)
    fig.suptitle(f"Adaptive Guidance sweep, {result['model']}, {result['steps']} Euler steps, "
                 f"{result['samples']} samples")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--thresholds", type=float, nargs="+",
                    default=[0.98, 0.985, 0.99, 0.991, 0.993, 0.995, 0.997, 0.999])
    ap.add_argument("--ag-threshold", type=float, default=0.991, help="AG threshold combined with Block Caching")
    ap.add_argument("--lag-threshold", type=float, default=0.991, help="LinearAG's AG threshold (second half)")
    ap.add_argument("--bc-delta", type=float, default=0.5, help="delta the Block Caching plan is made with")
    ap.add_argument("--bc-deltas", type=float, nargs="+", default=[0.5])
    ap.add_argument("--recalibrate", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/guidance.json")
    args = ap.parse_args()
    result = run(args)
    out = Path(args.out)
    write_json(out, result)
    plot(result, out.with_name(out.stem + "_sweep.png"))
    for r in result["rows"]:
        print(f"{r['config']:32s} NFE {r['nfe']:6.2f} ({100 * r['nfe_saving']:5.1f}% saved)  "
              f"wall {r['wall_s']:7.2f}s (x{r['speedup']:.2f})  FD {r['fd_digits']:.3f} "
              f"(x{r['fd_ratio_vs_cfg']:.3f})  acc {r['class_accuracy']:.3f}  SSIM {r['ssim_vs_cfg']:.3f}")


if __name__ == "__main__":
    main()
