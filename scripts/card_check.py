"""Record a shipped student's check metrics (``hasten.eval.shapes_eval.card_check``) in its folder and card.

    python scripts/card_check.py shapes-ard4

Writes ``check_metrics.json`` (one entry per step count the model samples at) and adds (or replaces) the
"Check" section of its ``MODEL_CARD.md``; ``tests/test_shipped_models.py`` re-runs the same evaluation and
compares. Also holds what ``make_ard_model.py`` and ``make_flash_model.py`` share: :func:`ship_run` copies a
run's files into the package and verifies them, :func:`write_check` records the check.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from make_flexi_model import base_seconds, run_log  # scripts/ is on sys.path when this script runs

import hasten
from hasten.eval.shapes_eval import CHECK_FILE, card_check
from hasten.io import atomic_copy, atomic_write
from hasten.pipeline import MODELS_DIR

HEADING = "## Check (re-run by tests/test_shipped_models.py)"


@dataclass
class ShippedRun:
    dest: Path  # the embedded model's folder
    pipe: Any  # the shipped model, loaded
    cfg: dict  # the run's student config
    log: dict  # its training log (:func:`run_log`)
    share: str  # its training time as a sentence, against the base model's

    @property
    def size_mb(self) -> float:
        return (self.dest / "student.safetensors").stat().st_size / 2**20

    def loss_points(self, digits: int) -> str:
        """About seven points of the loss curve, for the card."""
        curve = self.log["curve"]
        return ", ".join(f"step {c['step']}: {c['loss']:.{digits}f}" for c in curve[:: max(1, len(curve) // 6)])


def ship_run(run: Path, name: str, config_file: str) -> ShippedRun:
    """Copy the run's ``config_file`` and weights into the embedded model ``name`` and check that the shipped
    model samples exactly what the run's weights sample."""
    dest = MODELS_DIR / name.replace("-", "_")
    dest.mkdir(parents=True, exist_ok=True)
    for f in (config_file, "student.safetensors"):
        atomic_copy(run / f, dest / f)
    shipped, trained = hasten.load_pipeline(name), hasten.load_pipeline(run)
    noise = torch.randn(2, *shipped.latent_shape, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "two blue squares"]
    a = shipped(prompts, latents=noise, output_type="latent").images
    assert torch.equal(a, trained(prompts, latents=noise, output_type="latent").images)
    cfg = json.loads((run / config_file).read_text())
    log = run_log(run)
    b_s = base_seconds(cfg["base"])
    share = f"{log['seconds'] / 60:.1f} min wall on the 2-core machine" + (
        f", {100 * log['seconds'] / b_s:.1f}% of the base model's {b_s / 60:.0f} min" if b_s else "")
    return ShippedRun(dest, shipped, cfg, log, share)


def check_bench_weights(res: dict, module: torch.nn.Module, bench: Path) -> None:
    """Refuse a bench file measured on other weights than ``module`` (its ``weights`` fingerprint,
    :func:`hasten.plans.weights_hash`), so a card never quotes another model's figures; a file written before
    benches recorded the fingerprint is used with a warning."""
    from hasten.plans import weights_hash

    have = res.get("weights")
    if have is None:
        print(f"warning: {bench} records no weights fingerprint; its figures cannot be checked against these weights")
    elif have != weights_hash(module):
        raise SystemExit(f"{bench} measured other weights than the ones shipped here: re-run it on them")


def write_check(pipe: Any) -> list[dict]:
    """Evaluate the shipped student ``pipe`` at each of its step counts; write its folder's check metrics and
    the card's "Check" section."""
    folder = Path(pipe.model_dir)
    rows = [card_check(pipe, k) for k in pipe.step_counts]
    atomic_write(folder / CHECK_FILE, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2) + "\n"))
    card = folder / "MODEL_CARD.md"
    text = card.read_text().split(HEADING)[0].rstrip() + "\n\n" + HEADING + "\n"
    text += (f"The first {rows[0]['samples']} held-out captions on noise seed {rows[0]['noise_seed']} (`{CHECK_FILE}`; "
             "FD at this n is biased upwards, compare it only with itself):\n\n"
             "| steps | adherence | FD-shapes |\n|---:|---:|---:|\n")
    text += "".join(f"| {r['steps']} | {r['adherence']:.3f} | {r['fd_shapes']:.2f} |\n" for r in rows)
    atomic_write(card, lambda tmp: Path(tmp).write_text(text))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="an embedded student (e.g. shapes-ard4, shapes-flash)")
    for row in write_check(hasten.load_pipeline(ap.parse_args().name)):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
