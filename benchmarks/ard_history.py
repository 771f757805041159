"""ARD students side by side against their 25-step CFG teacher, with paired-bootstrap intervals.

    python benchmarks/ard_history.py --samples 1200 --out benchmarks/ard_shapes/own_history \
        --student shipped=shapes-ard4 --student "teacher-forced +300=runs/ard/ft_tf" \
        --student "own history +300=runs/ard/ft_own"

Also the second-stage run (``--init`` plus 1000 steps on twice the trajectories, N = 2 and N = 0 alike;
``runs/ard/stage1_shipped`` is the stage-1 ``shapes-ard4`` folder, ``runs/ard/x2_ard`` the shipped stage 2):

    python benchmarks/ard_history.py --samples 1200 --out benchmarks/ard_shapes/longer \
        --student "N=2 stage 1 (1000 steps)=runs/ard/stage1_shipped" --student "N=0 stage 1 (1000 steps)=runs/ard/n0" \
        --student "N=2 stage 2 (shapes-ard4)=runs/ard/x2_ard" --student "N=0 stage 2=runs/ard/x2_n0"

And the two conventions at stage 1's recipe (``hasten distill ard ... --convention x0``, after ``hasten distill
add-x0``; ``runs/ard/state_ard_s1`` holds the stage-1 ``shapes-ard4`` of git d236590), on fresh noise:

    python benchmarks/ard_history.py --samples 1200 --out benchmarks/ard_shapes/x0_convention \
        --student "N=2, states=runs/ard/state_ard_s1" --student "N=0, states=runs/ard/n0_s1" \
        --student "N=2, x0=runs/ard/x0c_ard_s1" --student "N=0, x0=runs/ard/x0c_n0_s1"

And the third stage (the same recipe on 20000 trajectories, ``--init shapes-ard4`` from the stage-2 student,
whose weights ``runs/ard/x2_ard`` holds), on noise no student trained on:

    python benchmarks/ard_history.py --samples 1200 --out benchmarks/ard_shapes/stage3 \
        --student "stage 2=runs/ard/x2_ard" --student "stage 3=runs/ard/x3_ard" \
        --student "stage 4=runs/ard/x4_ard"   # 1000 more steps from stage 3 (--init runs/ard/x3_ard)

And the paper's GAN fine-tune (``hasten distill ard --init shapes-ard4 --steps 400 --lr 1e-4 --warmup 20 --gan-weight
L --gan-start 100``) against the same 400 steps without it (no ``--gan-weight``):

    python benchmarks/ard_history.py --samples 1200 --out benchmarks/ard_shapes/gan \
        --student "shapes-ard4 (stage 2)=shapes-ard4" --student "+400 steps, MSE only=runs/ard/ft400" \
        --student "+400 steps, GAN (lambda 10, from step 100)=runs/ard/gan10"   # gan_mid: 2, gan_small: 0.5

Made to measure the own-history fine-tune
(``hasten distill ard --own-history P --init shapes-ard4``, on the stage-1 student) against the same
fine-tune teacher-forced (the paper's recipe, same data, steps and seed): the one difference is
where the groups' inputs come from, so a gap between those two is the effect of training on the student's
own history. Every configuration samples the held-out captions of the ARD bench (its first 400 captions
are the bench's) from the same noise. Reported per student: adherence and FD-shapes; each student minus
the teacher, and each student minus every student listed before it, with 95% paired-bootstrap intervals
(captions resampled together). Writes results.json.

Fidelity to the teacher, what distillation itself degrades (FD-shapes against rendered scenes cannot show
it here: CFG costs the teacher FD-shapes, so a student can drift from the teacher and still score better):

- ``psnr_vs_teacher``: mean per-image PSNR (dB) of the student's image against the teacher's image from the
  same caption and noise. The students learn the teacher's map from noise to image, so this is their error.
- ``fd_to_teacher``: FD between the student's scene-encoder features and the teacher's (its statistics
  held fixed in the bootstrap, as the rendered scenes' are for FD-shapes); 0 for a perfect copy.
  For scale, the row ``teacher, other noise``: the teacher on the same captions from other noise (the next noise seed),
  an exact sampler of the teacher's distribution that does not reproduce its images.

(:func:`hasten.eval.shapes_eval.fidelity`; ``benchmarks/ard_shapes.py`` records the same two measures.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import hasten
from hasten.distill.trajectories import check_eval_noise
from hasten.eval.bench import machine_info
from hasten.eval.bench_shapes import EvalSet
from hasten.eval.shapes_eval import (
    bootstrap_mean,
    feature_stats,
    fidelity,
    generate_images,
    initial_noise,
    paired_bootstrap,
    rounded_difference,
    score_images,
)
from hasten.io import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", action="append", required=True, metavar="LABEL=MODEL",
                    help="an ARD student (name or folder) and its label; repeat")
    ap.add_argument("--out", default="benchmarks/ard_shapes/own_history")
    ap.add_argument("--samples", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--noise-seed", type=int, default=1, help="initial noise of the evaluation images (see "
                    "ard_shapes.py); the 'other noise' row uses the next seed")
    args = ap.parse_args()
    students = []
    for item in args.student:
        label, sep, model = item.rpartition("=")
        if not sep or not label or not model:
            ap.error(f"--student takes LABEL=MODEL, got {item!r}")
        students.append((label, model))
    teacher = hasten.load_pipeline("shapes")
    data = EvalSet(teacher, args.samples, seed=args.noise_seed)
    teacher_name, other_noise_name = "teacher: Euler 25, CFG", "teacher, other noise"
    configs = [(teacher_name, teacher, 25, "shapes", data.noise),
               (other_noise_name, teacher, 25, "shapes",
                initial_noise(teacher, args.samples, seed=args.noise_seed + 1))]
    configs += [(label, hasten.load_pipeline(model), 4, model, data.noise) for label, model in students]
    check_eval_noise(args.noise_seed, [c[1] for c in configs[2:]])
    rows, per_image, psnrs = [], {}, {}
    for name, pipe, steps, model, noise in configs:
        images, secs = generate_images(pipe, data.prompts, steps, None, batch_size=args.batch_size, noise=noise)
        q = score_images(data.scenes, images, per_image=True)
        per_image[name] = q["per_image"]
        if name == teacher_name:
            teacher_images, to_teacher = images, feature_stats(q["per_image"].features)
        psnrs[name], fd_to_teacher = fidelity(images, q["per_image"].features, teacher_images, to_teacher)
        student = getattr(pipe, "student", None)
        rows.append({"name": name, "model": model, "steps": steps,
                     "layers_with_history": getattr(student, "layers_with_history", None),
                     "history_gate": getattr(student, "history_gate", None),
                     "convention": getattr(student, "convention", None),
                     "fd_shapes": round(q["fd_shapes"], 4), "adherence": round(q["adherence"], 4),
                     "psnr_vs_teacher": round(float(psnrs[name].mean()), 3),
                     "fd_to_teacher": round(fd_to_teacher, 4),
                     "adherence_per_category": q["adherence_per_category"], "wall_s": round(secs, 2)})
        print(f"{name:<34} FD {rows[-1]['fd_shapes']:8.3f}  adherence {rows[-1]['adherence']:.3f}  "
              f"PSNR vs teacher {rows[-1]['psnr_vs_teacher']:6.2f} dB  FD to teacher {rows[-1]['fd_to_teacher']:.3f}",
              flush=True)
    vs_teacher = {label: rounded_difference(paired_bootstrap(per_image[label], per_image[teacher_name], args.resamples))
                  for label, _ in students}
    pairs = {f"{b} minus {a}": rounded_difference(paired_bootstrap(per_image[b], per_image[a], args.resamples))
             for i, (b, _) in enumerate(students) for a, _ in students[:i]}
    fidelity_pairs = {}
    for i, (b, _) in enumerate(students):
        for a, _ in students[:i]:
            d = rounded_difference(paired_bootstrap(per_image[b], per_image[a], args.resamples,
                                                    reference_features=per_image[teacher_name].features))
            db = bootstrap_mean(psnrs[b] - psnrs[a], args.resamples)
            fidelity_pairs[f"{b} minus {a}"] = {"fd_to_teacher": d["fd"], "fd_to_teacher_ci95": d["fd_ci95"],
                                                "psnr_vs_teacher_db": db["mean"], "psnr_vs_teacher_db_ci95": db["ci95"]}
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "samples": args.samples, "noise_seed": args.noise_seed, "resamples": args.resamples,
           "note": "one run per configuration on the same held-out captions and noise; differences are a minus b "
                   "with 95% paired-bootstrap intervals (captions resampled together, FD reference fixed); "
                   "psnr_vs_teacher and fd_to_teacher measure each row against the teacher's images (same "
                   "captions and noise); 'teacher, other noise' gives their scale for an exact sampler of the "
                   "teacher's distribution that does not reproduce its images",
           "student_minus_teacher": vs_teacher, "student_minus_student": pairs,
           "fidelity_student_minus_student": fidelity_pairs, "records": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    print(json.dumps({"student_minus_teacher": vs_teacher, "student_minus_student": pairs,
                      "fidelity_student_minus_student": fidelity_pairs}, indent=2))


if __name__ == "__main__":
    main()
