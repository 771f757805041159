"""Record the decoding benchmark: ``python benchmarks/decode/bench_decode.py [--problems N] [--reps R]``.

Same as ``hasten bench-decode --out benchmarks/decode``: target-only (transformers and hasten loops),
transformers assisted generation (same k, and its defaults), hasten speculative and hasten Judge
Decoding, side by side in one process on the held-out test split, one CPU thread, interleaved.
Writes ``results.json`` and ``results.md`` next to this file.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--problems", type=int, default=None, help="first N held-out problems (default: all 300)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()

    from hasten.decoding.assets import load_shipped
    from hasten.decoding.bench import markdown_table, run_benchmark, write_results

    models = load_shipped(threads=1)
    r = run_benchmark(models, k=args.k, n_problems=args.problems, reps=args.reps)
    write_results(r, args.out)
    print(markdown_table(r))


if __name__ == "__main__":
    main()
