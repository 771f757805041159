"""Imagine Flash on `shapes`: the 1-, 2- and 3-step student against the 50-step CFG teacher and cheap baselines.

    python benchmarks/flash_shapes.py --flash runs/flash/bwd_srl --out benchmarks/flash_shapes

Every configuration samples the same held-out captions from the same initial noise, one after the other in
one process: the teacher (50 Euler steps with CFG, the quality and speed reference), the student at 1, 2
and 3 steps (one branch: guidance is distilled in), and the teacher at 3 steps with UniPC (bh2) and
DPM-Solver++(2M), with and without guidance. Wall times are sequential (indicative). Writes results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch

import hasten
from hasten.eval.bench import machine_info
from hasten.eval.bench_shapes import EvalSet, copy_shapes
from hasten.eval.shapes_eval import generate_images, score_images
from hasten.io import atomic_write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flash", required=True)
    ap.add_argument("--out", default="benchmarks/flash_shapes")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=50)
    args = ap.parse_args()
    teacher, flash = hasten.load_pipeline("shapes"), hasten.load_pipeline(args.flash)
    data = EvalSet(teacher, args.samples, seed=0)

    def sample(pipe, steps: int, guidance_scale: float | None = None) -> tuple[torch.Tensor, float]:
        return generate_images(pipe, data.prompts, steps, guidance_scale, batch_size=args.batch_size, noise=data.noise)

    configs = [("teacher: Euler 50, CFG", teacher, 50, None, 100)]
    configs += [(f"Imagine Flash student, {k} step{'s' if k > 1 else ''}", flash, k, None, k) for k in (1, 2, 3)]
    for solver, label in (("unipc-bh2", "UniPC"), ("dpm++2m", "DPM-Solver++")):
        own = copy_shapes(teacher, solver)
        configs += [(f"teacher: {label} 3, CFG", own, 3, None, 6), (f"teacher: {label} 3, no guidance", own, 3, 1.0, 3)]
    sample(flash, 3)  # warm-up
    rows = []
    for name, pipe, steps, gs, nfe in configs:
        images, secs = sample(pipe, steps, gs)
        q = score_images(data.scenes, images)
        rows.append({"name": name, "steps": steps, "nfe": nfe, "fd_shapes": round(q["fd_shapes"], 4),
                     "adherence": round(q["adherence"], 4), "adherence_per_category": q["adherence_per_category"],
                     "s_per_image": round(secs / args.samples, 4)})
        print(f"{name:<40} NFE {nfe:3d}  FD {rows[-1]['fd_shapes']:8.3f}  adherence {rows[-1]['adherence']:.3f}  "
              f"{secs / args.samples * 1000:.1f} ms/image", flush=True)
    ref = rows[0]
    three = rows[3]
    summary = {"adherence_drop_points_3_steps": round(100 * (ref["adherence"] - three["adherence"]), 2),
               "fd_increase_3_steps": round(three["fd_shapes"] / ref["fd_shapes"] - 1, 4),
               "target_adherence_within_5_points_met": 100 * (ref["adherence"] - three["adherence"]) <= 5,
               "target_fd_within_25pct_met": three["fd_shapes"] <= 1.25 * ref["fd_shapes"],
               "speedup_3_steps_sequential": round(ref["s_per_image"] / three["s_per_image"], 2)}
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "samples": args.samples, "flash": str(args.flash), "guidance_scale": teacher.default_guidance_scale,
           "note": "one run per configuration on the same held-out captions and noise; wall times sequential",
           "summary": summary, "records": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(res, indent=2) + "\n"))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
