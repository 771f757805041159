"""ARD students side by side against their 25-step CFG teacher, with paired-bootstrap intervals.

    python benchmarks/ard_history.py --samples 1200 --out benchmarks/ard_shapes/own_history \
        --student shipped=shapes-ard4 --student "teacher-forced +300=runs/ard/ft_tf" \
        --student "own history +300=runs/ard/ft_own"

Also the second-stage run (``--init`` plus 1000 steps on twice the trajectories, N = 2 and N = 0 alike):

    python benchmarks/ard_history.py --samples 1200 --out benchmarks/ard_shapes/longer \
        --student "N=2 shipped (1000 steps)=shapes-ard4" --student "N=0 (1000 steps)=runs/ard/n0" \
        --student "N=2 +1000 steps=runs/ard/x2_ard" --student "N=0 +1000 steps=runs/ard/x2_n0"

(run before ``shapes-ard4`` became the N = 2 second stage). Made to measure the own-history fine-tune
(``hasten distill ard --own-history P --init shapes-ard4``, on the stage-1 student) against the same
fine-tune teacher-forced (the paper's recipe, same data, steps and seed): the one difference is
where the groups' inputs come from, so a gap between those two is the effect of training on the student's
own history. Every configuration samples the held-out captions of the ARD bench (its first 400 captions
are the bench's) from the same noise. Reported per student: adherence and FD-shapes; each student minus
the teacher, and each student minus every student listed before it, with 95% paired-bootstrap intervals
(captions resampled together). Writes results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import hasten
from hasten.eval.bench import machine_info
from hasten.eval.bench_shapes import EvalSet
from hasten.eval.shapes_eval import generate_images, paired_bootstrap, rounded_difference, score_images
from hasten.io import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", action="append", required=True, metavar="LABEL=MODEL",
                    help="an ARD student (name or folder) and its label; repeat")
    ap.add_argument("--out", default="benchmarks/ard_shapes/own_history")
    ap.add_argument("--samples", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    students = []
    for item in args.student:
        label, sep, model = item.rpartition("=")
        if not sep or not label or not model:
            ap.error(f"--student takes LABEL=MODEL, got {item!r}")
        students.append((label, model))
    teacher = hasten.load_pipeline("shapes")
    data = EvalSet(teacher, args.samples, seed=0)
    configs = [("teacher: Euler 25, CFG", teacher, 25, "shapes")]
    configs += [(label, hasten.load_pipeline(model), 4, model) for label, model in students]
    rows, per_image = [], {}
    for name, pipe, steps, model in configs:
        images, secs = generate_images(pipe, data.prompts, steps, None, batch_size=args.batch_size, noise=data.noise)
        q = score_images(data.scenes, images, per_image=True)
        per_image[name] = q["per_image"]
        n_history = getattr(getattr(pipe, "student", None), "layers_with_history", None)
        rows.append({"name": name, "model": model, "steps": steps, "layers_with_history": n_history,
                     "fd_shapes": round(q["fd_shapes"], 4), "adherence": round(q["adherence"], 4),
                     "adherence_per_category": q["adherence_per_category"], "wall_s": round(secs, 2)})
        print(f"{name:<34} FD {rows[-1]['fd_shapes']:8.3f}  adherence {rows[-1]['adherence']:.3f}", flush=True)
    teacher_name = configs[0][0]
    vs_teacher = {label: rounded_difference(paired_bootstrap(per_image[label], per_image[teacher_name], args.resamples))
                  for label, _ in students}
    pairs = {f"{b} minus {a}": rounded_difference(paired_bootstrap(per_image[b], per_image[a], args.resamples))
             for i, (b, _) in enumerate(students) for a, _ in students[:i]}
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "samples": args.samples, "noise_seed": 0, "resamples": args.resamples,
           "note": "one run per configuration on the same held-out captions and noise; differences are a minus b "
                   "with 95% paired-bootstrap intervals (captions resampled together, FD reference fixed)",
           "student_minus_teacher": vs_teacher, "student_minus_student": pairs, "records": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    print(json.dumps({"student_minus_teacher": vs_teacher, "student_minus_student": pairs}, indent=2))


if __name__ == "__main__":
    main()
