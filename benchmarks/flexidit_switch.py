"""What one transformer call of `shapes-flexi` costs at batch 1, and what the switch into the weak mode costs.

    python benchmarks/flexidit_switch.py --out benchmarks/flexidit_shapes/switch

One caption with CFG (2 rows), the transformer alone, median over ``--repeats`` timed calls after a warm-up:
the plain `shapes` transformer; `shapes-flexi` in its powerful mode (patch 2, adapters off) and in its weak
mode (patch 4, its LoRA on); entering and leaving the weak mode alone (:func:`hasten.methods.flexidit.patch_size`,
which toggles the peft LoRA layers it found once); and, for comparison, the same toggles through diffusers'
model-level ``set_adapter``/``enable_adapters``/``disable_adapters``, which walk every module on each call
(what ``patch_size`` did before). Writes results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from pathlib import Path

import torch

import hasten
from hasten.eval.bench import machine_info
from hasten.io import write_json
from hasten.methods.flexidit import patch_size


def median_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/flexidit_shapes/switch")
    args = ap.parse_args()
    base, flexi = hasten.load_pipeline("shapes"), hasten.load_pipeline("shapes-flexi")
    tb, tf = base.transformer, flexi.transformer
    text, pooled = base.encode_prompt(["a red circle"] * 2, torch.float32)
    x = torch.randn(2, *base.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500.0)
    lora = tf.flex_lora[4]

    def call(tr) -> torch.Tensor:
        return tr(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled,
                  return_dict=False)[0]

    def weak() -> torch.Tensor:
        with patch_size(tf, 4):
            return call(tf)

    def switch() -> None:
        with patch_size(tf, 4):
            pass

    def model_level_toggles() -> None:
        tf.set_adapter(lora)
        tf.enable_adapters()
        tf.disable_adapters()

    with torch.no_grad():
        ms = {"plain shapes call": median_ms(lambda: call(tb), args.repeats),
              "shapes-flexi powerful call": median_ms(lambda: call(tf), args.repeats),
              "shapes-flexi weak call (switch included)": median_ms(weak, args.repeats),
              "weak-mode switch alone (cached peft layers)": median_ms(switch, args.repeats),
              "diffusers model-level set/enable/disable adapters": median_ms(model_level_toggles, args.repeats)}
    for name, v in ms.items():
        print(f"{v:8.3f} ms  {name}")
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "batch": "1 caption, CFG: 2 rows", "repeats": args.repeats, "median_ms": ms}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)


if __name__ == "__main__":
    main()
