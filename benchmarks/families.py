"""Block Caching (and Block Caching + Adaptive Guidance) through the full diffusers pipeline of every family.

    python benchmarks/families.py                      # every family; writes benchmarks/families/results.{json,md}
    python benchmarks/families.py --families wan flux  # a subset

The same checks as ``tests/test_family_pipelines.py``, recorded instead of asserted, on the tiny
random-weight pipelines of :mod:`hasten.testing_pipelines` (no download; ``STEPS`` steps, ``B`` samples,
guidance on). Per family:

- ``nfe_plain``: transformer rows per sample per run with hasten installed and no method (2 per CFG step
  expected);
- calibration: ``hasten.calibrate(pipe, BlockCache(delta=0.5), runner=run, seeds=(1, 2))``; ``smallest_change``
  is the smallest recorded L1rel;
- below: ``BlockCache(plan=plan, delta=smallest_change / 2)``: ``exact_below`` (output bitwise equal to the
  plain pipeline's), ``block_calls_below`` (real block forward calls, counted under hasten's hooks) and
  ``reused_below``;
- above: ``delta=10``: ``block_calls_above``, ``reused_above``, ``schedule_above`` (the calls each block
  computes), whether the output is finite and differs from the plain one;
- separate-call families: ``BlockCache(schedule=[compute, reuse, ...])`` + ``AdaptiveGuidance(threshold=-1)``
  (``nfe_with_ag_and_bc``, ``block_calls_with_ag_and_bc``: the conditional branch computes at steps 0 and 2,
  the unconditional one only at step 0) and ``AdaptiveGuidance(threshold=2)`` + an all-compute schedule
  (``exact_with_ag_and_bc_no_switch``).

A family whose run fails records the error (``error``) and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import diffusers
import torch

import hasten
from hasten.adapters import discover_blocks
from hasten.io import atomic_write, write_json
from hasten.methods.block_cache import schedule_from_changes
from hasten.testing_pipelines import BUILDERS, PIPELINES, SEPARATE, STEPS, B, count_block_calls

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "families" / "results.json"
DELTA_ABOVE = 10.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a, b))


def measure(name: str) -> dict[str, Any]:
    """Every check for one family (see the module docstring)."""
    t0 = time.perf_counter()
    pipe, run = BUILDERS[name]()
    nblocks = len(discover_blocks(pipe.transformer))
    streams = 2 if name in SEPARATE else 1
    ref = run(0)
    rec: dict[str, Any] = {"pipeline": PIPELINES[name], "through": "pipeline", "separate_branch_calls": streams == 2,
                           "blocks": nblocks, "steps": STEPS, "samples": B}
    with hasten.accelerate(pipe) as h:
        run(0)
        rec["nfe_plain"] = h.report()["nfe"]
    plan = hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), runner=run, seeds=(1, 2), steps=STEPS)
    changes = [v for c in plan["l1rel"] for v in c if v is not None]
    smallest = min(changes)
    rec["smallest_change"] = smallest
    rec["largest_change"] = max(changes)

    with count_block_calls(pipe.transformer) as counts:
        with hasten.accelerate(pipe, hasten.BlockCache(plan=plan, delta=smallest / 2)) as h:
            out = run(0)
            bc = h.report()["methods"]["block-cache"]
    rec.update(delta_below=smallest / 2, exact_below=_equal(out, ref), block_calls_below=list(counts),
               reused_below=bc["reused"])

    masks = schedule_from_changes(plan["l1rel"], DELTA_ABOVE)
    with count_block_calls(pipe.transformer) as counts:
        with hasten.accelerate(pipe, hasten.BlockCache(plan=plan, delta=DELTA_ABOVE)) as h:
            out = run(0)
            bc = h.report()["methods"]["block-cache"]
    rec.update(delta_above=DELTA_ABOVE, schedule_above=[[n for n, c in enumerate(m) if c] for m in masks],
               block_calls_above=list(counts), reused_above=bc["reused"],
               finite_above=bool(torch.isfinite(out).all()), differs_above=not _equal(out, ref),
               skips_above=list(counts) == [sum(m) * streams for m in masks] and sum(bc["reused"]) > 0)
    rec["disabled_exact"] = _equal(run(0), ref)

    if streams == 2:
        with hasten.accelerate(pipe, hasten.BlockCache(schedule=[[True] * STEPS] * nblocks),
                               hasten.AdaptiveGuidance(threshold=2.0)):
            rec["exact_with_ag_and_bc_no_switch"] = _equal(run(0), ref)
        sched = [[True, False] * (STEPS // 2)] * nblocks
        with count_block_calls(pipe.transformer) as counts:
            with hasten.accelerate(pipe, hasten.BlockCache(schedule=sched),
                                   hasten.AdaptiveGuidance(threshold=-1)) as h:
                out = run(0)
                rep = h.report()
        rec.update(schedule_with_ag=[n for n, c in enumerate(sched[0]) if c], nfe_with_ag_and_bc=rep["nfe"],
                   block_calls_with_ag_and_bc=list(counts),
                   block_calls_with_ag_and_bc_expected=[sum(sched[0]) + 1] * nblocks,
                   finite_with_ag_and_bc=bool(torch.isfinite(out).all()))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def measure_family(name: str) -> dict[str, Any]:
    """``measure``; a family's failure is recorded, not the end of the benchmark."""
    try:
        return measure(name)
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        log(f"{name}: {err}")
        return {"pipeline": PIPELINES[name], "through": "pipeline", "error": err}


def machine() -> str:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{platform.platform()}; {cpu}; {torch.get_num_threads()} torch thread(s)"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    if isinstance(v, list):
        return "/".join(_fmt(x) for x in v)
    return str(v)


def markdown(result: dict[str, Any]) -> str:
    cols = [("family", None), ("pipeline", "pipeline"), ("through", "through"), ("blocks", "blocks"),
            ("smallest change", "smallest_change"), ("exact below", "exact_below"),
            ("block calls below", "block_calls_below"), ("block calls above", "block_calls_above"),
            ("reused above", "reused_above"), ("nfe plain", "nfe_plain"),
            ("nfe AG+BC", "nfe_with_ag_and_bc"), ("block calls AG+BC", "block_calls_with_ag_and_bc"),
            ("error", "error")]
    lines = [f"# Block Caching through each family's pipeline ({result['steps']} steps, {result['samples']} samples)",
             "", f"{result['date']}; {result['machine']}; torch {result['torch']}, diffusers {result['diffusers']}; "
             f"`{result['command']}`", "",
             "Block calls are real block forward calls per block (counted under hasten's hooks); below: "
             "delta = smallest change / 2, above: delta = 10; AG+BC: AdaptiveGuidance(threshold=-1) with the "
             "schedule compute/reuse/compute/reuse (separate-call pipelines only).", "",
             "| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for name, rec in result["families"].items():
        row = []
        for col, key in cols:
            if col == "family":
                row.append(name)
            else:
                row.append(_fmt(rec.get(key)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path (the .md is written beside it)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    families = {}
    for name in args.families:
        log(f"{name} ...")
        families[name] = measure_family(name)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "python": platform.python_version(), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "hasten": hasten.__version__,
              "command": " ".join(["python", *sys.argv]), "steps": STEPS, "samples": B, "families": families}
    write_json(args.out, result)  # a temporary file beside it, then os.replace

    def write_md(tmp: str) -> None:
        Path(tmp).write_text(markdown(result))

    atomic_write(args.out.with_suffix(".md"), write_md)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    print(json.dumps({n: {k: r.get(k) for k in ("exact_below", "skips_above", "nfe_plain", "nfe_with_ag_and_bc",
                                                "error")} for n, r in families.items()}, indent=1))


if __name__ == "__main__":
    main()
