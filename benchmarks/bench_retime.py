"""Re-time the per-level winners of a `hasten bench --model shapes` run on many paired rounds.

    python benchmarks/bench_retime.py --results benchmarks/bench_shapes/results.json --rounds 16 \
        --out benchmarks/bench_shapes/retime

The suite times its 66 configurations on 3 batches each, and on this 2-core machine configurations doing
identical work differ by up to 25% from run to run: a ratio under about 1.3x between two families is not
resolved by it. This script resolves the ones the README's table reports. From the suite's own figures
(nothing is re-scored) it takes, for each PSNR level (40, 35 and 30 dB against the converged reference) the
fastest configuration of each family that reaches it (hasten; fewer steps and guidance schedules, the
suite's ``baseline`` family; the peers), and for the distribution gate the suite's ``quality_levels`` entry
(FD-shapes within 5% of the reference and adherence within 1 point). It rebuilds exactly those
configurations (:func:`hasten.eval.bench_shapes.shapes_configs`, the same names; the calibrated plans are
made again and compared with the suite's files) and the 50-step Euler CFG speed reference, and times them
on ``--rounds`` batches of ``--batch-size`` captions, every configuration once per round in rotating order
(:func:`hasten.eval.bench_harness.run_interleaved`, order ``rotate``): end to end, text encoding to decoded
image. Per level and per other family: the per-round ratio t(other) / t(hasten), its median over rounds and
a 95% percentile-bootstrap interval of that median (rounds resampled). Writes results.json.

``--extra NAME`` times another configuration of the default suite beside them (FlexiDiT's with the embedded
``shapes-flexi``), reported by its speed-up over the reference; ``--no-levels`` times only the extras and the
reference. FlexiDiT's speed-up at the same solver and steps, so measured:

    python benchmarks/bench_retime.py --no-levels --extra "flexidit:compute=0.6 @50" \
        --out benchmarks/flexidit_shapes/retime
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import hasten
from hasten.distill.student import shipped_students
from hasten.eval.bench import HastenAssets, machine_info
from hasten.eval.bench_harness import Batch, make_batches, run_interleaved
from hasten.eval.bench_shapes import EvalSet, copy_shapes, shapes_configs
from hasten.eval.shapes_eval import bootstrap_interval
from hasten.io import write_json

PSNR_LEVELS = (40.0, 35.0, 30.0)
FAMILIES = ("hasten", "baseline", "peer")


def level_winners(suite: dict) -> list[dict]:
    """Per level, the name of the fastest configuration of each family in the suite's records (or None)."""
    reference = suite["protocol"]["quality_reference"]
    records = [r for r in suite["records"] if not r.get("error") and r.get("psnr") is not None
               and r["name"] != reference and r.get("speedup") is not None]
    levels = []
    for psnr in PSNR_LEVELS:
        best = {}
        for fam in FAMILIES:
            ok = [r for r in records if r["family"] == fam and r["psnr"] >= psnr]
            best[fam] = max(ok, key=lambda r: r["speedup"])["name"] if ok else None
        levels.append({"level": f"psnr>={psnr:g}", **best})
    gate = suite["quality_levels"][-1]  # the distribution gate: FD-shapes and adherence
    levels.append({"level": gate["level"], "hasten": (gate["hasten"] or {}).get("name"),
                   "baseline": (gate["fewer_steps"] or {}).get("name"), "peer": (gate["peer"] or {}).get("name")})
    return levels


def median_ci(ratios: np.ndarray, resamples: int) -> dict:
    """Median of per-round ratios with its 95% percentile-bootstrap interval (rounds resampled)."""
    lo, hi = bootstrap_interval(ratios, np.median, resamples)
    return {"median": round(float(np.median(ratios)), 4), "ci95": [round(lo, 4), round(hi, 4)],
            "rounds": len(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/bench_shapes/results.json", help="a hasten bench shapes run")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--extra", action="append", default=[], metavar="NAME",
                    help="another configuration of the default shapes suite to time (its name in results.json)")
    ap.add_argument("--levels", action=argparse.BooleanOptionalAction, default=True,
                    help="time the per-level winners (--no-levels: only --extra and the reference)")
    ap.add_argument("--out", default="benchmarks/bench_shapes/retime")
    args = ap.parse_args()
    suite = json.loads(Path(args.results).read_text())
    if suite["model"] != "shapes":
        raise SystemExit(f"{args.results} is a {suite['model']!r} run; this script re-times shapes runs")
    proto = suite["protocol"]
    if proto.get("quick") or proto.get("suite", "default") != "default":
        raise SystemExit(f"{args.results} is not a default-suite run (quick={proto.get('quick')}, "
                         f"suite={proto.get('suite')!r}): this script rebuilds the default suite's configurations")
    levels = level_winners(suite) if args.levels else []
    reference = proto["reference"]
    wanted = list(dict.fromkeys([reference, *(n for lv in levels for f in FAMILIES if (n := lv[f])), *args.extra]))
    pipe = hasten.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    if proto.get("guidance_scale") is not None and proto["guidance_scale"] != pipe.default_guidance_scale:
        raise SystemExit(f"{args.results} ran at guidance {proto['guidance_scale']}, not the model's "
                         f"{pipe.default_guidance_scale}")
    flexi = None
    if any("flexidit" in name for name in wanted):
        flexi = hasten.load_pipeline("shapes-flexi")
        flexi.set_progress_bar_config(disable=True)
    n = args.rounds * args.batch_size
    data = EvalSet(pipe, n, seed=proto.get("seed", 0))  # the suite's noise (what it scored; timing alone here)
    plans = Path(tempfile.mkdtemp(prefix="retime-plans-"))
    assets = HastenAssets(pipe, plans, copier=copy_shapes)
    students = [hasten.load_pipeline(st) for st in shipped_students() if any(st in name for name in wanted)]
    by_name = {c.name: c for c in shapes_configs(pipe, data, assets, peers=True, flexi=flexi, students=students)}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise SystemExit(f"not in the default shapes suite: {missing}")
    configs = [by_name[w] for w in wanted]
    batches = make_batches(n, args.batch_size, 0, n)
    measured = run_interleaved(configs, batches, warmup=Batch(torch.arange(2), 0), order="rotate",
                               progress=lambda m: print(m, flush=True))
    errors = {k: m.error for k, m in measured.items() if m.error}
    if errors:
        raise SystemExit(f"configurations failed: {errors}")
    suite_plans = Path(args.results).parent / "plans"
    same_plans = {p.name: (suite_plans / p.name).is_file() and
                  json.loads(p.read_text()) == json.loads((suite_plans / p.name).read_text())
                  for p in sorted(plans.glob("*.json"))}
    times = {k: np.array(m.times) for k, m in measured.items()}
    speedups = {k: median_ci(times[reference] / t, args.resamples) for k, t in times.items()}
    rows = []
    for lv in levels:
        row = {**lv, "speedup": {f: speedups[lv[f]] if lv[f] else None for f in FAMILIES}}
        if lv["hasten"]:
            row["hasten_vs"] = {f: median_ci(times[lv[f]] / times[lv["hasten"]], args.resamples)
                                for f in ("baseline", "peer") if lv[f]}
            if row["hasten_vs"]:
                row["hasten_vs_best_other"] = min(row["hasten_vs"].values(), key=lambda v: v["median"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "suite": {"results": args.results, "date": suite["date"]}, "rounds": args.rounds,
           "batch_size": args.batch_size, "order": "rotate", "reference": reference, "extra": args.extra,
           "plans_identical_to_suite": same_plans,
           "note": "end-to-end time per batch; ratios paired within a round; medians over rounds with 95% "
                   "percentile-bootstrap intervals; the level winners and their quality are the suite's",
           "seconds_per_batch": {k: [round(float(x), 3) for x in t] for k, t in times.items()},
           "speedup_vs_reference": speedups, "levels": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
