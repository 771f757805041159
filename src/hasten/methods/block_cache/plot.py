"""A calibrated Block Caching plan drawn: the change curves (paper Fig. 3) and the schedule (Fig. 4)."""

from __future__ import annotations

import os
from pathlib import Path

from .schedule import ideal_speedup, schedule_from_changes


def plot(plan: dict, path: str | os.PathLike, delta: float | None = None) -> Path:
    """PNG of the change curves L1rel(i, n) (paper Fig. 3) and the compute schedule (paper Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ...io import atomic_write

    curves = plan["l1rel"]
    delta = plan.get("delta") if delta is None else delta
    masks = schedule_from_changes(curves, delta) if delta is not None else plan["schedule"]
    names = plan.get("blocks") or [f"block {i}" for i in range(len(curves))]
    ncalls = len(curves[0])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 2.2 + 0.35 * len(curves) + 3), sharex=True,
                                   gridspec_kw={"height_ratios": [3, max(1.2, 0.3 * len(curves))]})
    cmap = plt.get_cmap("viridis")
    for i, c in enumerate(curves):
        xs = [n for n in range(ncalls) if c[n] is not None]
        ax1.plot(xs, [c[n] for n in xs], color=cmap(i / max(len(curves) - 1, 1)), lw=1.4, label=names[i])
    ax1.set_ylabel("L1rel(i, n)  (Eq. 6)")
    ax1.set_yscale("log")
    ax1.set_title(f"{plan['model']['class']}, {plan['steps']} {plan['solver']} steps: block change per call")
    ax1.legend(fontsize=7, ncol=2)
    ax1.grid(alpha=0.3)
    for i, m in enumerate(masks):
        xs = [n for n in range(ncalls) if m[n]]
        ax2.scatter(xs, [i] * len(xs), marker="s", s=14, color="black")
    ax2.set_yticks(range(len(curves)), names, fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xlabel("denoiser call n (0 = noise)")
    ax2.set_title(f"schedule for delta = {delta} (square = computed), ideal speedup {ideal_speedup(masks):.2f}x",
                  fontsize=9)
    fig.tight_layout()

    def _write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    try:
        return atomic_write(path, _write)
    finally:
        plt.close(fig)
