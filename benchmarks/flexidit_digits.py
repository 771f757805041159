"""FlexiDiT on `digits`: FD-digits, class accuracy, compute share and wall time against the weak-step count.

    python benchmarks/flexidit_digits.py --flexi runs/digits_flexi --out benchmarks/flexidit_digits

`--flexi` is a folder from `hasten flexify --model digits` (the shared-parameter variant). Every
configuration samples the same labels from the same seed (50 Euler steps, the model's guidance), in one
process, one after the other; the base `digits` model is the reference. Writes results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import torch

import hasten
from hasten.eval.bench import machine_info
from hasten.eval.metrics import class_accuracy, fd_to_held_out
from hasten.io import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flexi", required=True)
    ap.add_argument("--out", default="benchmarks/flexidit_digits")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    base, flex = hasten.load_pipeline("digits"), hasten.load_pipeline(args.flexi)
    labels = torch.arange(args.samples) % base.num_classes

    def sample(pipe) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        images = pipe(labels, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0)).images
        return images, time.perf_counter() - t0

    sample(base)  # warm-up
    images, ref_s = sample(base)
    rows = [{"name": "digits (base)", "weak_steps": None, "compute_share": 1.0, "fd_digits": fd_to_held_out(images),
             "class_accuracy": class_accuracy(images, labels), "wall_s": ref_s, "speedup": 1.0}]
    for k in (0, 5, 10, 15, 20, 30, 40, 50):
        with hasten.accelerate(flex, hasten.FlexiDiT(weak_steps=k)) as h:
            images, secs = sample(flex)
            rep = h.report()["methods"]["flexidit"]
        rows.append({"name": f"flexi weak_steps={k}", "weak_steps": k, "compute_share": rep["compute_share"],
                     "fd_digits": fd_to_held_out(images), "class_accuracy": class_accuracy(images, labels),
                     "wall_s": secs, "speedup": ref_s / secs})
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "flexi": str(args.flexi), "samples": args.samples, "steps": args.steps,
           "guidance_scale": base.default_guidance_scale,
           "note": "one run per configuration, sequential in one process: wall times are indicative",
           "records": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    for r in rows:
        print(f"{r['name']:<24} compute {r['compute_share']:.3f}  FD {r['fd_digits']:8.2f}  "
              f"acc {r['class_accuracy']:.3f}  {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
