"""Ship the trained ``shapes`` model: copy it into the package, choose its guidance, measure it, write its card.

    python scripts/make_shapes_model.py --from-run runs/shapes

1. The run's pipeline (``hasten train --model shapes --out runs/shapes``) is saved to
   ``src/hasten/models/shapes`` with the transformer in fp16 (loaded back as fp32); every figure below
   is measured on that shipped copy.
2. Guidance: a sweep over ``--scales`` on validation captions (seeds HELD_OUT_SEED0 + 200000 + i,
   disjoint from the 1000 evaluation captions) picks the scale with the best adherence.
3. ``hasten eval`` figures on the 1000 held-out captions at the chosen guidance and at guidance 1,
   straightness (PSNR of 10 / 20 Euler steps against 50), parser and encoder accuracy.
4. ``metrics.json``, ``loss_curve.png``, ``samples.png`` and ``MODEL_CARD.md`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import hasten
from hasten.data.shapes import CATEGORIES, HELD_OUT_SEED0, scenes
from hasten.eval.metrics import psnr, ssim
from hasten.eval.scene_parser import parser_accuracy
from hasten.eval.shapes_eval import eval_scenes, evaluate_shapes, generate_images, real_vs_real_fd, score_images
from hasten.io import write_json
from hasten.pipeline import MODELS_DIR, save_grid

DEST = MODELS_DIR / "shapes"
VALIDATION_SEED0 = HELD_OUT_SEED0 + 200_000


def ship(run: Path, dest: Path) -> None:
    from hasten.pipelines.shapes import ShapesPipeline

    pipe = ShapesPipeline.from_pretrained(run)
    pipe.transformer.to(torch.float16)
    pipe.save_pretrained(dest)
    for name in ("train_log.json",):
        (dest / name).write_text((run / name).read_text())
    (dest / "vae" / "train_log.json").write_text((run / "vae" / "train_log.json").read_text())


def loss_plot(log: dict, vae_log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, lg, title in ((a, vae_log, "VAE (MSE + 0.5 L1 + 1e-6 KL)"), (b, log, "transformer (flow matching)")):
        c = lg["loss_curve"]
        ax.plot([r["step"] for r in c], [r["loss"] for r in c])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from-run", type=Path, required=True)
    ap.add_argument("--scales", default="3,4,5,7")
    ap.add_argument("--sweep-samples", type=int, default=150)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--straight-samples", type=int, default=200)
    ap.add_argument("--skip-ship", action="store_true", help="measure the copy already in the package")
    args = ap.parse_args()
    t_start = time.time()
    if not args.skip_ship:
        ship(args.from_run, DEST)
    pipe = hasten.load_pipeline(DEST)
    metrics: dict = {"steps": args.steps, "machine": "2-core x86_64 CPU, torch " + torch.__version__}

    # -- guidance sweep on validation captions
    val = eval_scenes(args.sweep_samples, VALIDATION_SEED0)
    sweep = []
    for g in [float(x) for x in args.scales.split(",")]:
        imgs, wall = generate_images(pipe, [s.caption for s in val], args.steps, g, seed=7)
        r = score_images(val, imgs)
        sweep.append({"guidance_scale": g, "adherence": r["adherence"], "fd_shapes": r["fd_shapes"],
                      "per_category": r["adherence_per_category"], "wall_s": wall})
        print(sweep[-1], flush=True)
    best = max(sweep, key=lambda r: (r["adherence"], -r["fd_shapes"]))
    pipe.default_guidance_scale = best["guidance_scale"]
    meta_path = DEST / "hasten_shapes.json"
    meta = json.loads(meta_path.read_text())
    meta["guidance_scale"] = best["guidance_scale"]
    write_json(meta_path, meta)
    metrics["guidance_sweep"] = {"samples": args.sweep_samples, "captions": f"seeds {VALIDATION_SEED0}+i",
                                 "rows": sweep, "chosen": best["guidance_scale"]}

    # -- the figures on 1000 held-out captions
    shipped = evaluate_shapes(pipe, samples=args.samples, steps=args.steps, seed=0)
    print("shipped", {k: shipped[k] for k in ("adherence", "fd_shapes", "fd_real_vs_real")}, flush=True)
    no_cfg = evaluate_shapes(pipe, samples=args.samples, steps=args.steps, guidance_scale=1.0, seed=0,
                             real_vs_real=False)
    print("guidance 1", {k: no_cfg[k] for k in ("adherence", "fd_shapes")}, flush=True)
    for r in (shipped, no_cfg):
        r.pop("satisfied", None)
    metrics["shipped"] = shipped
    metrics["guidance_1"] = no_cfg
    metrics["adherence_drop_at_guidance_1_points"] = 100 * (shipped["adherence"] - no_cfg["adherence"])

    # -- straightness: fewer Euler steps against 50
    sc = eval_scenes(args.straight_samples)
    prompts = [s.caption for s in sc]
    ref, _ = generate_images(pipe, prompts, 50, None, seed=0)
    straight = {}
    for n in (10, 20):
        imgs, _ = generate_images(pipe, prompts, n, None, seed=0)
        straight[str(n)] = {"psnr_db": psnr(imgs, ref), "ssim": ssim(imgs, ref)}
    metrics["straightness_vs_50_euler_steps"] = {"samples": args.straight_samples, **straight}
    print("straightness", straight, flush=True)

    # -- evaluator accuracy
    rsc, rimgs = scenes(range(HELD_OUT_SEED0, HELD_OUT_SEED0 + 2000))
    metrics["parser_accuracy_2000_held_out_renders"] = parser_accuracy(rsc, rimgs)
    metrics["fd_real_vs_real_1000"] = real_vs_real_fd(1000)
    enc_log = json.loads((MODELS_DIR / "shapes_encoder" / "train_log.json").read_text())
    metrics["scene_encoder"] = enc_log["held_out"]

    log = json.loads((DEST / "train_log.json").read_text())
    vae_log = json.loads((DEST / "vae" / "train_log.json").read_text())
    metrics["vae_reconstruction"] = vae_log["reconstruction"]
    metrics["measure_seconds"] = round(time.time() - t_start, 1)
    write_json(DEST / "metrics.json", metrics)
    loss_plot(log, vae_log, DEST / "loss_curve.png")

    # -- a sample grid: one canonical caption per category, 4 seeds each
    pool = eval_scenes(200)
    demo = [next(s for s in pool if s.category == c) for c in CATEGORIES]
    demo_prompts = [s.caption for s in demo for _ in range(4)]
    imgs, _ = generate_images(pipe, demo_prompts, args.steps, None, seed=3)
    save_grid(imgs, DEST / "samples.png", nrow=4)
    (DEST / "samples.txt").write_text("\n".join(s.caption for s in demo) + "\n")
    print(json.dumps({k: metrics[k] for k in ("adherence_drop_at_guidance_1_points",)}), flush=True)
    print(f"done in {time.time() - t_start:.0f} s; write MODEL_CARD.md from {DEST / 'metrics.json'}")


if __name__ == "__main__":
    main()
