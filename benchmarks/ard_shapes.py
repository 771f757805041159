"""ARD on `shapes`: the 4-step students against their 25-step CFG teacher and against cheap baselines.

    python benchmarks/ard_shapes.py --ard shapes-ard4 --step-distill runs/ard/n0 --out benchmarks/ard_shapes

`--ard` is the ARD student (N lower blocks with history), `--step-distill` the N = 0 student trained with
the same data and budget (plain step distillation). Every configuration samples the same held-out
captions from the same initial noise, one after the other in one process:

- the teacher: 25 Euler steps with CFG (what the students were distilled from; the quality reference)
  and the 50-step Euler CFG default (the speed reference, 1.00x);
- the students (4 sequential passes, one branch: guidance is distilled in);
- the strongest cheap baselines: the teacher at 4 steps with UniPC (bh2) and DPM-Solver++(2M), with CFG
  (8 branch evaluations, twice the student's) and without (4, the student's), and UniPC at 2 steps
  with CFG (4 branch evaluations, the student's count).

Speed: end-to-end time per image (text encoding, sampling, VAE decoding) of the default and of each
student, measured interleaved on the same batch (median of rounds); the FLOPs of ARD over N = 0 come
from :func:`hasten.distill.ard.ard_flops`. Writes results.json and results.md.

FD degradation, two readings. The issue's: FD-shapes (against rendered scenes) student minus teacher. Here
CFG raises the teacher's own FD-shapes, so a student that drifts from its teacher can score below it and
the degradation has nothing to halve. The second reading measures what distillation loses directly,
against the 25-step teacher's images from the same captions and noise (:func:`hasten.eval.shapes_eval.fidelity`):
FD to the teacher's samples (0 for a perfect copy) and per-image PSNR. ``target_fd_half_of_n0_met`` is
decided on the first reading when it has a degradation to compare and on the second otherwise
(``fd_target_reading`` says which).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import torch

import hasten
from hasten.distill.ard import ard_flops
from hasten.distill.trajectories import check_eval_noise
from hasten.eval.bench import machine_info
from hasten.eval.bench_shapes import EvalSet, copy_shapes
from hasten.eval.shapes_eval import (
    bootstrap_mean,
    feature_stats,
    fidelity,
    generate_images,
    paired_bootstrap,
    rounded_difference,
    score_images,
)
from hasten.io import atomic_write, write_json
from hasten.plans import weights_hash


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ard", default="shapes-ard4")
    ap.add_argument("--step-distill", required=True,
                    help="the N = 0 student's folder, or 'none' (the ARD student against the teacher and the "
                         "baselines only; the N = 0 rows and comparisons are left out)")
    ap.add_argument("--out", default="benchmarks/ard_shapes")
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--resamples", type=int, default=1000, help="paired-bootstrap resamples for the intervals")
    ap.add_argument("--noise-seed", type=int, default=1, help="initial noise of the evaluation images; 0 (the "
                    "runs before 2026-12-05) reuses the noise of the students' training trajectories")
    args = ap.parse_args()
    teacher, ard = hasten.load_pipeline("shapes"), hasten.load_pipeline(args.ard)
    n0 = None if args.step_distill == "none" else hasten.load_pipeline(args.step_distill)
    students = {"ard": ard} | ({"n0": n0} if n0 is not None else {})
    check_eval_noise(args.noise_seed, list(students.values()))
    data = EvalSet(teacher, args.samples, seed=args.noise_seed)

    def sample(pipe, steps: int, guidance_scale: float | None = None) -> tuple[torch.Tensor, float]:
        return generate_images(pipe, data.prompts, steps, guidance_scale, batch_size=args.batch_size, noise=data.noise)

    configs = [("teacher: Euler 25, CFG", teacher, 25, None, 50),
               ("teacher: Euler 50, CFG (the default)", teacher, 50, None, 100),
               (f"ARD student, N={ard.student.layers_with_history}", ard, 4, None, 4)]
    if n0 is not None:
        configs.append(("step distillation (N=0 student)", n0, 4, None, 4))
    for solver, label in (("unipc-bh2", "UniPC"), ("dpm++2m", "DPM-Solver++")):
        own = copy_shapes(teacher, solver)
        configs += [(f"teacher: {label} 4, CFG", own, 4, None, 8), (f"teacher: {label} 4, no guidance", own, 4, 1.0, 4)]
    configs.append(("teacher: UniPC 2, CFG", copy_shapes(teacher, "unipc-bh2"), 2, None, 4))
    sample(ard, 4)  # warm-up
    rows, per_image, psnrs = [], {}, {}
    for name, pipe, steps, gs, nfe in configs:
        images, secs = sample(pipe, steps, gs)
        q = score_images(data.scenes, images, per_image=True)
        per_image[name] = q.pop("per_image")
        if name == configs[0][0]:  # the 25-step teacher: what fidelity is measured against
            teacher_images, to_teacher = images, feature_stats(per_image[name].features)
        psnrs[name], fd_to_teacher = fidelity(images, per_image[name].features, teacher_images, to_teacher)
        rows.append({"name": name, "steps": steps, "nfe": nfe, "fd_shapes": round(q["fd_shapes"], 4),
                     "adherence": round(q["adherence"], 4), "fd_to_teacher": round(fd_to_teacher, 4),
                     "psnr_vs_teacher": round(float(psnrs[name].mean()), 3),
                     "adherence_per_category": q["adherence_per_category"],
                     "wall_s": round(secs, 2), "s_per_image": round(secs / args.samples, 4)})
        print(f"{name:<40} NFE {nfe:3d}  FD {rows[-1]['fd_shapes']:8.3f}  adherence {rows[-1]['adherence']:.3f}  "
              f"FD to teacher {fd_to_teacher:7.3f}  {secs / args.samples * 1000:.1f} ms/image", flush=True)
    timing = interleaved_timing(data, teacher, students, args.batch_size, args.timing_rounds)
    by = {r["name"]: r for r in rows}
    t25 = by["teacher: Euler 25, CFG"]
    a = by[configs[2][0]]
    flops = ard_flops(ard.student, teacher.encode_prompt(data.prompts[:1])[0].shape[1], 16, 16)
    summary = {
        "teacher_fd": t25["fd_shapes"], "teacher_adherence": t25["adherence"],
        "ard_fd_degradation": round(a["fd_shapes"] - t25["fd_shapes"], 4),
        "ard_adherence_drop_points": round(100 * (t25["adherence"] - a["adherence"]), 2),
        "ard_extra_flops_over_n0": round(flops["extra_share"], 5),
        "ard_flops_per_image": flops["total"], "n0_flops_per_image": flops["step_distillation"],
        "speedup_ard_vs_default": timing["speedup"]["ard"],
        "ard_fd_to_teacher": a["fd_to_teacher"], "ard_psnr_vs_teacher": a["psnr_vs_teacher"],
        "ard_minus_teacher": rounded_difference(paired_bootstrap(per_image[a["name"]], per_image[t25["name"]],
                                                                 args.resamples)),
    }
    summary["target_adherence_within_5_points_met"] = summary["ard_adherence_drop_points"] <= 5.0
    summary["target_extra_flops_5pct_met"] = flops["extra_share"] <= 0.05
    cheap = [r for r in rows if r["name"].startswith("teacher:") and r["steps"] <= 4]
    summary["beats_every_cheap_baseline"] = {r["name"]: {"fd": a["fd_shapes"] < r["fd_shapes"],
                                                         "adherence": a["adherence"] > r["adherence"]} for r in cheap}
    if n0 is not None:
        summary |= n0_comparison(summary, per_image, psnrs, t25, a, by[configs[3][0]], args.resamples)
        summary["speedup_n0_vs_default"] = timing["speedup"]["n0"]
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "samples": args.samples, "noise_seed": args.noise_seed, "ard": str(args.ard),
           "step_distill": str(args.step_distill), "weights": weights_hash(ard.student),
           "layers_with_history": ard.student.layers_with_history, "kept_sigmas": ard.student.sigmas.tolist(),
           "guidance_scale": teacher.default_guidance_scale,
           "note": "quality: one run per configuration on the same held-out captions and noise; wall_s there is "
                   "sequential and indicative. Speed-ups: interleaved end-to-end timing (text encoding, sampling, "
                   "VAE decoding) of the same batch, median of rounds.",
           "summary": summary, "timing": timing, "records": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(markdown(res)))
    print(json.dumps(summary, indent=2))


def n0_comparison(summary: dict, per_image: dict, psnrs: dict, t25: dict, a: dict, s: dict, resamples: int) -> dict:
    """The N = 0 student's rows against the teacher and ARD, and the FD target (ARD's degradation at most
    half of N = 0's) on the reading that has a degradation to compare."""
    out = {"step_distillation_fd_degradation": round(s["fd_shapes"] - t25["fd_shapes"], 4),
           "step_distillation_adherence_drop_points": round(100 * (t25["adherence"] - s["adherence"]), 2)}
    for key, (x, y) in {"step_distillation_minus_teacher": (s, t25), "ard_minus_step_distillation": (a, s)}.items():
        out[key] = rounded_difference(paired_bootstrap(per_image[x["name"]], per_image[y["name"]], resamples))
    d_a, d_s = summary["ard_fd_degradation"], out["step_distillation_fd_degradation"]
    out["ard_degradation_over_n0"] = round(d_a / d_s, 4) if d_s > 0 else None
    f_a, f_s = a["fd_to_teacher"], s["fd_to_teacher"]
    out |= {"step_distillation_fd_to_teacher": f_s, "ard_fd_to_teacher_over_n0": round(f_a / f_s, 4),
            "step_distillation_psnr_vs_teacher": s["psnr_vs_teacher"]}
    fd_to = rounded_difference(paired_bootstrap(per_image[a["name"]], per_image[s["name"]], resamples,
                                                reference_features=per_image[t25["name"]].features))
    db = bootstrap_mean(psnrs[a["name"]] - psnrs[s["name"]], resamples)
    out["ard_minus_step_distillation_fidelity"] = {
        "fd_to_teacher": fd_to["fd"], "fd_to_teacher_ci95": fd_to["fd_ci95"],
        "psnr_vs_teacher_db": db["mean"], "psnr_vs_teacher_db_ci95": db["ci95"]}
    out["fd_target_reading"] = "fd_shapes" if d_s > 0 else "fd_to_teacher"
    out["target_fd_half_of_n0_met"] = bool(d_a <= 0.5 * d_s if d_s > 0 else f_a <= 0.5 * f_s)
    return out


def interleaved_timing(data: EvalSet, teacher, students: dict, batch: int, rounds: int) -> dict:
    """Median seconds per image, default (Euler 50, CFG) and each student alternating on one batch."""
    idx = torch.arange(batch)
    runs = {"default": data.sampler(teacher, 50), **{k: data.sampler(p, 4) for k, p in students.items()}}
    secs: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run(idx, None)
            secs[k].append((time.perf_counter() - t0) / batch)
    med = {k: statistics.median(v) for k, v in secs.items()}
    return {"batch": batch, "rounds": rounds, "s_per_image": {k: round(v, 5) for k, v in med.items()},
            "speedup": {k: round(med["default"] / med[k], 2) for k in students}}


def markdown(res: dict) -> str:
    s, seed = res["summary"], res.get("noise_seed", 0)
    seen = (": the students' training noise, so their rows are flattered" if seed == 0
            else ", noise no student trained on")
    lines = [f"# ARD on shapes ({res['date']}, {res['machine'].get('cpu', 'CPU')})", "",
             f"{res['samples']} held-out captions, same noise for every row (noise seed {seed}{seen}); FD-shapes "
             "lower is better.", "",
             "| configuration | NFE | FD-shapes | adherence | FD to the 25-step teacher |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['nfe']} | {r['fd_shapes']:.2f} | {r['adherence']:.3f} | "
              f"{max(0.0, r['fd_to_teacher']):.2f} |" for r in res["records"]]  # an FD is >= 0: clamp sqrtm round-off
    n0 = "step_distillation_fd_degradation" in s
    adherence = "met" if s["target_adherence_within_5_points_met"] else "not met"
    bootstrap = [f"- {k.replace('_', ' ')}: FD {v['fd']:+.2f} {v['fd_ci95']}, adherence {v['adherence_points']:+.2f} "
                 f"points {v['adherence_points_ci95']} (95% paired bootstrap)"
                 for k, v in s.items() if k.endswith(("minus_teacher", "minus_step_distillation"))]
    lines += [""]
    if n0:
        lines += [f"- FD degradation vs the 25-step teacher: ARD {s['ard_fd_degradation']:+.2f}, "
                  f"N=0 {s['step_distillation_fd_degradation']:+.2f} (ratio {s['ard_degradation_over_n0']})",
                  f"- FD to the 25-step teacher's samples (same captions and noise): ARD {s['ard_fd_to_teacher']:.3f}, "
                  f"N=0 {s['step_distillation_fd_to_teacher']:.3f} (ratio {s['ard_fd_to_teacher_over_n0']}); "
                  f"PSNR vs the teacher's images: ARD {s['ard_psnr_vs_teacher']:.2f} dB, "
                  f"N=0 {s['step_distillation_psnr_vs_teacher']:.2f} dB",
                  f"- FD target (ARD's degradation at most half of N=0's, read on {s['fd_target_reading']}): "
                  f"{'met' if s['target_fd_half_of_n0_met'] else 'not met'}",
                  f"- adherence drop: ARD {s['ard_adherence_drop_points']:.1f} points (target at most 5: {adherence}), "
                  f"N=0 {s['step_distillation_adherence_drop_points']:.1f} points"]
    else:
        lines += ["- no N = 0 student in this run (`--step-distill none`): the FD target is not evaluated",
                  f"- FD degradation vs the 25-step teacher: ARD {s['ard_fd_degradation']:+.2f}; FD to the teacher's "
                  f"samples {s['ard_fd_to_teacher']:.3f}, PSNR vs its images {s['ard_psnr_vs_teacher']:.2f} dB",
                  f"- adherence drop: ARD {s['ard_adherence_drop_points']:.1f} points (target at most 5: {adherence})"]
    speed = f"ARD {s['speedup_ard_vs_default']}x" + (f", N=0 {s['speedup_n0_vs_default']}x" if n0 else "")
    lines += [*bootstrap, f"- ARD's extra FLOPs over N=0: {100 * s['ard_extra_flops_over_n0']:.2f}%",
              f"- end-to-end speed-up over the 50-step CFG default: {speed}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
