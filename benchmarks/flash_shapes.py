"""Imagine Flash on `shapes`: the 1-, 2- and 3-step students against the 50-step CFG teacher and cheap baselines.

    python benchmarks/flash_shapes.py --flash shapes-flash --out benchmarks/flash_shapes \\
        --ablation "forward + SRL=runs/flash/fwd" --ablation "backward, no SRL=runs/flash/bwd_nosrl"

``--first-caption 800 --samples 1200 --noise-seed 7 --out benchmarks/flash_shapes/validation`` is the
validation set the training stages were compared on (captions and noise disjoint from the default run's).
``--head-to-head --first-caption 2000 --samples 4000 --noise-seed 11 --out benchmarks/flash_shapes/head_to_head``
runs only the 3-step student and the 3-step baselines, on captions no stage was chosen on, at a size where
FD-shapes differences of about 1 are resolved.

Every configuration samples the same held-out captions from the same initial noise, one after the other in
one process: the teacher (50 Euler steps with CFG, the quality and speed reference), each student at 1, 2
and 3 steps (one branch: guidance is distilled in), the ARD student at 4 steps when installed, and the
teacher at 3 steps with UniPC (bh2) and DPM-Solver++(2M), with and without guidance, and with guidance in
the interval the student's teacher was limited to (``--cfg-interval``; the student's own recipe as a
training-free baseline).

Besides adherence and FD-shapes, each record has ``diversity``: the mean RMS pixel distance (images in
[0, 1]) between two images of the same caption from two different initial noises, over the first
``--diversity-samples`` captions. A student that collapses to one image per caption has FD far above the
teacher's and diversity near 0; the teacher's own value is the reference. Noise correction has no row of
its own: for this velocity model it is the identity (``hasten.distill.flash``, tested bitwise), so "with"
and "without" are the same images. The 3-step student's differences to each 3-step baseline come with 95%
paired-bootstrap intervals (``hasten.eval.shapes_eval.paired_bootstrap``);
``clearly_better_than_every_3_step_baseline`` asks that both intervals exclude 0 in the student's favour.
Wall times are sequential (indicative). ``--carry-from`` keeps the
ablation rows of an earlier run (see :func:`carry_rows`). Writes results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
from pathlib import Path

import torch

import hasten
from hasten.distill.student import shipped_students
from hasten.eval.bench import machine_info
from hasten.eval.bench_shapes import EvalSet, copy_shapes
from hasten.eval.shapes_eval import generate_images, initial_noise, paired_bootstrap, rounded_difference, score_images
from hasten.io import write_json
from hasten.plans import weights_hash


def recipe(pipe) -> dict:
    """The training recipe a student folder records (its flash_config.json)."""
    keys = ("backward", "srl", "tau_min", "tau_max", "srl_noise", "teacher_steps", "step_draw", "init", "train_steps",
            "guidance_interval")
    older = {"srl_noise": "fresh", "teacher_steps": 1, "step_draw": "count"}  # folders from before an option
    try:
        cfg = json.loads((Path(pipe.model_dir) / "flash_config.json").read_text())
    except (AttributeError, OSError, ValueError):
        return {}
    return {k: cfg.get(k, older.get(k)) for k in keys}


def carry_rows(old: dict, rows: list[dict], samples: int) -> list[dict]:
    """``rows`` with the earlier run's ablation rows (student families not re-run here) inserted after this
    run's students, each marked ``carried_from``: the date of the run that sampled it (a row the earlier run
    had itself carried keeps its own date). Sampling is deterministic given
    the captions and the noise, so a row re-run would reproduce itself; the check is that the teacher's row
    does, to the digit, and that the caption count is the same."""
    old_teacher = next(r for r in old["records"] if r["family"] == "teacher")
    keys = ("fd_shapes", "adherence", "diversity")
    if old["samples"] != samples or any(old_teacher[k] != rows[0][k] for k in keys):
        raise SystemExit(f"--carry-from: the earlier run is not reproduced (samples {old['samples']} vs {samples}, "
                         f"teacher {[old_teacher[k] for k in keys]} vs {[rows[0][k] for k in keys]})")
    here = {r["family"] for r in rows}
    extra = [{**r, "carried_from": r.get("carried_from", old["date"])} for r in old["records"]
             if r["family"] not in here and r["family"] not in ("teacher", "ARD", "baseline")]
    cut = max(i for i, r in enumerate(rows) if r["family"] not in ("ARD", "baseline")) + 1
    return rows[:cut] + extra + rows[cut:]


def compare(rows: list[dict], per_image: dict, resamples: int) -> dict:
    """The summary: the 3-step student against the teacher (when run) and against each 3-step baseline, the
    latter with paired-bootstrap intervals."""
    three = next(r for r in rows if r["family"] == "Imagine Flash" and r["steps"] == 3)
    baselines = [r for r in rows if r["family"] == "baseline"]
    versus = {}
    for r in baselines:
        versus[r["name"]] = rounded_difference(paired_bootstrap(per_image[three["name"]], per_image[r["name"]],
                                                                resamples=resamples))
    best = min(baselines, key=lambda r: r["fd_shapes"])
    summary = {}
    if rows[0]["family"] == "teacher":
        ref = rows[0]
        drop = round(100 * (ref["adherence"] - three["adherence"]), 2)  # the flag is decided on the published figure
        summary = {"adherence_drop_points_3_steps": drop,
                   "fd_increase_3_steps": round(three["fd_shapes"] / ref["fd_shapes"] - 1, 4),
                   "target_adherence_within_5_points_met": drop <= 5,
                   "target_fd_within_25pct_met": three["fd_shapes"] <= 1.25 * ref["fd_shapes"],
                   "diversity_ratio_3_steps": round(three["diversity"] / ref["diversity"], 3),
                   "speedup_3_steps_sequential": round(ref["s_per_image"] / three["s_per_image"], 2)}
    summary |= {"best_3_step_baseline_by_fd": best["name"],
                "vs_best_baseline_fd": versus[best["name"]]["fd"],
                "vs_best_baseline_adherence_points": versus[best["name"]]["adherence_points"],
                "vs_each_3_step_baseline": versus,
                "better_than_every_3_step_baseline_on_both": all(
                    v["fd"] < 0 and v["adherence_points"] > 0 for v in versus.values()),
                "clearly_better_than_every_3_step_baseline": all(
                    v["fd_ci95"][1] < 0 and v["adherence_points_ci95"][0] > 0 for v in versus.values()),
                "bootstrap_resamples": resamples}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flash", default="shapes-flash", help="the main student (a model name or folder)")
    ap.add_argument("--ablation", action="append", default=[], metavar="LABEL=FOLDER",
                    help="another student for the ablation table (repeatable)")
    ap.add_argument("--out", default="benchmarks/flash_shapes")
    ap.add_argument("--samples", type=int, default=800,
                    help="held-out captions (two disjoint halves of 400 differed by up to 5 adherence points)")
    ap.add_argument("--first-caption", type=int, default=0,
                    help="skip this many held-out captions (a validation set disjoint from the default one)")
    ap.add_argument("--noise-seed", type=int, default=0, help="the initial noise's seed")
    ap.add_argument("--diversity-samples", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--carry-from", type=Path, default=None, metavar="RESULTS_JSON",
                    help="copy the ablation rows of an earlier run whose students are not re-run here (their "
                         "folders may be gone); refused unless that run had the same captions and noise and its "
                         "teacher row is reproduced exactly")
    ap.add_argument("--head-to-head", action="store_true",
                    help="only the main student at 3 steps and the 3-step baselines (no teacher: large --samples)")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the intervals")
    args = ap.parse_args()
    if args.head_to_head and (args.ablation or args.carry_from):
        raise SystemExit("--head-to-head runs the main student and the baselines only: drop --ablation/--carry-from")
    carried = json.loads(args.carry_from.read_text()) if args.carry_from else None
    teacher = hasten.load_pipeline("shapes")
    students = [("Imagine Flash", hasten.load_pipeline(args.flash))]
    for item in args.ablation:
        label, _, folder = item.partition("=")
        if not folder:
            raise SystemExit(f"--ablation needs LABEL=FOLDER, got {item!r}")
        students.append((label, hasten.load_pipeline(folder)))
    if args.noise_seed == 1:
        raise SystemExit("--noise-seed 1 is the diversity pass's own noise: choose another")
    data = EvalSet(teacher, args.first_caption + args.samples, seed=args.noise_seed)
    k = args.first_caption
    data.scenes, data.prompts, data.noise = data.scenes[k:], data.prompts[k:], data.noise[k:]
    nd = min(args.diversity_samples, args.samples)
    other_noise = initial_noise(teacher, nd, seed=1)

    def sample(pipe, steps: int, gs: float | None, prompts: list[str], noise: torch.Tensor, methods=()):
        with hasten.accelerate(pipe, *methods) if methods else contextlib.nullcontext():
            return generate_images(pipe, prompts, steps, gs, batch_size=args.batch_size, noise=noise)

    configs = [] if args.head_to_head else [("teacher: Euler 50, CFG", "teacher", teacher, 50, None, 100, {})]
    for label, pipe in students:
        configs += [(f"{label}, {k} step{'s' if k > 1 else ''}", label, pipe, k, None, k, recipe(pipe))
                    for k in ((3,) if args.head_to_head else (1, 2, 3))]
    if "shapes-ard4" in shipped_students() and not args.head_to_head:
        configs.append(("ARD student (shapes-ard4), 4 steps", "ARD", hasten.load_pipeline("shapes-ard4"), 4, None, 4,
                        {}))
    interval = recipe(students[0][1]).get("guidance_interval")
    for solver, label in (("unipc-bh2", "UniPC"), ("dpm++2m", "DPM-Solver++")):
        own = copy_shapes(teacher, solver)
        configs += [(f"teacher: {label} 3, CFG", "baseline", own, 3, None, 6, {}),
                    (f"teacher: {label} 3, no guidance", "baseline", own, 3, 1.0, 3, {})]
        if interval:  # guided (two branches) at the steps with lo < sigma <= hi
            own.scheduler.set_timesteps(3)
            guided = sum(interval[0] < float(t) / 1000 <= interval[1] for t in own.scheduler.timesteps)
            configs.append((f"teacher: {label} 3, CFG in ({interval[0]:g}, {interval[1]:g}]", "baseline", own, 3,
                            None, 3 + guided, {"guidance_interval": interval}))
    sample(students[0][1], 3, None, data.prompts[:50], data.noise[:50])  # warm-up
    rows, per_image = [], {}
    for name, family, pipe, steps, gs, nfe, params in configs:
        gi = params.get("guidance_interval") if family == "baseline" else None  # a student's is its recipe
        methods = [hasten.GuidanceInterval(*gi)] if gi else []
        images, secs = sample(pipe, steps, gs, data.prompts, data.noise, methods)
        again, _ = sample(pipe, steps, gs, data.prompts[:nd], other_noise, methods)
        q = score_images(data.scenes, images, per_image=True)
        per_image[name] = q["per_image"]
        diversity = (images[:nd] - again).pow(2).mean((1, 2, 3)).sqrt().mean().item()
        rows.append({"name": name, "family": family, "steps": steps, "nfe": nfe, **params,
                     "fd_shapes": round(q["fd_shapes"], 4), "adherence": round(q["adherence"], 4),
                     "diversity": round(diversity, 4), "adherence_per_category": q["adherence_per_category"],
                     "s_per_image": round(secs / args.samples, 4)})
        print(f"{name:<44} NFE {nfe:3d}  FD {rows[-1]['fd_shapes']:8.3f}  adherence {rows[-1]['adherence']:.3f}  "
              f"diversity {diversity:.4f}  {secs / args.samples * 1000:.1f} ms/image", flush=True)
    if carried is not None:
        rows = carry_rows(carried, rows, args.samples)
    summary = compare(rows, per_image, args.resamples)
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "samples": args.samples, "first_caption": args.first_caption, "noise_seed": args.noise_seed,
           "diversity_samples": nd, "flash": str(args.flash), "weights": weights_hash(students[0][1].student),
           "guidance_scale": teacher.default_guidance_scale,
           "noise_correction": "identity for the velocity-prediction shapes model (tested bitwise): no separate row",
           "note": "one run per configuration on the same held-out captions and noise; wall times sequential",
           "head_to_head": args.head_to_head, "summary": summary, "records": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
