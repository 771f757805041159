"""Record the decoding benchmark: ``python benchmarks/decode/bench_decode.py [--problems N]``.

Same as ``hasten bench-decode --out benchmarks/decode``: latency per completed answer (median, p90)
and accuracy for target-only (transformers and hasten loops), transformers assisted generation (its
defaults and its best ``num_assistant_tokens``), hasten speculative (greedy and sampling) and hasten
Judge Decoding, side by side in one process on the held-out test split, one CPU thread, interleaved.
Writes ``results.json`` and ``results.md`` next to this file.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=None, help="first N held-out problems (default: all 300)")
    ap.add_argument("--tune-problems", type=int, default=16, help="validation problems for choosing settings")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()

    from hasten.decoding.assets import load_shipped
    from hasten.decoding.bench import markdown_table, run_benchmark, write_results

    models = load_shipped(threads=1)
    r = run_benchmark(models, n_problems=args.problems, tune_problems=args.tune_problems)
    write_results(r, args.out)
    print(markdown_table(r))


if __name__ == "__main__":
    main()
