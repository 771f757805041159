"""``hasten bench`` outputs for people: the markdown table and the Pareto figure."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..io import atomic_write

FAMILY_STYLE = {"baseline": ("s", "tab:gray"), "hasten": ("o", "tab:red"), "peer": ("^", "tab:blue")}
PSNR_PLOT_CAP = 60.0  # the reference run is 100 dB (identical images); drawn at the cap


def _fmt(v: object, spec: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def pareto_front(points: Sequence[tuple[float, float]], higher_x_better: bool) -> list[tuple[float, float]]:
    """The non-dominated points (x = quality, y = speedup; higher speedup is better), sorted by x."""
    def better_eq(a: float, b: float) -> bool:
        return a >= b if higher_x_better else a <= b

    def dominated(p: tuple[float, float]) -> bool:
        return any(better_eq(q[0], p[0]) and q[1] >= p[1] and q != p for q in points)

    front = [p for p in points if not dominated(p)]
    return sorted(set(front))


def markdown(results: dict) -> str:
    """The results as markdown: machine, protocol, the quality-level comparison, then every record."""
    m, p = results["machine"], results["protocol"]
    lines = [f"# hasten bench: {results['model']}", "",
             f"{results['date']} · {m['cpu']} · {m['cores']} cores · torch {m['torch']}"
             + (f" · {m.get('threads')} threads" if m.get("threads") else ""), "",
             f"{p.get('samples')} samples ({p.get('batch_size')} per batch, {p.get('reps')} interleaved "
             f"repetitions after a warm-up), guidance scale {p.get('guidance_scale')}, "
             f"{p.get('solver')} solver, "
             f"{p.get('schedule')} time grid; speed reference `{p.get('reference')}`. Speedup: median over "
             "batches of the paired ratio reference time / configuration time, end to end (text encoder, "
             "denoiser, decoder where the pipeline has them). PSNR/SSIM against the images of "
             f"`{p.get('quality_reference', p.get('reference'))}` from the same seeds.", ""]
    conv = p.get("convergence")
    if conv:
        lines += [f"Quality reference `{conv['reference']}`: {conv['reference_vs_finer_psnr']:.1f} dB against "
                  f"`{conv['finer']}` (50-step Euler: {conv['euler50_vs_finer_psnr']:.1f} dB), "
                  f"{conv['samples']} samples.", ""]
    if results["quality_levels"]:
        lines += ["## Fastest configuration at each quality level", "",
                  "| level | hasten | peer | fewer steps | hasten fastest? | hasten / best other |",
                  "|---|---|---|---|---|---|"]
        for row in results["quality_levels"]:
            cells = []
            for key in ("hasten", "peer", "fewer_steps"):
                b = row[key]
                cells.append("none" if b is None else f"{b['speedup']:.2f}x `{b['name']}`")
            verdict = {True: "yes", False: "**no**", None: "no hasten config"}[row["hasten_fastest"]]
            ratio = row.get("hasten_vs_best_other")
            if ratio is None:
                shown = "no other family passes" if row["hasten"] is not None else "–"
            else:
                shown = f"{ratio:.2f}x" + (" (target 1.3x met)" if row.get("target_met") else "")
            cells += [verdict, shown]
            lines.append(f"| {row['level']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _table(results["records"], with_quality=True)
    if results.get("realistic"):
        r = results["realistic"]
        lines += ["", f"## Realistic size: {r.get('architecture', '')}", "", r.get("note", ""), ""]
        if r.get("error"):
            lines += [f"The realistic-size check failed: {r['error']}", ""]
        lines += _table(r["records"], with_quality=False)
    return "\n".join(lines) + "\n"


def _table(records: list[dict], with_quality: bool) -> list[str]:
    head = ["name", "family", "solver", "speedup", "wall s (median/batch)", "denoiser share",
            "denoiser speedup", "NFE", "block evals", "peak RSS MB"]
    flops = any(r.get("transformer_flops_share") is not None for r in records)
    if flops:
        head.append("FLOPs share")
    setup = any(r.get("setup_s") is not None for r in records)
    if setup:
        head.append("setup s")
    text = any(r.get("adherence") is not None for r in records)
    if with_quality:
        head += ["PSNR", "SSIM", "FD-shapes", "adherence"] if text else ["PSNR", "SSIM", "FD-digits", "class acc"]
    head.append("error")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {f: i for i, f in enumerate(("baseline", "hasten", "peer"))}
    def solver(r: dict) -> str:
        return str(r["params"].get("solver", "–"))

    # grouped by family, then by solver (the reference's solver first), fastest first
    for r in sorted(records, key=lambda r: (order.get(r["family"], 9), solver(r) != "euler", solver(r),
                                           -(r["speedup"] or 0))):
        cells = [f"`{r['name']}`", r["family"], solver(r), _fmt(r["speedup"], ".2f"), _fmt(r["wall_s_median"], ".3f"),
                 _fmt(r.get("denoiser_share"), ".2f"), _fmt(r.get("denoiser_speedup"), ".2f"),
                 _fmt(r["nfe"], ".4g"), _fmt(r["block_evals"], ".4g"), _fmt(r["peak_rss_mb"], ".0f")]
        if flops:
            cells.append(_fmt(r.get("transformer_flops_share"), ".3f"))
        if setup:
            cells.append(_fmt(r.get("setup_s"), ".1f"))
        if with_quality:
            q = ("fd_shapes", "adherence") if text else ("fd_digits", "class_accuracy")
            cells += [_fmt(r["psnr"], ".2f"), _fmt(r["ssim"], ".4f"), _fmt(r.get(q[0]), ".3f"),
                      _fmt(r.get(q[1]), ".3f")]
        cells.append((r["error"] or "").replace("|", "/"))
        out.append("| " + " | ".join(cells) + " |")
    return out


def write_markdown(path: str | os.PathLike, results: dict) -> Path:
    text = markdown(results)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def plot_pareto(path: str | os.PathLike, results: dict) -> Path:
    """Speedup against FD-digits and against PSNR; one marker per family; each family's front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in results["records"] if r["error"] is None and r["speedup"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    fd_key = "fd_shapes" if any(r.get("fd_shapes") is not None for r in recs) else "fd_digits"
    fd_name = "FD-shapes" if fd_key == "fd_shapes" else "FD-digits"
    panels: list[tuple[str, Callable[[dict], float | None], bool, str]] = [
        ("fd", lambda r: r.get(fd_key), False, f"{fd_name} vs held-out (lower is better)"),
        ("psnr", lambda r: None if r["psnr"] is None else min(r["psnr"], PSNR_PLOT_CAP), True,
         f"PSNR vs full run, dB (higher is better; reference drawn at {PSNR_PLOT_CAP:g})")]
    for ax, (_key, get, higher, xlabel) in zip(axes, panels, strict=True):
        for fam, (marker, color) in FAMILY_STYLE.items():
            pts = [(get(r), r["speedup"]) for r in recs if r["family"] == fam and get(r) is not None]
            if not pts:
                continue
            ax.scatter([x for x, _ in pts], [y for _, y in pts], marker=marker, color=color, alpha=0.75,
                       label=fam, zorder=3)
            front = pareto_front(pts, higher_x_better=higher)
            ax.step([x for x, _ in front], [y for _, y in front], where="post" if not higher else "pre",
                    color=color, alpha=0.6, zorder=2)
        ref = results["quality_levels"][-1]["level"] if results["quality_levels"] else None
        if _key == "psnr":
            for lv in (40, 35, 30):
                ax.axvline(lv, color="k", lw=0.5, ls=":")
        elif ref and ref.split("<=")[0] in ("fd", "fd_shapes"):
            ax.axvline(float(ref.split("<=")[1].split()[0]), color="k", lw=0.5, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speedup vs full-step CFG baseline (paired, median)")
        ax.grid(alpha=0.3)
        ax.legend()
    m = results["machine"]
    fig.suptitle(f"hasten bench · {results['model']} · {results['date'][:10]} · {m['cpu']} · "
                 f"{m['cores']} cores")
    fig.tight_layout()

    def _save(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    out = atomic_write(path, _save)
    plt.close(fig)
    return out
