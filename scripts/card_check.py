"""Record a shipped student's check metrics (``hasten.eval.shapes_eval.card_check``) in its folder and card.

    python scripts/card_check.py shapes-ard4

Writes ``check_metrics.json`` (one entry per step count the model samples at) and adds (or replaces) the
"Check" section of its ``MODEL_CARD.md``; ``tests/test_shipped_models.py`` re-runs the same evaluation and
compares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import hasten
from hasten.eval.shapes_eval import CHECK_FILE, card_check
from hasten.io import atomic_write

HEADING = "## Check (re-run by tests/test_shipped_models.py)"


def write_check(name: str) -> list[dict]:
    pipe = hasten.load_pipeline(name)
    folder = Path(pipe.model_dir)
    rows = [card_check(pipe, k) for k in getattr(pipe, "step_counts", (pipe.num_steps,))]
    atomic_write(folder / CHECK_FILE, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2) + "\n"))
    card = folder / "MODEL_CARD.md"
    text = card.read_text().split(HEADING)[0].rstrip() + "\n\n" + HEADING + "\n"
    text += (f"The first {rows[0]['samples']} held-out captions on noise seed 0 (`{CHECK_FILE}`; FD at this n is "
             "biased upwards, compare it only with itself):\n\n| steps | adherence | FD-shapes |\n|---:|---:|---:|\n")
    text += "".join(f"| {r['steps']} | {r['adherence']:.3f} | {r['fd_shapes']:.2f} |\n" for r in rows)
    atomic_write(card, lambda tmp: Path(tmp).write_text(text))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="an embedded student (e.g. shapes-ard4, shapes-flash)")
    for row in write_check(ap.parse_args().name):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
