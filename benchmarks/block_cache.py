"""Block Caching on the default model: speed, fidelity and the fewer-steps frontier, in one process.

    python benchmarks/block_cache.py                       # the recorded figures (see --help)
    python benchmarks/block_cache.py --quick               # a 1-2 minute smoke run

Protocol (issue 3):
- one model, 50 Euler steps, linear time grid, the model's CFG scale; every configuration samples the
  same evaluation set (labels 0..9 repeated, batch k from seed ``seed + k``), so PSNR/SSIM compare each
  image with the uncached 50-step image from the same noise;
- calibration uses other seeds (1000, 1001) and every class; one plan per step count, the schedule
  for each delta is derived from the plan's L1rel curves (Eq. 7);
- wall time: ``--reps`` interleaved repetitions by ``hasten bench``'s engine (every configuration on its
  own copy, installed once, once per repetition, in rotating order) on ``--time-samples`` samples;
  speedup = median over repetitions of T(uncached) / T(config)
  within the repetition (the machine's speed drifts between repetitions);
- overhead: a plan that recomputes every block (delta = 0) against no hooks at all, from
  ``--overhead-pairs`` adjacent pairs of short runs in ABBA order (the machine's speed drifts by
  tens of percent over minutes, so only back-to-back pairs resolve a few percent); the median ratio;
- realized vs ideal: ideal = T_full (1 - p k), with k the share of block evaluations skipped and p the
  share of the uncached wall time spent in blocks, measured as 1 - T(all blocks reused after call 0)
  / T_full;
- scale-shift: trained at ``--ss-delta`` on the cached model's own trajectories (seeds 3000+), then
  compared with plain caching at the same delta (per-block reuse error in ``measure`` mode and FD).
Writes ``--out`` (JSON) and, beside it, the plan, the change plot and the PSNR-vs-speedup plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import hasten
from hasten.eval import metrics as M
from hasten.io import atomic_write, write_json
from hasten.methods.block_cache import ideal_speedup, plot, schedule_from_changes
from hasten.plans import save_plan
from hasten.scale_shift import train_scale_shift

CAL_SEEDS = (1000, 1001)
TIMING_ONLY = ("recompute-all-50", "all-reused-after-call-0-50")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_method(plans: dict, steps: int, delta: float | None, ss: dict | None = None,
                measure: bool = False):
    if delta is None:
        return None
    return hasten.BlockCache(plan=plans[steps], delta=delta, scale_shift=ss if ss is not None else False,
                             measure=measure)


def sample(pipe, method, steps: int, samples: int, batch: int, seed: int):
    """Images, labels, the handle report (None without a method), (wall s, process CPU s)."""
    c0 = time.process_time()
    if method is None:
        images, labels, info = M.sample_eval_set(pipe, samples, steps, seed=seed, batch_size=batch)
        return images, labels, None, (info["wall_s"], time.process_time() - c0)
    with hasten.accelerate(pipe, method) as h:
        images, labels, info = M.sample_eval_set(pipe, samples, steps, seed=seed, batch_size=batch)
        rep = h.report(log=False)
    return images, labels, rep, (info["wall_s"], time.process_time() - c0)


def hidden_state_error(pipe, method, steps: int, samples: int, batch: int, seed: int) -> list[float]:
    """Per block: the relative L1 error of the accelerated model's block output against the UNCACHED
    model's output of the same block, both run on the accelerated trajectory's x_t (the teacher is an
    uncached copy called on the same arguments at every call), averaged over calls 1..T-1. Unlike the
    ``measure`` mode's reuse error (a reused residual against the block recomputed on the accelerated
    model's own, already perturbed input), this includes the error carried in from earlier blocks."""
    import copy

    teacher = copy.deepcopy(pipe.transformer)  # before accelerate: a plain, uncached copy
    blocks_s, blocks_t = pipe.transformer.transformer_blocks, teacher.transformer_blocks
    n = len(blocks_s)
    outs_s: list = [None] * n
    outs_t: list = [None] * n
    sums, calls = [0.0] * n, [0]
    hooks = [b.register_forward_hook(lambda _m, _a, o, i=i: outs_s.__setitem__(i, o)) for i, b in enumerate(blocks_s)]
    hooks += [b.register_forward_hook(lambda _m, _a, o, i=i: outs_t.__setitem__(i, o)) for i, b in enumerate(blocks_t)]

    def after(_mod, args, kwargs, _out):
        if calls[0] % steps != 0:  # call 0 of each run computes everything: no error by construction
            with torch.no_grad():
                teacher(*args, **kwargs)
            for i in range(n):
                sums[i] += float((outs_s[i] - outs_t[i]).abs().sum() / outs_t[i].abs().sum())
        calls[0] += 1

    hooks.append(pipe.transformer.register_forward_hook(after, with_kwargs=True))
    try:
        sample(pipe, method, steps, samples, batch, seed)
    finally:
        for h in hooks:
            h.remove()
    counted = calls[0] - calls[0] // steps
    return [round(x / counted, 6) for x in sums]


def engine_configs(pipe, named_methods: dict, steps_of: dict, samples: int, batch: int, seed: int) -> list:
    """One ``hasten bench`` engine configuration per name: its own copy of the pipeline with its method
    installed once (``None``: no hooks), sampling the first ``samples`` images of the evaluation set."""
    import copy

    from hasten.eval.bench_harness import BenchConfig, Prepared

    def make(name: str) -> BenchConfig:
        def setup() -> Prepared:
            own = copy.deepcopy(pipe)
            handle = hasten.accelerate(own, named_methods[name]) if named_methods[name] is not None else None
            return Prepared(sample=lambda _inputs, _gen: M.sample_eval_set(own, samples, steps_of[name], seed=seed,
                                                                           batch_size=batch)[0],
                            close=handle.disable if handle is not None else None)

        return BenchConfig(name, "hasten" if named_methods[name] is not None else "baseline", {}, setup)

    return [make(name) for name in named_methods]


def overhead_pairs(pipe, method, steps: int, pairs: int, samples: int, seed: int) -> dict:
    """T(hooks) / T(no hooks) over ``pairs`` back-to-back pairs of short runs, order ABBA (the engine's)."""
    from hasten.eval.bench_harness import Batch, run_interleaved

    cfgs = engine_configs(pipe, {"no hooks": None, "hooks": method}, {"no hooks": steps, "hooks": steps},
                          samples, samples, seed)
    got = run_interleaved(cfgs, [Batch(None, seed)] * pairs, order="abba")
    ratios = [h / p for h, p in zip(got["hooks"].times, got["no hooks"].times, strict=True)]
    cpu_ratios = [h / p for h, p in zip(got["hooks"].cpu_times, got["no hooks"].cpu_times, strict=True)]
    q = statistics.quantiles(ratios, n=4)
    return {"pairs": pairs, "samples": samples, "median_ratio": round(statistics.median(ratios), 4),
            "quartiles": [round(q[0], 4), round(q[2], 4)],
            "median_cpu_ratio": round(statistics.median(cpu_ratios), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--time-samples", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deltas", default="0.1,0.2,0.3,0.5,0.75,1.0,1.5,2.0")
    ap.add_argument("--fewer-steps", default="40,35,30,25,20,15,12,10")
    ap.add_argument("--compose-steps", default="25", help="step counts also run with caching")
    ap.add_argument("--compose-deltas", default="0.2,0.5")
    ap.add_argument("--ss-delta", type=float, default=0.5)
    ap.add_argument("--ss-train-steps", type=int, default=1000)
    ap.add_argument("--ss-method", choices=["adam", "lstsq"], default="adam")
    ap.add_argument("--ss-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--overhead-pairs", type=int, default=40)
    ap.add_argument("--overhead-samples", type=int, default=10)
    ap.add_argument("--err-samples", type=int, default=200, help="samples for the per-block reuse error")
    ap.add_argument("--configs", default="", help="run only these configurations (full-50 is always run); "
                    "with --reps 0: quality only (no timing, no per-block error, no plot)")
    ap.add_argument("--plot-speedup", choices=["speedup", "cpu_speedup"], default="speedup",
                    help="x axis of the frontier plot: wall-clock or process CPU time speedup")
    ap.add_argument("--out", default="benchmarks/results/block_cache.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes to check the script runs")
    a = ap.parse_args(argv)
    if a.quick:
        a.samples, a.batch, a.time_samples, a.reps, a.overhead_pairs = 40, 20, 20, 2, 4
        a.deltas, a.fewer_steps, a.compose_deltas, a.ss_train_steps = "0.5,1.5", "25", "0.5", 20
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    t_start = time.perf_counter()
    pipe = hasten.load_pipeline(a.model)
    steps = 50
    deltas = [float(d) for d in a.deltas.split(",") if d]
    fewer = [int(s) for s in a.fewer_steps.split(",") if s]
    compose = [int(s) for s in a.compose_steps.split(",") if s]
    only = {c for c in a.configs.split(",") if c}
    if only and a.reps:
        ap.error("--configs runs the quality pass only: add --reps 0")
    want_ss = not only or any(c.startswith("cache+ss") for c in only)
    compose_deltas = [float(d) for d in a.compose_deltas.split(",") if d]

    # ---------------------------------------------------------------- calibration
    plans = {}
    for s in sorted({steps, *compose}):
        t0 = time.perf_counter()
        plans[s] = hasten.calibrate(pipe, hasten.BlockCache(delta=a.ss_delta), steps=s, seeds=CAL_SEEDS)
        log(f"calibrated {s} steps in {time.perf_counter() - t0:.1f} s")
    plan_path = save_plan(Path(f"{stem}_plan.json"), plans[steps])
    plot(plans[steps], Path(f"{stem}_change.png"))
    ss_state, ss_info = {}, {"skipped": True}
    if want_ss:
        t0 = time.perf_counter()
        ss_state, ss_info = train_scale_shift(pipe, plans[steps], delta=a.ss_delta,
                                              train_steps=a.ss_train_steps, method=a.ss_method, lr=a.ss_lr,
                                              progress=None)
        ss_info["wall_s"] = round(time.perf_counter() - t0, 1)
        from safetensors.torch import save_file

        atomic_write(Path(f"{stem}_plan.scale_shift.safetensors"), lambda tmp: save_file(ss_state, tmp))
        log(f"scale-shift trained: {ss_info}")

    payload: dict = {
        "protocol": {"model": a.model, "steps": steps, "solver": "euler", "time_schedule": "linear",
                     "guidance_scale": pipe.default_guidance_scale, "samples": a.samples, "batch": a.batch,
                     "eval_seeds": f"{a.seed}+k per batch", "calibration_seeds": list(CAL_SEEDS),
                     "time_samples": a.time_samples, "reps": a.reps, "threads": a.threads,
                     "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                     "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "command": " ".join(["python", "benchmarks/block_cache.py", *(argv or sys.argv[1:])])},
        "plan": str(plan_path), "change_plot": f"{stem}_change.png",
        "scale_shift": {"delta": a.ss_delta, "train": ss_info}, "complete": False}

    def save() -> None:
        payload["total_wall_s"] = round(time.perf_counter() - t_start, 1)
        write_json(out, payload)

    save()

    # ---------------------------------------------------------------- configurations
    configs = [("full-50", steps, None, None), ("recompute-all-50", steps, 0.0, None)]
    configs += [(f"cache-50-d{d:g}", steps, d, None) for d in deltas]
    configs += [(f"cache+ss-50-d{a.ss_delta:g}", steps, a.ss_delta, ss_state)]
    configs += [(f"steps-{s}", s, None, None) for s in fewer]
    configs += [(f"cache-{s}-d{d:g}", s, d, None) for s in compose for d in compose_deltas]
    configs += [("all-reused-after-call-0-50", steps, 1e9, None)]  # measures the non-block share p
    if only:
        configs = [c for c in configs if c[0] in only or c[0] == "full-50"]

    # ---------------------------------------------------------------- quality (same seeds)
    results: dict[str, dict] = {}
    cpu_times: dict[str, float] = {}
    payload["results"] = results
    ref = None
    for name, s, d, ss in configs:
        t0 = time.perf_counter()
        # the two timing-only configurations are scored on the first err-samples batches: recompute-all
        # must equal the full run bitwise there, all-reused only measures the non-block share of the time
        n = a.samples if name not in TIMING_ONLY else min(a.samples, -(-a.err_samples // a.batch) * a.batch)
        images, labels, rep, (wall, cpu) = sample(pipe, make_method(plans, s, d, ss), s, n, a.batch, a.seed)
        if ref is None:
            ref = images
        cpu_times[name] = cpu * a.samples / n
        r = {"steps": s, "delta": d, "scale_shift": ss is not None, "quality_samples": n,
             "quality_pass_wall_s": round(wall, 3), "quality_pass_cpu_s": round(cpu, 3),
             "cpu_speedup_quality_pass": round(cpu_times["full-50"] / cpu_times[name], 4),
             "psnr_vs_full50": round(M.psnr(images, ref[:n]), 3) if name != "full-50" else None,
             "ssim_vs_full50": round(M.ssim(images, ref[:n]), 5) if name != "full-50" else None,
             "fd_digits": round(M.fd_to_held_out(images), 4) if n == a.samples else None,
             "class_accuracy": round(M.class_accuracy(images, labels), 4)}
        if name == "recompute-all-50":
            r["bitwise_equal_to_full"] = bool(torch.equal(images, ref[:n]))
        if rep is not None:
            bc = rep["methods"]["block-cache"]
            r.update(block_evals_skipped=bc["block_evals_skipped"], computed_per_block=bc["computed"],
                     reused_per_block=bc["reused"], nfe=rep["nfe"])
            if d is not None and d < 1e9:
                r["schedule_ideal_speedup"] = round(ideal_speedup(schedule_from_changes(plans[s]["l1rel"], d)), 4)
        results[name] = r
        save()
        log(f"{name}: {r} ({time.perf_counter() - t0:.1f} s)")

    if a.reps == 0:
        payload["complete"] = True
        save()
        log(f"wrote {out} (quality only)")
        return 0

    # ---------------------------------------------------------------- per-block error: ss vs plain
    n_err = min(a.samples, a.err_samples)
    reuse_err, hidden_err = {}, {}
    for label, ss in (("plain", None), ("scale_shift", ss_state)):
        _, _, rep, _ = sample(pipe, make_method(plans, steps, a.ss_delta, ss, measure=True), steps, n_err,
                              a.batch, a.seed)
        reuse_err[label] = rep["methods"]["block-cache"]["reuse_error"]
        hidden_err[label] = hidden_state_error(pipe, make_method(plans, steps, a.ss_delta, ss), steps, n_err,
                                               a.batch, a.seed)
    payload["scale_shift"].update(per_block_reuse_error=reuse_err, per_block_error_vs_uncached_model=hidden_err,
                                  per_block_reuse_error_samples=n_err)
    save()
    log(f"per-block reuse error at delta {a.ss_delta}: {reuse_err}")
    log(f"per-block error against the uncached model at delta {a.ss_delta}: {hidden_err}")

    # ---------------------------------------------------------------- overhead (back-to-back pairs)
    if a.overhead_pairs > 0:
        payload["overhead_pairs"] = overhead_pairs(pipe, make_method(plans, steps, 0.0), steps, a.overhead_pairs,
                                                   a.overhead_samples, a.seed)
        save()
        log(f"overhead pairs: {payload['overhead_pairs']}")

    # ---------------------------------------------------------------- timing (interleaved)
    # hasten bench's engine: every configuration on its own copy, installed once, in rotating order
    from hasten.eval.bench_harness import Batch, run_interleaved

    methods = {name: make_method(plans, s, d, ss) for name, s, d, ss in configs}
    timed = run_interleaved(engine_configs(pipe, methods, {name: s for name, s, *_ in configs}, a.time_samples,
                                           a.batch, a.seed), [Batch(None, a.seed)] * a.reps, order="rotate",
                            progress=lambda msg: log(f"timing {msg}"))
    for m in timed.values():
        if m.error:
            raise RuntimeError(f"{m.name}: {m.error}")
    times = {name: m.times for name, m in timed.items()}
    cpus = {name: m.cpu_times for name, m in timed.items()}
    # speedup = median over repetitions of the paired ratio T(full, rep) / T(config, rep): the machine's
    # speed drifts by tens of percent over minutes, which a ratio of medians would fold into the figure
    def paired(series: dict[str, list[float]], name: str) -> float:
        return statistics.median(f / c for f, c in zip(series["full-50"], series[name], strict=True))

    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpus.items()}
    p_blocks = 1 - 1 / paired(cpus, "all-reused-after-call-0-50")
    for name, _s, d, _ in configs:
        r = results[name]
        r["wall_s_median"] = round(med[name], 4)
        r["wall_s_all"] = [round(t, 4) for t in times[name]]
        r["speedup"] = round(paired(times, name), 4)
        r["cpu_s_median"] = round(cmed[name], 4)
        r["cpu_s_all"] = [round(t, 4) for t in cpus[name]]
        r["cpu_speedup"] = round(paired(cpus, name), 4)
        if "block_evals_skipped" in r and d is not None and d < 1e9:
            ideal = 1 / (1 - p_blocks * r["block_evals_skipped"])
            r["ideal_speedup_amdahl"] = round(ideal, 4)
            r["realized_over_ideal_cpu"] = round(r["cpu_speedup"] / ideal, 4)
            r["realized_over_ideal_wall"] = round(r["speedup"] / ideal, 4)
    overhead = 1 / paired(times, "recompute-all-50") - 1
    overhead_cpu = 1 / paired(cpus, "recompute-all-50") - 1

    # ---------------------------------------------------------------- frontier plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sp = a.plot_speedup
    fs = [(results[f"steps-{s}"][sp], results[f"steps-{s}"]["psnr_vs_full50"], s) for s in fewer]
    bc = [(results[f"cache-50-d{d:g}"][sp], results[f"cache-50-d{d:g}"]["psnr_vs_full50"], d) for d in deltas]
    fs.sort()
    bc.sort()
    ax.plot([x for x, _, _ in fs], [y for _, y, _ in fs], "o-", label="fewer steps (no cache)")
    for x, y, s in fs:
        ax.annotate(f"{s}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([x for x, _, _ in bc], [y for _, y, _ in bc], "s-", label="block caching @50 (delta sweep)")
    for x, y, d in bc:
        ax.annotate(f"d={d:g}", (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ss_name = f"cache+ss-50-d{a.ss_delta:g}"
    ax.plot([results[ss_name][sp]], [results[ss_name]["psnr_vs_full50"]], "*", ms=12,
            label=f"caching + scale-shift (d={a.ss_delta:g})")
    for s in compose:
        pts = sorted((results[f"cache-{s}-d{d:g}"][sp], results[f"cache-{s}-d{d:g}"]["psnr_vs_full50"])
                     for d in compose_deltas)
        ax.plot([x for x, _ in pts], [y for _, y in pts], "^--", label=f"caching @{s} steps")
    ax.set_xlabel(f"{'CPU-time' if sp == 'cpu_speedup' else 'wall-clock'} speedup over 50 uncached steps "
                  "(median of interleaved runs)")
    ax.set_ylabel("PSNR vs the 50-step images, same seeds (dB)")
    ax.set_title(f"{pipe.name}: block caching vs fewer steps ({a.samples} samples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    frontier = Path(f"{stem}_frontier.png")
    atomic_write(frontier, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)

    payload.pop("timings_partial", None)
    payload.update(frontier_plot=str(frontier), block_share_of_wall_time=round(p_blocks, 4),
                   overhead_recompute_all=round(overhead, 4), overhead_recompute_all_cpu=round(overhead_cpu, 4),
                   complete=True)
    save()
    log(f"wrote {out}; overhead {overhead:+.2%}, block share {p_blocks:.2f}")
    print(json.dumps({k: payload[k] for k in ("overhead_recompute_all", "block_share_of_wall_time")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
