"""Does opening ARD's history lower the loss? The history gate swept on fixed weights.

    python benchmarks/ard_gate.py --data runs/ard/traj2k --rows 10000:10500 \
        --weights "fresh (the teacher's weights)=" --weights "N=0 stage 2=runs/ard/x2_n0" \
        --weights "N=2 stage 2 (shapes-ard4)=shapes-ard4" --gated-run runs/ard/g1 --n0-run runs/ard/n0 \
        --out benchmarks/ard_shapes/gate

A gated N = 2 student (:class:`hasten.distill.ard.ARDStudent` with ``history_gate``; each head of the lower
two blocks attends with ``(1 - g) softmax(own group) + g softmax(own and earlier groups)``) is given fixed
weights (an empty MODEL: the fresh student built from the teacher; else a saved ARD student's weights, the
gates added), and its teacher-forced loss on the trajectories ``--rows`` (no student trained on them) is
measured with every gate set to g, for g from 0 (step distillation) to 1 (the paper's block-causal
attention). Per g: the per-step loss and its paired difference from g = 0 with a 95% normal interval over
trajectories (``ard_loss.py``'s functions); and the derivative of the loss with respect to each gate at
g = 0 (positive: opening that head's history raises the loss), on the first ``--grad-rows`` trajectories.

``--gated-run``: a ``hasten distill ard --history-gate`` training folder (it may be unfinished); its
checkpoint's step and gates and its loss curve are recorded beside the ``--n0-run`` curve (the N = 0 run of
the same data, settings and seed). The run measured had stage 1's data (the first 5000 trajectories; sample i
depends only on i, so this writes the same ones) and settings, and was stopped after 300 of its 1000 steps:

    hasten distill trajectories --teacher shapes --steps 25 --keep 4 --n 5000 --out runs/ard/traj5k
    hasten distill ard --teacher shapes --data runs/ard/traj5k --layers-with-history 2 --history-gate \
        --out runs/ard/g1 --steps 1000 --batch-size 32 --lr 0.0002

Writes results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch
from ard_loss import per_step_difference, per_trajectory_loss  # sibling script (its folder is on sys.path)

import hasten
from hasten.distill.ard import ARD_CONFIG, GATE_GAIN, ARDStudent
from hasten.distill.student import WEIGHTS
from hasten.distill.trajectories import load_trajectories
from hasten.eval.bench import machine_info
from hasten.io import read_model_folder, write_json
from hasten.pipeline import EMBEDDED

GATES = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)


def gated_student(teacher, sigmas: list[float], model: str) -> ARDStudent:
    """A gated N = 2 student with the weights of ``model`` (empty: the teacher's) and its gates at 0."""
    student = ARDStudent(teacher, sigmas, 2, history_gate=True)
    if model:
        _, tensors = read_model_folder(EMBEDDED.get(model, Path(model)), ARD_CONFIG, WEIGHTS,
                                       f"{model} is not an ARD student folder")
        missing, unexpected = student.load_state_dict(tensors, strict=False)
        if missing != ["history_gates"] or unexpected:
            raise SystemExit(f"{model}: not an ungated ARD student of this teacher ({missing}, {unexpected})")
    return student.eval()


def set_gates(student: ARDStudent, g: float) -> None:
    with torch.no_grad():
        student.history_gates.fill_(g / GATE_GAIN)


def gate_gradient(student: ARDStudent, data: dict, rows: range, batch: int) -> list[list[float]]:
    """d(loss)/d(g) per block and head at g = 0, the mean loss over ``rows`` (the gates' derivative, not the
    parameters': g = GATE_GAIN * parameter)."""
    set_gates(student, 0.0)
    student.zero_grad()
    student.requires_grad_(False).history_gates.requires_grad_(True)
    for start in range(rows.start, rows.stop, batch):
        sl = slice(start, min(start + batch, rows.stop))
        w = (sl.stop - sl.start) / len(rows)
        (w * student.loss(data["states"][sl].float(), data["text"][sl].float(), data["pooled"][sl].float())).backward()
    return (student.history_gates.grad / GATE_GAIN).tolist()


def run_curves(gated_run: Path | None, n0_run: Path | None) -> dict | None:
    """The gated training run's checkpoint (step, gates) and its loss curve beside the N = 0 run's."""
    if gated_run is None:
        return None
    state = torch.load(gated_run / "checkpoints" / "student.pt", map_location="cpu", weights_only=False)
    gates = (GATE_GAIN * state["model"]["history_gates"]).clamp(0, 1)
    res = {"run": str(gated_run), "step": state["step"], "config": state["config"],
           "gates_at_checkpoint": gates.tolist(), "open_gates": int((gates > 0).sum()),
           "loss_curve": state["curve"]}
    if n0_run is not None:
        n0 = {c["step"]: c["loss"] for c in json.loads((n0_run / "train_log.json").read_text())["loss_curve"]}
        res["n0_run"] = str(n0_run)
        res["gated_minus_n0_loss"] = [{"step": c["step"], "gated": c["loss"], "n0": n0[c["step"]],
                                       "relative": round(c["loss"] / n0[c["step"]] - 1, 5)}
                                      for c in state["curve"] if c["step"] in n0]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a folder written by hasten distill trajectories")
    ap.add_argument("--rows", default="10000:10500", help="START:STOP, trajectories no student trained on")
    ap.add_argument("--weights", action="append", required=True, metavar="LABEL=MODEL",
                    help="weights to sweep the gate on (MODEL empty: the fresh student)")
    ap.add_argument("--grad-rows", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--gated-run", type=Path)
    ap.add_argument("--n0-run", type=Path)
    ap.add_argument("--out", default="benchmarks/ard_shapes/gate")
    args = ap.parse_args()
    a, b = (int(x) for x in args.rows.split(":"))
    rows = range(a, b)
    data = load_trajectories(args.data)
    sigmas = data["sigmas"].tolist()
    teacher = hasten.load_pipeline("shapes").transformer
    results = []
    for item in args.weights:
        label, _, model = item.rpartition("=")
        student = gated_student(teacher, sigmas, model)
        grad = gate_gradient(student, data, range(a, a + args.grad_rows), args.batch_size)
        losses = {}
        for g in GATES:
            set_gates(student, g)
            losses[g] = per_trajectory_loss(student, data, rows, args.batch_size)
        sweep = [{"gate": g, "loss": round(losses[g].mean().item(), 7),
                  "loss_per_step": [round(v, 7) for v in losses[g].mean(0).tolist()],
                  "minus_gate_0": per_step_difference(losses[g], losses[0.0])} for g in GATES]
        lowering = sum(v < 0 for row in grad for v in row)
        results.append({"label": label, "model": model or None, "dloss_dgate_at_0": grad,
                        "heads_whose_opening_lowers_the_loss": lowering, "sweep": sweep})
        print(f"{label}: loss by gate " + ", ".join(f"{s['gate']}: {s['loss']:.5f}" for s in sweep)
              + f"; dL/dg at 0 < 0 for {lowering} of {student.history_gates.numel()} heads", flush=True)
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "data": args.data, "rows": args.rows, "grad_rows": args.grad_rows,
           "note": "teacher-forced loss (mean over the K steps of the MSE to the teacher's next state) of a gated "
                   "N = 2 student with fixed weights and every gate at g; differences from g = 0 paired over "
                   "trajectories, 95% normal intervals",
           "weights": results, "gated_training_run": run_curves(args.gated_run, args.n0_run)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)


if __name__ == "__main__":
    main()
