"""Block Caching calibration: record each block's relative change per call (Eq. 6) on full-compute
runs and derive the schedule for a threshold (Eq. 7)."""

from __future__ import annotations

import torch

from ...errors import HastenError
from ...hooks import attach
from ...plans import new_plan
from .runtime import _positions
from .schedule import CONVENTION, METHOD, BlockCache, ideal_speedup, schedule_from_changes


# --------------------------------------------------------------------------- calibration (Eq. 6)
class _Recorder:
    """Runs every block and accumulates L1rel(i, n) per sample (Eq. 6)."""

    def __init__(self, handle, blocks):
        self.handle = handle
        self.blocks = blocks
        self.prev: dict[tuple, list[torch.Tensor]] = {}  # (block, stream) -> residuals of the last call
        self.sums: list[dict[int, float]] = [dict() for _ in blocks]
        self.counts: list[dict[int, int]] = [dict() for _ in blocks]
        self.pos = [_positions(b.module, b.outputs) for b in blocks]
        self.channels: list[list[int | None]] = [[None] * len(b.outputs) for b in blocks]

    def reset(self) -> None:
        self.prev = {}

    def hook(self, i: int):
        spec = self.blocks[i]
        pos = self.pos[i]

        def fn(orig, *args, **kwargs):
            out = orig(*args, **kwargs)
            if not self.handle.primary:
                return out
            outs = (out,) if spec.single else out
            res = []
            for name, p, y in zip(spec.outputs, pos, outs, strict=False):
                x = kwargs[name] if name in kwargs else (args[p] if p is not None and p < len(args) else None)
                res.append(None if (x is None or y is None) else (y - x).detach().float())
            self.channels[i] = [None if r is None else int(r.shape[-1]) for r in res]
            key = (i, self.handle.stream)
            prev = self.prev.get(key)
            n = self.handle.call_index
            if prev is not None and n > 0:
                num = den = 0.0
                for r0, r1 in zip(prev, res, strict=False):
                    if r0 is None or r1 is None or r0.shape != r1.shape:
                        continue
                    num = num + (r1 - r0).abs().flatten(1).sum(1)
                    den = den + r0.abs().flatten(1).sum(1)
                if isinstance(num, torch.Tensor):
                    rel = num / den.clamp_min(1e-12)
                    self.sums[i][n] = self.sums[i].get(n, 0.0) + float(rel.double().sum())
                    self.counts[i][n] = self.counts[i].get(n, 0) + rel.numel()
            self.prev[key] = res
            return out

        return fn

    def curves(self, ncalls: int) -> list[list[float | None]]:
        return [[None] + [self.sums[i][n] / self.counts[i][n] if self.counts[i].get(n) else None
                          for n in range(1, ncalls)] for i in range(len(self.blocks))]


def record_changes(run) -> tuple[list[list[float | None]], list[float], list[str], list]:
    """Full-compute runs over every seed: (L1rel curves [block][call], timesteps, block names, channels)."""
    handle = attach(run.target)
    try:
        blocks = handle.blocks()
        rec = _Recorder(handle, blocks)
        handle.on_run_start(rec.reset)
        for i, spec in enumerate(blocks):
            handle.wrap_block(spec.module, rec.hook(i), spec.name)
        for seed in run.seeds:
            handle.reset()
            run.run(seed)
        log = handle.report()["log"]
    finally:
        handle.disable()
    per_run: dict[int, list[float]] = {}
    first: dict[int, tuple] = {}  # each run's first stream: the timesteps of one trajectory
    for e in log:
        stream = first.setdefault(e["run"], (e.get("branch"), e["rows"]))
        if (e.get("branch"), e["rows"]) == stream:
            per_run.setdefault(e["run"], []).append(e["t"])
    lengths = {len(v) for v in per_run.values()}
    if len(lengths) != 1:
        raise HastenError(f"calibration runs made different numbers of denoiser calls: {sorted(lengths)}")
    timesteps = per_run[min(per_run)]
    return rec.curves(len(timesteps)), timesteps, [b.name for b in blocks], rec.channels


def calibrate(run, cfg: BlockCache) -> dict:
    """Record L1rel (Eq. 6) on full-compute runs and derive the schedule (Eq. 7) for ``cfg.delta``."""
    if cfg.delta is None:
        raise HastenError("calibration needs a threshold: BlockCache(delta=0.5)")
    curves, timesteps, names, channels = record_changes(run)
    masks = schedule_from_changes(curves, cfg.delta)
    return new_plan(METHOD, run.transformer, timesteps=timesteps, **run.plan_fields(), delta=cfg.delta,
                    blocks=names, channels=channels, index_convention=CONVENTION,
                    ideal_speedup=round(ideal_speedup(masks), 4),
                    schedule=[[int(v) for v in m] for m in masks],
                    l1rel=[[None if v is None else round(v, 6) for v in c] for c in curves])
