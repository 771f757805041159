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


class GammaRecorder:
    """A call wrapper that records cos(v_c, v_u) per sample and call of plain CFG runs (no extra work)."""

    def __init__(self, pipe):
        self.layout = layout_for(pipe)
        self.runs: list[list[torch.Tensor]] = []

    def new_run(self) -> None:
        self.runs.append([])

    def __call__(self, inner, *a, **k):
        out = inner(*a, **k)
        if is_guidance_call(self.layout, a, k):
            s = out.sample
            u, c = self.layout.halves(s.shape[0] // 2)
            self.runs[-1].append(cosine_per_sample(s[u], s[c]))
        return out

    def profile(self) -> dict:
        """Mean and 5/50/95% quantiles of gamma per call over every recorded sample."""
        g = torch.cat([torch.stack(r) for r in self.runs if r], dim=1)  # (calls, samples)
        q = torch.quantile(g, torch.tensor([0.05, 0.5, 0.95], dtype=g.dtype), dim=1)
        return {"samples": g.shape[1], "mean": [round(float(v), 5) for v in g.mean(1)],
                "q05": [round(float(v), 5) for v in q[0]], "median": [round(float(v), 5) for v in q[1]],
                "q95": [round(float(v), 5) for v in q[2]]}


def cfg_handle(pipe, rec: GammaRecorder):
    h = accelerate(pipe)
    h.on_run_start(rec.new_run)
    h.wrap_call(rec, "gamma")
    return h


def make_configs(args, pipe, plans_dir: Path, rec: GammaRecorder) -> dict[str, Callable[[object], object]]:
    """name -> install(pipe_copy) returning a handle. Plans are calibrated when their config is set up
    (LinearAG last: its 200 calibration trajectories cost twice a 100-sample CFG run)."""

    def plan(kind: str) -> Path:
        path = plans_dir / f"guidance_{kind.replace('-', '_')}_{args.steps}.json"
        if not path.is_file() or args.recalibrate:
            t0 = time.perf_counter()
            if kind == "linear-ag":
                p = calibrate(pipe, LinearAG(threshold=args.lag_threshold), seeds=LINEAR_AG_SEEDS,
                              steps=args.steps)
            else:
                p = calibrate(pipe, BlockCache(delta=args.bc_delta), seeds=BLOCK_CACHE_SEEDS, steps=args.steps)
            p["calibration_s"] = round(time.perf_counter() - t0, 2)
            save_plan(path, p)
        return path

    configs: dict[str, Callable] = {"cfg": lambda p: cfg_handle(p, rec)}
    for thr in args.thresholds:
        configs[f"ag@{thr:g}"] = lambda p, thr=thr: accelerate(p, AdaptiveGuidance(thr))
    for d in args.bc_deltas:
        configs[f"ag@{args.ag_threshold:g}+block-cache@{d:g}"] = lambda p, d=d: accelerate(
            p, BlockCache(plan=plan("block-cache"), delta=d), AdaptiveGuidance(args.ag_threshold))
        if args.block_cache_alone:
            configs[f"block-cache@{d:g}"] = lambda p, d=d: accelerate(p, BlockCache(plan=plan("block-cache"),
                                                                                    delta=d))
    if not args.skip_linear_ag:
        configs[f"linear-ag@{args.lag_threshold:g}"] = lambda p: accelerate(
            p, LinearAG(plan=plan("linear-ag"), threshold=args.lag_threshold))
    return configs


def score(name: str, imgs: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, nfe: float, wall: float) -> dict:
    return {"config": name, "nfe": round(nfe, 3), "wall_s": round(wall, 3), "fd_digits": round(fd_to_held_out(imgs), 4),
            "class_accuracy": round(class_accuracy(imgs, labels), 4), "ssim_vs_cfg": round(ssim(imgs, ref), 4),
            "psnr_vs_cfg": round(psnr(imgs, ref), 2)}


def compare(rows: list[dict]) -> None:
    base = rows[0]
    for r in rows:
        r["nfe_saving"] = round(1 - r["nfe"] / base["nfe"], 4)
        r["speedup"] = round(base["wall_s"] / r["wall_s"], 3)
        if "cpu_s" in r and "cpu_s" in base:
            r["cpu_speedup"] = round(base["cpu_s"] / r["cpu_s"], 3)
        r["fd_ratio_vs_cfg"] = round(r["fd_digits"] / base["fd_digits"], 4)
        r["accuracy_drop_points"] = round(100 * (base["class_accuracy"] - r["class_accuracy"]), 2)
        r["within_quality_bounds"] = r["fd_ratio_vs_cfg"] <= 1.05 and r["accuracy_drop_points"] <= 1.0


def run(args, out_path: Path) -> dict:
    """Sample every configuration on the same seeds, batches interleaved; the JSON is rewritten after every
    configuration of the last batch, so a run cut short keeps what it measured."""
    torch.set_num_threads(args.threads)
    pipe = hasten.load_pipeline(args.model)
    rec = GammaRecorder(pipe)
    configs = make_configs(args, pipe, out_path.parent, rec)
    labels = eval_labels(args.samples)
    batches = [labels[i:i + args.batch_size] for i in range(0, args.samples, args.batch_size)]
    result = {"benchmark": "guidance", "model": args.model, "steps": args.steps, "solver": "euler",
              "schedule": "linear", "guidance_scale": pipe.default_guidance_scale, "samples": args.samples,
              "batch_size": args.batch_size, "seed": args.seed, "threads": args.threads,
              "fd_real_vs_real": round(real_vs_real_fd(), 4),
              "quality_bounds": {"fd_ratio_max": 1.05, "accuracy_drop_max_points": 1.0},
              "targets": {"ag_nfe_saving": 0.25, "linear_ag_nfe_saving": 0.35, "ag_block_cache_speedup": 2.0},
              "rows": [], "machine": {"platform": platform.platform(), "torch": torch.__version__},
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    pipes, handles = {}, {}
    images: dict[str, list[torch.Tensor]] = {n: [] for n in configs}
    wall = dict.fromkeys(configs, 0.0)
    cpu = dict.fromkeys(configs, 0.0)
    for k, lab in enumerate(batches):
        last = k == len(batches) - 1
        for name, make in configs.items():
            if name not in pipes:  # set up lazily (plans are calibrated here, not timed)
                pipes[name] = copy.deepcopy(pipe)
                handles[name] = make(pipes[name])
            print(f"batch {k + 1}/{len(batches)}: {name}", file=sys.stderr, flush=True)
            gen = torch.Generator().manual_seed(args.seed + k)
            t0, c0 = time.perf_counter(), time.process_time()
            res = pipes[name](lab, num_inference_steps=args.steps, generator=gen)
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
            images[name].append(res.images)
            if last:
                ref = torch.cat(images["cfg"])
                nfe = handles[name].report(log=False)["nfe"]
                result["rows"].append(score(name, torch.cat(images[name]), labels, ref, nfe, wall[name]))
                result["rows"][-1]["cpu_s"] = round(cpu[name], 3)
                compare(result["rows"])
                result["gamma_profile"] = rec.profile()
                write_json(out_path, result)
                handles[name].disable()
    return result


def timing(args, out_path: Path) -> dict:
    """Wall-clock only: ``--timing-reps`` interleaved repetitions (every configuration once per repetition,
    same labels and seed) of ``--samples`` images; speedup = median over repetitions of the paired ratio
    CFG time / configuration time. Plans are the ones the quality run made (or made here, not timed)."""
    import statistics

    torch.set_num_threads(args.threads)
    pipe = hasten.load_pipeline(args.model)
    configs = make_configs(args, pipe, out_path.parent, GammaRecorder(pipe))
    labels = eval_labels(args.samples)
    pipes = {n: copy.deepcopy(pipe) for n in configs}
    handles = {n: make(pipes[n]) for n, make in configs.items()}
    times: dict[str, list[float]] = {n: [] for n in configs}
    cpus: dict[str, list[float]] = {n: [] for n in configs}
    nfe = {}
    for name in configs:  # warm-up, not timed
        pipes[name](labels[:4], num_inference_steps=args.steps, generator=torch.Generator().manual_seed(99))
    for rep in range(args.timing_reps):
        for name in configs:
            print(f"rep {rep + 1}/{args.timing_reps}: {name}", file=sys.stderr, flush=True)
            handles[name].clear_report()
            t0, c0 = time.perf_counter(), time.process_time()
            pipes[name](labels, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
            times[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
            nfe[name] = handles[name].report(log=False)["nfe"]
    rows = []
    for name in configs:
        ratios = [c / t for c, t in zip(times["cfg"], times[name], strict=True)]
        cpu_ratios = [c / t for c, t in zip(cpus["cfg"], cpus[name], strict=True)]
        rows.append({"config": name, "nfe": nfe[name], "wall_s": [round(t, 3) for t in times[name]],
                     "wall_median_s": round(statistics.median(times[name]), 3),
                     "speedup_median": round(statistics.median(ratios), 3),
                     "speedup_min": round(min(ratios), 3), "speedup_max": round(max(ratios), 3),
                     "cpu_s": [round(t, 3) for t in cpus[name]],
                     "cpu_speedup_median": round(statistics.median(cpu_ratios), 3)})
        handles[name].disable()
    result = {"benchmark": "guidance-timing", "model": args.model, "steps": args.steps,
              "samples": args.samples, "reps": args.timing_reps, "threads": args.threads, "rows": rows,
              "machine": {"platform": platform.platform(), "torch": torch.__version__},
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    write_json(out_path, result)
    return result


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
    ap.add_argument("--skip-linear-ag", action="store_true")
    ap.add_argument("--block-cache-alone", action="store_true", help="also run Block Caching without AG")
    ap.add_argument("--out", default="benchmarks/results/guidance.json")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from an existing --out JSON")
    ap.add_argument("--timing-reps", type=int, default=0,
                    help="wall-clock only: this many interleaved repetitions, JSON to --out")
    args = ap.parse_args()
    if args.timing_reps:
        for r in timing(args, Path(args.out))["rows"]:
            print(f"{r['config']:32s} NFE {r['nfe']:6.2f}  median wall {r['wall_median_s']:7.2f}s  "
                  f"speedup x{r['speedup_median']:.2f} [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}]  "
                  f"CPU-time speedup x{r['cpu_speedup_median']:.2f}")
        return
    if args.plot_only:
        import json

        out = Path(args.out)
        plot(json.loads(out.read_text()), out.with_name(out.stem + "_sweep.png"))
        return
    out = Path(args.out)
    result = run(args, out)
    plot(result, out.with_name(out.stem + "_sweep.png"))
    for r in result["rows"]:
        print(f"{r['config']:32s} NFE {r['nfe']:6.2f} ({100 * r['nfe_saving']:5.1f}% saved)  "
              f"wall {r['wall_s']:7.2f}s (x{r['speedup']:.2f})  FD {r['fd_digits']:.3f} "
              f"(x{r['fd_ratio_vs_cfg']:.3f})  acc {r['class_accuracy']:.3f}  SSIM {r['ssim_vs_cfg']:.3f}")


if __name__ == "__main__":
    main()
