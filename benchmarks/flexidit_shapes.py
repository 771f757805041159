"""FlexiDiT on `shapes`: the paper's curve, FD-shapes and adherence against the compute share (100% to 25%).

    python benchmarks/flexidit_shapes.py --flexi runs/shapes_flexi --out benchmarks/flexidit_shapes

`--flexi` is a folder from `hasten flexify --model shapes` (the LoRA variant). Every configuration samples
the same held-out captions from the same initial noise (50 Euler steps, the model's guidance), one after
the other in one process; the base `shapes` model is the reference. `FlexiDiT(compute=c)` runs the
fewest first calls weak that bring the transformer FLOPs to at most c of the full run; the weak mode's
own share (every call weak) is the floor, measured once, and the shares below it are listed as such. Writes
results.json and curve.png. Wall times here are sequential and indicative; the interleaved speed-up is
`hasten bench --model shapes --flexi DIR`.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import torch

import hasten
from hasten.eval.bench import machine_info
from hasten.eval.bench_shapes import EvalSet
from hasten.eval.shapes_eval import generate_images, score_images
from hasten.io import atomic_write, write_json
from hasten.plans import weights_hash

SHARES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flexi", required=True)
    ap.add_argument("--out", default="benchmarks/flexidit_shapes")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=50)
    args = ap.parse_args()
    base, flex = hasten.load_pipeline("shapes"), hasten.load_pipeline(args.flexi)
    for p in (base, flex):
        p.set_progress_bar_config(disable=True)
    data = EvalSet(base, args.samples, seed=0)

    def sample(pipe) -> tuple[torch.Tensor, float]:
        return generate_images(pipe, data.prompts, args.steps, None, batch_size=args.batch_size, noise=data.noise)

    def row(name: str, images: torch.Tensor, secs: float, ref_s: float, **extra) -> dict:
        q = score_images(data.scenes, images)
        r = {"name": name, **extra, "fd_shapes": round(q["fd_shapes"], 4), "adherence": round(q["adherence"], 4),
             "adherence_per_category": q["adherence_per_category"], "wall_s": round(secs, 2),
             "speedup": round(ref_s / secs, 3)}
        print(f"{name:<34} compute {r.get('compute_share') or 1.0:.3f}  FD {r['fd_shapes']:8.3f}  "
              f"adherence {r['adherence']:.3f}  {r['speedup']:.2f}x", flush=True)
        return r

    sample(base)  # warm-up
    warm = data.prompts[: args.batch_size]
    for kw in ({"weak_steps": 2}, {"weak_steps": 0}):  # the flexified model's first calls at each size (cached weights)
        with hasten.accelerate(flex, hasten.FlexiDiT(**kw)):
            generate_images(flex, warm, 2, None, batch_size=args.batch_size, noise=data.noise[: args.batch_size])
    images, ref_s = sample(base)
    rows = [row("shapes (base)", images, ref_s, ref_s, compute=1.0, compute_share=1.0, weak_calls=0)]
    # the weak mode's own share (every call weak) is the floor: shares below it run the same configuration
    floor = weak_share(flex, data.prompts[: args.batch_size])
    configs = [({"compute": c}, f"flexi compute={c}") for c in SHARES if c > floor]
    configs.append(({"weak_steps": args.steps}, f"flexi every call weak (compute {floor:.3f})"))
    configs.append(({"compute": 0.6, "weak_guide_steps": 10}, "flexi compute=0.6 + weak guide 10"))
    configs.append(({"weak_steps": 0, "weak_guide_steps": args.steps}, "flexi weak guide on every call"))
    for kw, name in configs:
        with hasten.accelerate(flex, hasten.FlexiDiT(**kw)) as h:
            images, secs = sample(flex)
            rep = h.report()["methods"]["flexidit"]
        rows.append(row(name, images, secs, ref_s, compute=kw.get("compute"), compute_share=rep["compute_share"],
                        weak_calls=rep["weak_calls"], weak_guide_calls=rep["weak_guide_calls"],
                        image_tokens_per_call=rep["image_tokens_per_call"]))
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "flexi": str(args.flexi), "weights": weights_hash(flex.transformer), "samples": args.samples,
           "steps": args.steps, "solver": "euler",
           "guidance_scale": base.default_guidance_scale, "weak_mode_share": round(floor, 4),
           "below_the_floor": [c for c in SHARES if c <= floor],
           "note": "one run per configuration, sequential in one process: wall times are indicative; "
                   "compute_share = transformer FLOPs / the full run's (analytic, hasten.methods.flexidit."
                   "transformer_flops)",
           "records": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    plot(out / "curve.png", rows)


def weak_share(pipe, prompts: list[str]) -> float:
    """Transformer FLOPs of one weak call over one full-size call (this latent size, these prompts' length)."""
    from hasten.methods.flexidit import transformer_flops

    size = pipe.transformer.config.sample_size
    text = pipe.encode_prompt(prompts)[0].shape[1]
    f = [transformer_flops(pipe.transformer, size, size, p, text_tokens=text)["total"] for p in (4, None)]
    return f[0] / f[1]


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = sorted((r for r in rows[1:] if "weak guide" not in r["name"]), key=lambda r: -r["compute_share"])
    x = [100 * r["compute_share"] for r in curve]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "fd_shapes", "FD-shapes (lower is better)"),
                           (axes[1], "adherence", "adherence (higher is better)")):
        ax.plot(x, [r[key] for r in curve], "o-", label="FlexiDiT")
        ax.axhline(rows[0][key], color="gray", ls="--", label="base, 100% compute")
        ax.set_xlabel("transformer compute share (%)")
        ax.set_title(label)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("FlexiDiT on shapes: 50 Euler steps, weak (patch 4) first")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
