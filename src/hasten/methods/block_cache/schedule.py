"""Block Caching's configuration and its schedule (Eq. 7): which block computes at which call."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ...errors import HastenError

METHOD = "block-cache"
CONVENTION = ("L1rel[i][n] = |C_i(n) - C_i(n-1)|_1 / |C_i(n-1)|_1 with n the call index (n >= 1); compute "
              "at call 0, then at the first b with sum_{n=a+1}^{b} L1rel[i][n] > delta (a: last compute)")


@dataclass
class BlockCache:
    """Block Caching config.

    - ``plan``: a calibrated plan (path or dict, from ``hasten.calibrate``); with ``delta`` given too,
      the schedule is re-derived from the plan's curves with that delta.
    - ``delta``: threshold of Eq. 7 (>= 0). Without a plan, ``hasten.calibrate`` needs it.
    - ``schedule``: an explicit compute mask ``[block][call]`` (True = compute), instead of a plan.
    - ``scale_shift``: safetensors path (or a state dict) of trained scale-shift parameters; by default
      the plan's own ``scale_shift_file`` is used when the plan's delta is the one in use; ``False``
      turns it off.
    - ``measure``: diagnostic mode; a reused block also runs its forward (no speedup) and the report
      gets ``reuse_error[i]``, the mean relative L1 error of the reused output against the computed one.
    """

    delta: float | None = None
    plan: str | os.PathLike | dict | None = None
    schedule: Sequence[Sequence[bool]] | None = None
    scale_shift: str | os.PathLike | dict | bool | None = None
    measure: bool = False  # diagnostic: reused blocks ALSO run, to record the reuse error (no speedup)

    def __post_init__(self) -> None:
        if self.delta is not None:
            try:
                d = float(self.delta)
            except (TypeError, ValueError):
                raise HastenError(f"delta must be a number, got {self.delta!r}") from None
            if not d >= 0 or math.isinf(d):
                raise HastenError(f"delta must be a finite number >= 0, got {self.delta}")
            self.delta = d


# --------------------------------------------------------------------------- the schedule (Eq. 7)
def schedule_from_changes(changes: Sequence[Sequence[float | None]], delta: float) -> list[list[bool]]:
    """Compute masks ``[block][call]`` from L1rel curves ``[block][call]`` (entry 0 ignored), Eq. 7."""
    if not delta >= 0:
        raise HastenError(f"delta must be >= 0, got {delta}")
    masks = []
    for curve in changes:
        mask, acc = [True], 0.0
        for n in range(1, len(curve)):
            c = curve[n]
            acc += math.inf if c is None or not math.isfinite(c) else float(c)
            if acc > delta:
                mask.append(True)
                acc = 0.0
            else:
                mask.append(False)
        masks.append(mask)
    return masks


def ideal_speedup(masks: Sequence[Sequence[bool]]) -> float:
    """Block evaluations without caching / with caching (the speedup if only blocks cost time)."""
    total = sum(len(m) for m in masks)
    done = sum(sum(m) for m in masks)
    return total / max(done, 1)


def load_block_cache_plan(path: str | os.PathLike | dict) -> dict:
    """A Block Caching plan file (or dict), checked: the common plan fields, its schedule, curves (Eq. 6) and
    channels, and one schedule entry per recorded call for every block."""
    from ...plans import load_plan

    plan = load_plan(path, METHOD, required=("schedule", "l1rel", "channels"))
    rows = plan["schedule"], plan["l1rel"]
    if not all(isinstance(r, list) and all(isinstance(m, list) and len(m) == plan["calls"] for m in r)
               for r in rows) or len(rows[0]) != len(rows[1]):
        raise HastenError(f"{plan.get('_path', 'the plan')} is corrupt: its schedule and curves need one row per "
                          f"block of {plan['calls']} calls each")
    return plan
