"""Ship a FlexiDiT fine-tune (`hasten flexify`) as an embedded model with its card.

    python scripts/make_flexi_model.py --from-run runs/shapes_flexi --name shapes-flexi \
        --curve benchmarks/flexidit_shapes/results.json
    python scripts/make_flexi_model.py --from-run runs/digits_flexi --name digits-flexi \
        --curve benchmarks/flexidit_digits/results.json

Copies what the fine-tune adds to its base (``flexi.safetensors``, ``flexi_config.json``) into
``src/hasten/models/<name>``, checks that it loads through ``hasten.load_pipeline(<name>)``, and writes
``loss_curve.png`` and ``MODEL_CARD.md`` (config, data, seed, training time against the base model's, loss
curve, and the quality/compute figures of ``--curve``, the benchmark JSON measured on the run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from make_default_model import plot_loss  # scripts/ is on sys.path when this script runs

import hasten
from hasten.eval.bench_results import adherence_tolerance
from hasten.io import atomic_copy, atomic_write
from hasten.pipeline import MODELS_DIR


def run_log(run: Path) -> dict:
    """The fine-tune's config, loss curve and wall time from its final checkpoint."""
    ckpt = next((run / "checkpoints").glob("*.pt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return {"config": state["config"], "curve": state["curve"], "seconds": state["elapsed_s"],
            "step": state["step"], "cpu_s": state.get("cpu_s")}


def base_seconds(base: str) -> float | None:
    """The base model's own training time (its train_log.json or card), for the compute share."""
    log = MODELS_DIR / base / "train_log.json"
    if log.is_file():
        return float(json.loads(log.read_text())["train_seconds"])
    card = MODELS_DIR / base / "MODEL_CARD.md"
    for line in card.read_text().splitlines() if card.is_file() else []:
        if "Training took" in line:
            return 60 * float(line.split("Training took")[1].split("min")[0])
    return None


def metrics_table(res: dict) -> str:
    fd = "fd_shapes" if "fd_shapes" in res["records"][0] else "fd_digits"
    second = "adherence" if fd == "fd_shapes" else "class_accuracy"
    base = res["records"][0]
    lines = [f"| configuration | compute share | {fd} (vs base) | {second} (points vs base) | speed-up (sequential) |",
             "|---|---|---|---|---|"]
    for r in res["records"]:
        lines.append(f"| {r['name']} | {r['compute_share']:.3f} | {r[fd]:.3f} ({100 * (r[fd] / base[fd] - 1):+.0f}%) | "
                     f"{r[second]:.3f} ({100 * (r[second] - base[second]):+.1f}) | {r['speedup']:.2f}x |")
    tol = adherence_tolerance(res.get("samples"))  # the bench's gate
    ok = [r for r in res["records"][1:] if r[fd] <= 1.05 * base[fd] and r[second] >= base[second] - tol]
    best = min(ok, key=lambda r: r["compute_share"]) if ok else None
    lines += ["", "Within 1 point (at least one sample) of the base's " + second + " and 5% of its " + fd + ": " +
              (f"down to {100 * best['compute_share']:.0f}% of the compute ({best['name']})." if best else
               "no FlexiDiT setting here (the fine-tune does not yet reach the quality gates).")]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", required=True, type=Path)
    ap.add_argument("--name", required=True, choices=["shapes-flexi", "digits-flexi"])
    ap.add_argument("--curve", required=True, type=Path)
    args = ap.parse_args()
    run, dest = args.from_run, MODELS_DIR / args.name.replace("-", "_")
    cfg = json.loads((run / "flexi_config.json").read_text())
    base = cfg["base"]
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("flexi.safetensors", "flexi_config.json"):
        atomic_copy(run / f, dest / f)
    pipe = hasten.load_pipeline(args.name)  # the shipped copy loads (and its base weights match)
    assert pipe.transformer.flex_patch_sizes == tuple(cfg["patch_sizes"])
    log = run_log(run)
    plot_loss(log["curve"], dest / "loss_curve.png", "distillation loss" if cfg["variant"] == "lora" else
              "flow-matching loss", f"{args.name}: {cfg['variant']} fine-tune")
    res = json.loads(args.curve.read_text())
    from card_check import check_bench_weights  # here: card_check imports this module

    check_bench_weights(res, pipe.transformer, args.curve)
    b_s = base_seconds(base)
    share = f"{log['seconds'] / 60:.1f} min wall on the 2-core machine" + (
        f", {100 * log['seconds'] / b_s:.1f}% of the base model's {b_s / 60:.0f} min" if b_s else "")
    size = (dest / "flexi.safetensors").stat().st_size / 2**20
    targets = log["config"].get("lora_targets", "image")
    steps_cmd = f" --steps {log['config']['steps']}" + (f" --lora-targets {targets}" if targets != "image" else "")
    points = ", ".join(f"step {c['step']}: {c['loss']:.4f}" for c in log["curve"][:: max(1, len(log["curve"]) // 6)])
    streams = "the image stream's" if targets == "image" else "both streams' (image and text)"
    variant = (f"LoRA variant (base frozen; per-size LoRAs on {streams} attention and feed-forward, own "
               "embedding/de-embedding, distillation from the powerful mode; `hasten.flexidit_train`)"
               if cfg["variant"] == "lora" else
               "shared-parameter variant (PI-resized patch embedding/de-embedding, per-size embedding and norms, "
               "every weight fine-tuned with the model's own flow-matching loss at a size drawn per step; EMA)")
    card = f"""# {args.name}: FlexiDiT fine-tune of `{base}`

FlexiDiT (Anagnostidis et al. 2025): `{base}` made to run at patch sizes {cfg['patch_sizes']}, so that the first,
noisy steps can run at the coarse size with 4x fewer image tokens. {variant}.

```python
import hasten
pipe = hasten.load_pipeline("{args.name}")       # loads `{base}` and applies flexi.safetensors ({size:.1f} MB)
with hasten.accelerate(pipe, hasten.FlexiDiT(compute=0.6)):  # 60% of the transformer FLOPs
    images = pipe(...).images
```

At the original patch size the model is {"bitwise the base model (the adapters are off)" if cfg["variant"] == "lora"
else "the fine-tuned model (every weight was trained; its figures are the first row with weak_steps=0)"}.

## Reproduce
```
hasten flexify --model {base} --out {run}{steps_cmd}   # re-running resumes
python scripts/make_flexi_model.py --from-run {run} --name {args.name} --curve {args.curve}
```

## Training
- Config: `{json.dumps(log['config'])}`
- Flexified: `{json.dumps({k: v for k, v in cfg.items() if k != 'base_weights'})}`; base weights fingerprint
  `{cfg['base_weights']}` (a different `{base}` is refused at load time).
- Data: {"scenes rendered from `hasten.data.shapes` training seeds, encoded by the shipped VAE and MiniLM (`--scenes`)"
  if base == "shapes" else "the digits training split (`hasten.data.digits`)"}; seed {log['config'].get('seed', 0)}.
- Time: {share}.
- Loss (`loss_curve.png`): {points}, step {log['curve'][-1]['step']}: {log['curve'][-1]['loss']:.4f}.

## Metrics (from `{args.curve}`, {res['samples']} samples, {res['steps']} Euler steps, guidance
{res['guidance_scale']}, {res['date'][:10]}, {res['machine'].get('cpu')} {res['machine'].get('cores')} cores; compute
shares count the LoRA adapters a coarse call runs)

{metrics_table(res)}
"""
    atomic_write(dest / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(card))
    print(card)


if __name__ == "__main__":
    main()
