"""Block Caching (Wimbauer et al., "Cache Me if You Can", arXiv 2312.03209).

A block is ``B_i(x) = x + C_i(x)`` per stream. On a *compute* call the block runs and, if the next call
reuses it, its residual ``C_i = B_i(x) - x`` (per stream, per row of the guidance batch) is kept; on
a *reuse* call the block's forward is NOT called and its output is ``x + C_i(cached)``.

Index convention (fixed here; the paper's is ambiguous). Calls of a run are numbered n = 0..N-1 (with
Euler and batched CFG, n is the step; with Heun a step makes two calls). Eq. 6 is recorded as

    L1rel(i, n) = || C_i(n) - C_i(n-1) ||_1 / || C_i(n-1) ||_1,     n = 1..N-1,

the relative change of block i's residual from call n-1 to call n, normalised by the earlier call
(the paper's x_t is the earlier, noisier state), per sample, averaged over conditions x seeds and over
the rows of the guidance batch; L1rel(i, 0) is undefined (stored as null). The schedule (Eq. 7):
call 0 computes every block; after block i was computed at call a, call b > a reuses it while

    sum_{n=a+1}^{b} L1rel(i, n) <= delta,

and computes it at the first b where the sum exceeds delta (then a = b). Example: a constant
L1rel = 0.2 with delta = 0.5 computes at calls 0, 3, 6, ... (sums 0.2, 0.4 reuse; 0.6 computes).
A delta below the smallest L1rel computes everything (bitwise equal to no caching); the number of
computations never rises as delta grows.

Scale-shift alignment (paper Sec. 3.3): for each cached block and stream, a linear layer maps a
sinusoidal embedding of the call's timestep to a per-channel scale s and shift b, zero-initialised, and
a reused output becomes ``x + (1 + s) * C_i(cached) + b``. Trained by distillation (see
``train_scale_shift``); stored as safetensors beside the plan.

Layout of this package, by job: ``schedule`` (the config and Eq. 7), ``runtime`` (the block hook,
per-stream caches, scale-shift alignment, ``install``, first-run calibration), ``calibrate``
(recording Eq. 6 on full-compute runs) and ``plot``. Scale-shift *training* drives hasten's own
pipeline and lives outside the core in :mod:`hasten.scale_shift`; ``--accel`` spec parsing lives
in :mod:`hasten.specs`.
"""

from __future__ import annotations

from .. import MethodInfo, register
from .calibrate import calibrate, record_changes
from .plot import plot
from .runtime import ScaleShift, build_scale_shift, install, time_features
from .schedule import CONVENTION, METHOD, BlockCache, ideal_speedup, load_block_cache_plan, schedule_from_changes

__all__ = ["CONVENTION", "METHOD", "BlockCache", "ScaleShift", "build_scale_shift", "calibrate", "ideal_speedup",
           "install", "load_block_cache_plan", "plot", "record_changes", "schedule_from_changes", "time_features"]

register(MethodInfo(name=METHOD, config=BlockCache, install=install, level="block", calibrate=calibrate, plot=plot))
