"""The Eq. 6 recorder: each block's relative residual change between consecutive calls of a stream."""

from __future__ import annotations

import torch

from ...adapters.diffusers import arg_positions, stream_inputs


class _Recorder:
    """Runs every block and accumulates L1rel(i, n) per sample (Eq. 6)."""

    def __init__(self, handle, blocks):
        self.handle = handle
        self.blocks = blocks
        self.prev: dict[tuple, list[torch.Tensor]] = {}  # (block, stream) -> residuals of the last call
        self.sums: list[dict[int, float]] = [dict() for _ in blocks]
        self.counts: list[dict[int, int]] = [dict() for _ in blocks]
        self.pos = [arg_positions(b.module, b.outputs) for b in blocks]
        self.channels: list[list[int | None]] = [[None] * len(b.outputs) for b in blocks]

    active = True  # recording (first-run calibration switches it off when done)
    run = 0  # first-run calibration: the run recorded
    interrupted = False  # ... and whether a call of it raised (its curves are then partial)
    guidance_scale: float | None = None  # ... and its guidance scale

    def reset(self) -> None:
        self.prev = {}

    def restart(self, run: int) -> None:
        """Drop everything recorded and record run ``run`` instead (the one recorded was interrupted)."""
        self.prev, self.run, self.interrupted = {}, run, False
        self.sums = [dict() for _ in self.blocks]
        self.counts = [dict() for _ in self.blocks]

    def hook(self, i: int):
        spec = self.blocks[i]
        pos = self.pos[i]

        def fn(orig, *args, **kwargs):
            out = orig(*args, **kwargs)
            if not (self.active and self.handle.primary):
                return out
            outs = (out,) if spec.single else out
            res = []
            for x, y in zip(stream_inputs(spec.outputs, pos, args, kwargs), outs, strict=False):
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


def trajectory_timesteps(log) -> dict[int, list[float | None]]:
    """Per run in a handle's call log, the timesteps of its first stream: one trajectory (the first branch
    of a pipeline that sends the guidance branches as separate calls)."""
    per_run: dict[int, list[float | None]] = {}
    first: dict[int, tuple] = {}
    for e in log:
        stream = first.setdefault(e["run"], (e.get("branch"), e["rows"]))
        if (e.get("branch"), e["rows"]) == stream:
            per_run.setdefault(e["run"], []).append(e["t"])
    return per_run
