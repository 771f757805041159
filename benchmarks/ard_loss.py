"""ARD students' teacher-forced loss on trajectories they were trained on and on fresh ones (overfitting check).

    python benchmarks/ard_loss.py --data runs/ard/traj2k --per-split 500 --split "first 5000=0:5000" \
        --split "second 5000=5000:10000" --split "held out=10000:10500" \
        --student "N=2 stage 1 (1000 steps)=runs/ard/stage1_shipped" --student "N=0 stage 1 (1000 steps)=runs/ard/n0" \
        --student "N=2 stage 2 (shapes-ard4)=runs/ard/x2_ard" --student "N=0 stage 2=runs/ard/x2_n0"

(the stage-1 students trained on the first 5000 trajectories, the stage-2 ones on the first 10000; the last 500
no student saw).

The two conventions at stage 1 (states, and the x0-predictions of ``--convention x0``: the held-out trajectories
need them, ``hasten distill add-x0 --teacher shapes --data runs/ard/traj20k --trajectories 10500``):

    python benchmarks/ard_loss.py --data runs/ard/traj20k --trajectories 10500 --per-split 500 \
        --split "held out=10000:10500" --student "N=2, states=runs/ard/state_ard_s1" \
        --student "N=0, states=runs/ard/n0_s1" --student "N=2, x0=runs/ard/x0c_ard_s1" \
        --student "N=0, x0=runs/ard/x0c_n0_s1" --swapped-history --out benchmarks/ard_shapes/x0_convention/loss

History in fewer blocks (N = 1 trained like the stage-1 N = 0 student: ``hasten distill ard ...
--layers-with-history 1 --out runs/ard/n1 --steps 1000 --batch-size 32 --lr 0.0002`` on the first 5000
trajectories):

    python benchmarks/ard_loss.py --data runs/ard/traj2k --per-split 500 --split "held out=10000:10500" \
        --student "N=0 stage 1=runs/ard/n0" --student "N=1 stage 1=runs/ard/n1" \
        --student "N=2 stage 1=runs/ard/stage1_shipped" --out benchmarks/ard_shapes/layers

With ``--swapped-history``, also each step's loss when the earlier groups come from another trajectory
(:func:`swapped_history_loss`): how much each step relies on its history. Measured so:

    python benchmarks/ard_loss.py --data runs/ard/traj2k --split "held out=10000:10500" --per-split 500 \
        --swapped-history --student "N=2 stage 1=runs/ard/stage1_shipped" --student "N=0 stage 1=runs/ard/n0" \
        --student "N=2 stage 2 (shapes-ard4)=shapes-ard4" --student "N=0 stage 2=runs/ard/x2_n0" \
        --out benchmarks/ard_shapes/history_use

Per student and split: the training loss (mean over the K steps of the MSE between the predicted and the
teacher's next state, the groups fed the teacher's states; the saved EMA weights, no gradient) and its
per-step terms, on the first ``--per-split`` trajectories of each split, with a 95% normal interval over
trajectories; for every pair of students on each split, the per-step difference with a 95% interval
over the paired trajectories (``student_minus_student``). Writes results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import torch

import hasten
from hasten.distill.trajectories import load_trajectories
from hasten.eval.bench import machine_info
from hasten.io import write_json


def batches(student, data: dict, rows: range, batch: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The trajectories ``rows`` in batches: the student's teacher-forced (inputs, targets) (b, K, ...) in its
    convention (``ARDStudent.teacher_forced``), text, pooled; float32."""
    for start in range(rows.start, rows.stop, batch):
        sl = slice(start, min(start + batch, rows.stop))
        x0 = data["x0"][sl].float() if "x0" in data else None
        yield (*student.teacher_forced(data["states"][sl].float(), x0), data["text"][sl].float(),
               data["pooled"][sl].float())


@torch.no_grad()
def per_trajectory_loss(student, data: dict, rows: range, batch: int) -> torch.Tensor:
    """(len(rows), K): each trajectory's per-step MSE, as ``ARDStudent.loss`` averages it."""
    out = []
    for inputs, targets, text, pooled in batches(student, data, rows, batch):
        out.append(((student.next_states(inputs, text, pooled) - targets) ** 2).mean(dim=(2, 3, 4)))
    return torch.cat(out)


@torch.no_grad()
def swapped_history_loss(student, data: dict, rows: range, batch: int) -> torch.Tensor:
    """(len(rows), K): each step's MSE when the groups before it are fed another trajectory's states (the
    previous one in the batch: another caption and noise) and the step's own input is kept. Against
    :func:`per_trajectory_loss` this measures how much a student relies on its history: N = 0 must not change
    at all, step 1 has no history to swap."""
    out = []
    for own, targets, text, pooled in batches(student, data, rows, batch):
        other, per_step = own.roll(1, 0), []
        for d in range(own.shape[1]):
            inputs = own.clone()
            inputs[:, :d] = other[:, :d]
            pred = student.next_states(inputs, text, pooled)[:, d]
            per_step.append(((pred - targets[:, d]) ** 2).mean(dim=(1, 2, 3)))
        out.append(torch.stack(per_step, 1))
    return torch.cat(out)


def per_step_difference(b: torch.Tensor, a: torch.Tensor) -> dict:
    """Per-step loss of student b minus student a on the same trajectories (each (n, K)), as the relative
    difference of the means, with a 95% normal interval over trajectories of the paired difference."""
    d, mean_a = (b - a).double(), a.double().mean(0)
    half = 1.96 * d.std(0) / d.shape[0] ** 0.5
    return {"per_step": [round(v, 7) for v in d.mean(0).tolist()],
            "per_step_ci95": [[round(m - h, 7), round(m + h, 7)] for m, h in zip(d.mean(0).tolist(), half.tolist())],
            "per_step_relative": [round(v, 4) for v in (d.mean(0) / mean_a).tolist()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a folder written by hasten distill trajectories")
    ap.add_argument("--split", action="append", required=True, metavar="LABEL=START:STOP",
                    help="a range of trajectories and its label; repeat")
    ap.add_argument("--student", action="append", required=True, metavar="LABEL=MODEL",
                    help="an ARD student (name or folder) and its label; repeat")
    ap.add_argument("--trajectories", type=int, default=None,
                    help="read only the first N trajectories of --data (those add-x0 has filled, for x0 students)")
    ap.add_argument("--per-split", type=int, default=2000, help="trajectories scored per split (the first ones)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--swapped-history", action="store_true",
                    help="also each step's loss with the earlier groups taken from another trajectory")
    ap.add_argument("--out", default="benchmarks/ard_shapes/loss")
    args = ap.parse_args()

    def labelled(item: str, flag: str) -> tuple[str, str]:
        label, sep, value = item.rpartition("=")
        if not sep or not label or not value:
            ap.error(f"{flag} takes LABEL=VALUE, got {item!r}")
        return label, value

    data = load_trajectories(args.data, first=args.trajectories)
    n = data["states"].shape[0]
    splits = []
    for item in args.split:
        label, span = labelled(item, "--split")
        start, _, stop = span.partition(":")
        if not (start.isdigit() and stop.isdigit() and int(start) < int(stop) <= n):
            ap.error(f"--split range must be START:STOP within 0:{n}, got {span!r}")
        splits.append((label, range(int(start), min(int(stop), int(start) + args.per_split))))
    rows, losses = [], {}
    for label, model in (labelled(s, "--student") for s in args.student):
        student = hasten.load_pipeline(model).student.eval()
        for split, r in splits:
            per = losses[label, split] = per_trajectory_loss(student, data, r, args.batch_size)
            loss = per.mean(1)
            half = 1.96 * loss.std().item() / len(loss) ** 0.5
            rows.append({"student": label, "model": model, "split": split, "trajectories": [r.start, r.stop],
                         "loss": round(loss.mean().item(), 6), "ci95": [round(loss.mean().item() - half, 6),
                                                                       round(loss.mean().item() + half, 6)],
                         "per_step": [round(v, 6) for v in per.mean(0).tolist()]})
            print(f"{label:<28} {split:<12} loss {rows[-1]['loss']:.5f}  per step {rows[-1]['per_step']}", flush=True)
            if args.swapped_history:
                swapped = swapped_history_loss(student, data, r, args.batch_size)
                rows[-1]["per_step_swapped_history"] = [round(v, 6) for v in swapped.mean(0).tolist()]
                rows[-1]["history_changes_nothing"] = bool(torch.equal(swapped, per))
                print(f"{'':<28} {'':<12} swapped history, per step {rows[-1]['per_step_swapped_history']}",
                      flush=True)
    labels = list(dict.fromkeys(row["student"] for row in rows))
    pairs = {f"{b} minus {a}, {split}": per_step_difference(losses[b, split], losses[a, split])
             for split, _ in splits for i, b in enumerate(labels) for a in labels[:i]}
    res = {"benchmark": "ard_loss", "date": dt.date.today().isoformat(), "machine": machine_info(),
           "data": str(args.data), "trajectories_in_data": n, "per_split": args.per_split, "rows": rows,
           "student_minus_student": pairs}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "results.json", res)
    print(f"wrote {Path(args.out) / 'results.json'}")


if __name__ == "__main__":
    main()
