"""Where a FlexiDiT weak mode departs from the powerful one, step by step (the paper's Fig. 4, right).

    python benchmarks/flexidit_gap.py --flexi shapes-flexi --out benchmarks/flexidit_shapes/gap

Along the powerful model's own 50-step Euler CFG trajectories of held-out captions (the same captions and
noise as `flexidit_shapes.py`), each state is also fed to the weak mode (patch 4), and per step the script
records, averaged over the captions, the relative errors of the weak mode against the powerful one:

- `guided`: |g_w - g_p| / |g_p|, g = v_u + s (v_c - v_u), the velocity the sampler steps with;
- `conditional`: |v_c,w - v_c,p| / |v_c,p|;
- `guidance_direction`: |(v_c - v_u)_w - (v_c - v_u)_p| / |(v_c - v_u)_p|, how well the weak mode knows what
  the caption changes (a value near 1 means it has lost it);
- `within_cell_share` (of the powerful mode, once per step): the share of |(v_c - v_u)_p|^2 that varies inside
  the weak mode's token cells (the part of the caption's effect finer than one coarse token).

The paper's argument for running the weak mode first is that these differences are small on the first,
noisy steps. Several `--flexi` folders can be given; each is measured on the same states. Writes
results.json and gap.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import torch

import hasten
from hasten.eval.bench import machine_info
from hasten.eval.bench_shapes import EvalSet
from hasten.io import atomic_write, write_json
from hasten.methods.flexidit import patch_size
from hasten.pipelines.shapes import encode_text, with_unconditional
from hasten.plans import weights_hash


def relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| / |b| per row (flattened)."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-12)


def within_cell_share(a: torch.Tensor, cell: int) -> torch.Tensor:
    """Per row, the share of |a|^2 left after subtracting each ``cell`` x ``cell`` cell's mean."""
    means = torch.nn.functional.avg_pool2d(a, cell).repeat_interleave(cell, 2).repeat_interleave(cell, 3)
    return (a - means).flatten(1).pow(2).sum(1) / a.flatten(1).pow(2).sum(1).clamp_min(1e-24)


@torch.no_grad()
def gaps(flexes: list, prompts: list[str], noise: torch.Tensor, steps: int, weak: int) -> list[dict]:
    """Per step: sigma and, for each model of ``flexes``, the mean relative errors of its weak mode on the
    states of the first model's powerful (= base) Euler CFG trajectory."""
    pipe = flexes[0]
    scale = float(pipe.default_guidance_scale)
    text, pooled = pipe.encode_prompt(prompts, torch.float32)
    empty = encode_text(pipe.text_encoder, pipe.tokenizer, [""], warn=False)
    tin, pin = with_unconditional(text, pooled, empty)
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    x = noise.clone()

    def branches(tr, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = tr(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * x.shape[0]), encoder_hidden_states=tin,
               pooled_projections=pin, return_dict=False)[0].float()
        return v.chunk(2)

    rows = []
    for i, t in enumerate(sched.timesteps):
        u_p, c_p = branches(pipe.transformer, x, t)
        g_p = u_p + scale * (c_p - u_p)
        row = {"step": i, "sigma": round(float(sched.sigmas[i]), 4),
               "within_cell_share": round(float(within_cell_share(c_p - u_p, weak).mean()), 4), "models": []}
        for flex in flexes:
            with patch_size(flex.transformer, weak):
                u_w, c_w = branches(flex.transformer, x, t)
            g_w = u_w + scale * (c_w - u_w)
            row["models"].append({
                "guided": round(float(relative(g_w, g_p).mean()), 4),
                "conditional": round(float(relative(c_w, c_p).mean()), 4),
                "guidance_direction": round(float(relative(c_w - u_w, c_p - u_p).mean()), 4)})
        rows.append(row)
        x = sched.step(g_p, t, x).prev_sample
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flexi", action="append", required=True, help="a flexified shapes model (repeatable)")
    ap.add_argument("--out", default="benchmarks/flexidit_shapes/gap")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--weak-patch", type=int, default=4)
    args = ap.parse_args()
    flexes = [hasten.load_pipeline(f) for f in args.flexi]
    data = EvalSet(flexes[0], args.samples, seed=0)
    parts = [gaps(flexes, data.prompts[b:b + args.batch_size], data.noise[b:b + args.batch_size], args.steps,
                  args.weak_patch) for b in range(0, args.samples, args.batch_size)]
    sizes = [min(args.batch_size, args.samples - b) for b in range(0, args.samples, args.batch_size)]
    steps = []
    for i, row in enumerate(parts[0]):  # the mean over batches, weighted by their sizes
        models = []
        for m in range(len(flexes)):
            models.append({k: round(sum(p[i]["models"][m][k] * n for p, n in zip(parts, sizes)) / args.samples, 4)
                           for k in row["models"][m]})
        share = sum(p[i]["within_cell_share"] * n for p, n in zip(parts, sizes)) / args.samples
        steps.append({"step": row["step"], "sigma": row["sigma"], "within_cell_share": round(share, 4),
                      "models": models})
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "flexi": args.flexi, "weights": [weights_hash(f.transformer) for f in flexes], "samples": args.samples,
           "steps": args.steps, "solver": "euler", "guidance_scale": flexes[0].default_guidance_scale,
           "weak_patch": args.weak_patch,
           "note": "relative errors of the weak mode against the powerful one on the powerful mode's own "
                   "trajectories, mean over captions; models in the order of 'flexi'",
           "per_step": steps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    plot(out / "gap.png", res)
    for r in steps[:: max(1, args.steps // 10)]:
        print(f"step {r['step']:2d} sigma {r['sigma']:.3f} within-cell {r['within_cell_share']:.2f}  " + "  |  ".join(
            f"guided {m['guided']:.3f} cond {m['conditional']:.3f} direction {m['guidance_direction']:.3f}"
            for m in r["models"]))


def plot(path: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sig = [r["sigma"] for r in res["per_step"]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
    for ax, key in zip(axes, ("guided", "conditional", "guidance_direction")):
        for m, name in enumerate(res["flexi"]):
            ax.plot(sig, [r["models"][m][key] for r in res["per_step"]], "o-", ms=3, label=name)
        ax.set_xlabel("sigma (1 = noise)")
        ax.set_title(f"{key}: |weak - powerful| / |powerful|", fontsize=9)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"FlexiDiT weak mode (patch {res['weak_patch']}) against the powerful mode, along "
                 f"{res['steps']}-step Euler CFG trajectories")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
