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
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import HastenError
from ..plans import check_call_timestep, check_plan, load_plan, new_plan
from . import MethodInfo, register

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
      the plan's own ``scale_shift`` file is used when it has one; ``False`` turns it off.
    """

    delta: float | None = None
    plan: str | os.PathLike | dict | None = None
    schedule: Sequence[Sequence[bool]] | None = None
    scale_shift: str | os.PathLike | dict | bool | None = None

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


# --------------------------------------------------------------------------- scale-shift
def time_features(t: torch.Tensor, dim: int = 64) -> torch.Tensor:
    """Sinusoidal features of the transformer's timestep (any scale), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ScaleShift(nn.Module):
    """Per-channel scale and shift from the timestep: ``r -> (1 + s(t)) r + b(t)``; zero-init = identity."""

    def __init__(self, channels: int, feat_dim: int = 64):
        super().__init__()
        self.feat_dim = feat_dim
        self.proj = nn.Linear(feat_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, residual: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ss = self.proj(time_features(t, self.feat_dim).to(residual.device)).to(residual.dtype)
        shape = (ss.shape[0],) + (1,) * (residual.dim() - 2) + (ss.shape[1],)
        s, b = ss.reshape(shape).chunk(2, dim=-1)
        return residual * (1 + s) + b


# --------------------------------------------------------------------------- the block hook
def _positions(module: nn.Module, names: Sequence[str | None]) -> list[int | None]:
    params = [p.name for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [params.index(n) if n in params else None for n in names]


class _Block:
    """State and hook of one cached block (hot path: keep it lean)."""

    __slots__ = ("handle", "index", "name", "names", "pos", "single", "main", "mask", "cache", "valid",
                 "batch", "computed", "reused", "forced", "tokens", "ss", "shared")

    def __init__(self, handle, index, spec, mask, shared):
        self.handle, self.index, self.name = handle, index, spec.name
        self.names = spec.outputs
        self.pos = _positions(spec.module, spec.outputs)
        self.single = spec.single
        self.main = spec.outputs.index("hidden_states") if "hidden_states" in spec.outputs else 0
        self.mask = list(mask)
        self.shared = shared  # dict with "ss" modules per block/stream (or None) and the entry
        self.ss: list[ScaleShift | None] | None = None
        self.computed = self.reused = self.forced = self.tokens = 0
        self.reset()

    def reset(self) -> None:
        self.cache: list[torch.Tensor | None] = [None] * len(self.names)
        self.valid: Any = None  # None: nothing cached, True: every row, BoolTensor: per row
        self.batch = 0

    def inputs(self, args, kwargs) -> list[torch.Tensor | None]:
        xs = []
        for name, p in zip(self.names, self.pos, strict=False):
            if name in kwargs:
                xs.append(kwargs[name])
            elif p is not None and p < len(args):
                xs.append(args[p])
            else:
                xs.append(None)
        return xs

    def ready(self, rows) -> bool:
        v = self.valid
        if v is None or self.batch != self.handle.full_batch:
            return False
        if v is True:
            return True
        return bool(v.all()) if rows is None else bool(v.index_select(0, rows).all())

    def __call__(self, orig, *args, **kwargs):
        h = self.handle
        n = h.call_index
        rows = h.active_rows
        dec = self.shared["decisions"]
        if n < len(self.mask) and not self.mask[n]:
            if self.ready(rows):
                self.reused += 1
                if dec is not None:
                    dec[self.index] = 82  # "R"
                return self.reuse(args, kwargs, rows)
            self.forced += 1
            if dec is not None:
                dec[self.index] = 70  # "F": reuse scheduled, no cache for these rows
        elif dec is not None:
            dec[self.index] = 67  # "C"
        out = orig(*args, **kwargs)
        self.computed += 1
        first = out if self.single else out[self.main]
        if isinstance(first, torch.Tensor) and first.dim() >= 2:
            self.tokens += first.shape[0] * first.shape[1]
        if n + 1 < len(self.mask) and not self.mask[n + 1]:
            self.keep(args, kwargs, out, rows)  # the next call reuses this block
        elif self.valid is not None:
            self.drop(rows)  # never reuse a residual older than the latest computation
        return out

    def drop(self, rows) -> None:
        if rows is None:
            self.valid = None
            self.cache = [None] * len(self.names)
            return
        v = self.valid
        if v is True:
            v = torch.ones(self.batch, dtype=torch.bool, device=rows.device)
        v[rows] = False
        self.valid = v

    def keep(self, args, kwargs, out, rows) -> None:
        xs = self.inputs(args, kwargs)
        outs = (out,) if self.single else out
        full = self.handle.full_batch
        if self.batch != full:
            self.reset()
            self.batch = full
        for k, (x, y) in enumerate(zip(xs, outs, strict=False)):
            if y is None or x is None:
                self.cache[k] = None
                continue
            r = y - x
            if rows is None:
                self.cache[k] = r
            else:
                c = self.cache[k]
                if c is None or c.shape[1:] != r.shape[1:]:
                    c = r.new_zeros((full,) + tuple(r.shape[1:]))
                c.index_copy_(0, rows, r)
                self.cache[k] = c
        if rows is None:
            self.valid = True
        elif self.valid is not True:
            v = self.valid if isinstance(self.valid, torch.Tensor) else torch.zeros(full, dtype=torch.bool,
                                                                                     device=rows.device)
            v[rows] = True
            self.valid = v

    def reuse(self, args, kwargs, rows):
        xs = self.inputs(args, kwargs)
        outs = []
        ss = self.ss
        t = None
        if ss is not None:
            t = self.handle.timestep
            t = torch.as_tensor(t).reshape(-1)
            if t.numel() == 1:
                t = t.expand(self.handle.full_batch)
            if rows is not None:
                t = t.index_select(0, rows.to(t.device))
        for k, x in enumerate(xs):
            c = self.cache[k]
            if c is None:
                outs.append(None)
                continue
            r = c if rows is None else c.index_select(0, rows)
            if ss is not None and ss[k] is not None:
                r = ss[k](r, t)
            outs.append(x + r)
        return outs[0] if self.single else tuple(outs)


# --------------------------------------------------------------------------- install
def resolve_masks(cfg: BlockCache, handle) -> tuple[list[list[bool]], dict | None]:
    """The compute masks for ``cfg`` on ``handle``'s transformer, and the plan (if any)."""
    if cfg.plan is not None:
        plan = load_plan(cfg.plan, METHOD)
        check_plan(plan, handle.transformer)
        if cfg.delta is not None:
            masks = schedule_from_changes(plan["l1rel"], cfg.delta)
        else:
            masks = [[bool(v) for v in m] for m in plan["schedule"]]
        return masks, plan
    if cfg.schedule is not None:
        return [[bool(v) for v in m] for m in cfg.schedule], None
    raise HastenError("BlockCache needs a plan: calibrate first (hasten.calibrate(pipe, "
                      "BlockCache(delta=0.5), ...) or `hasten calibrate`), then BlockCache(plan=...); "
                      "or give schedule=[[...]]")


def _load_scale_shift(cfg: BlockCache, plan: dict | None, blocks) -> dict | None:
    src = cfg.scale_shift
    if src is False:
        return None
    if src is None or src is True:
        if plan is None or not plan.get("scale_shift_file"):
            if src is True:
                raise HastenError("scale_shift=True but the plan has no scale-shift parameters: "
                                  "calibrate with --scale-shift")
            return None
        base = Path(plan.get("_path", ".")).parent if plan.get("_path") else Path(".")
        src = base / plan["scale_shift_file"]
    if isinstance(src, dict):
        return src
    from safetensors.torch import load_file

    p = Path(src)
    if not p.is_file():
        raise HastenError(f"scale-shift file {p} not found")
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise HastenError(f"cannot read scale-shift file {p}: {str(e).splitlines()[0]}") from None


def build_scale_shift(state: dict, blocks, names) -> list[list[ScaleShift | None]]:
    """ScaleShift modules per block and stream from a state dict with keys ``{i}.{k}.proj.weight``."""
    mods = []
    for i, spec in enumerate(blocks):
        row = []
        for k in range(len(spec.outputs)):
            w = state.get(f"{i}.{k}.proj.weight")
            if w is None:
                row.append(None)
                continue
            m = ScaleShift(w.shape[0] // 2, w.shape[1])
            m.load_state_dict({"proj.weight": w, "proj.bias": state[f"{i}.{k}.proj.bias"]})
            row.append(m)
        mods.append(row)
    return mods


def install(handle, cfg: BlockCache) -> None:
    blocks = handle.blocks()
    masks, plan = resolve_masks(cfg, handle)
    if len(masks) != len(blocks):
        raise HastenError(f"the schedule has {len(masks)} blocks but the model has {len(blocks)}")
    shared: dict[str, Any] = {"decisions": None}
    states = [_Block(handle, i, spec, masks[i], shared) for i, spec in enumerate(blocks)]
    ss_state = _load_scale_shift(cfg, plan, blocks)
    if ss_state is not None:
        for st, row in zip(states, build_scale_shift(ss_state, blocks, None), strict=False):
            st.ss = row if any(m is not None for m in row) else None
    nblocks = len(blocks)

    def call(inner, *args, **kwargs):
        if plan is not None:
            check_call_timestep(plan, handle.call_index, handle.log_entry.get("t"))
        dec = bytearray(b"-" * nblocks)
        shared["decisions"] = dec
        try:
            return inner(*args, **kwargs)
        finally:
            shared["decisions"] = None
            handle.log_entry["block_cache"] = dec.decode()

    def on_run() -> None:
        for st in states:
            st.reset()

    handle.wrap_call(call, METHOD)
    handle.on_run_start(on_run)
    for st, spec in zip(states, blocks, strict=False):
        handle.wrap_block(spec.module, st, spec.name)

    def report() -> dict:
        comp = [st.computed for st in states]
        reu = [st.reused for st in states]
        total = sum(comp) + sum(reu)
        return {"blocks": [st.name for st in states], "computed": comp, "reused": reu,
                "forced": [st.forced for st in states], "tokens_computed": sum(st.tokens for st in states),
                "block_evals_skipped": round(sum(reu) / max(total, 1), 4),
                "schedule_ideal_speedup": round(ideal_speedup(masks), 4),
                "scale_shift": ss_state is not None,
                "plan_delta": None if plan is None else plan.get("delta"),
                "delta": cfg.delta if cfg.delta is not None else (plan or {}).get("delta")}

    handle.add_report(METHOD, report)
    handle.block_cache_states = states  # for tests and training


# --------------------------------------------------------------------------- calibration (Eq. 6)
class _Recorder:
    """Runs every block and accumulates L1rel(i, n) per sample (Eq. 6)."""

    def __init__(self, handle, blocks):
        self.handle = handle
        self.blocks = blocks
        self.prev: list[list[torch.Tensor] | None] = [None] * len(blocks)
        self.sums: list[dict[int, float]] = [dict() for _ in blocks]
        self.counts: list[dict[int, int]] = [dict() for _ in blocks]
        self.pos = [_positions(b.module, b.outputs) for b in blocks]

    def reset(self) -> None:
        self.prev = [None] * len(self.blocks)

    def hook(self, i: int):
        spec = self.blocks[i]
        pos = self.pos[i]

        def fn(orig, *args, **kwargs):
            out = orig(*args, **kwargs)
            outs = (out,) if spec.single else out
            res = []
            for name, p, y in zip(spec.outputs, pos, outs, strict=False):
                x = kwargs[name] if name in kwargs else (args[p] if p is not None and p < len(args) else None)
                res.append(None if (x is None or y is None) else (y - x).detach().float())
            prev = self.prev[i]
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
            self.prev[i] = res
            return out

        return fn

    def curves(self, ncalls: int) -> list[list[float | None]]:
        return [[None] + [self.sums[i][n] / self.counts[i][n] if self.counts[i].get(n) else None
                          for n in range(1, ncalls)] for i in range(len(self.blocks))]


def record_changes(run) -> tuple[list[list[float | None]], list[float], list[str]]:
    """Full-compute runs over every seed; returns (L1rel curves [block][call], timesteps, block names)."""
    from ..api import accelerate

    handle = accelerate(run.target)
    try:
        blocks = handle.blocks()
        rec = _Recorder(handle, blocks)
        handle.on_run_start(rec.reset)
        for i, spec in enumerate(blocks):
            handle.wrap_block(spec.module, rec.hook(i), spec.name)
        run.run_all()
        log = handle.report()["log"]
    finally:
        handle.disable()
    per_run: dict[int, list[float]] = {}
    for e in log:
        per_run.setdefault(e["run"], []).append(e["t"])
    lengths = {len(v) for v in per_run.values()}
    if len(lengths) != 1:
        raise HastenError(f"calibration runs made different numbers of denoiser calls: {sorted(lengths)}")
    timesteps = per_run[min(per_run)]
    return rec.curves(len(timesteps)), timesteps, [b.name for b in blocks]


def calibrate(run, cfg: BlockCache) -> dict:
    """Record L1rel (Eq. 6) on full-compute runs and derive the schedule (Eq. 7) for ``cfg.delta``."""
    if cfg.delta is None:
        raise HastenError("calibration needs a threshold: BlockCache(delta=0.5)")
    curves, timesteps, names = record_changes(run)
    masks = schedule_from_changes(curves, cfg.delta)
    return new_plan(METHOD, run.transformer, timesteps=timesteps, **run.plan_fields(), delta=cfg.delta,
                    blocks=names, index_convention=CONVENTION,
                    ideal_speedup=round(ideal_speedup(masks), 4),
                    schedule=[[int(v) for v in m] for m in masks],
                    l1rel=[[None if v is None else round(v, 6) for v in c] for c in curves])


# --------------------------------------------------------------------------- spec / CLI
def from_spec(opts: dict[str, str], ctx) -> BlockCache:
    """``block-cache:plan=plan.json`` or ``block-cache:delta=0.5`` (calibrates on the fly)."""
    unknown = set(opts) - {"plan", "delta", "scale_shift"}
    if unknown:
        raise HastenError(f"unknown block-cache option {sorted(unknown)[0]!r}: use plan=PATH or delta=NUMBER")
    delta = None
    if "delta" in opts:
        try:
            delta = float(opts["delta"])
        except ValueError:
            raise HastenError(f"block-cache delta must be a number, got {opts['delta']!r}") from None
    ss: Any = None
    if "scale_shift" in opts:
        ss = {"0": False, "false": False, "off": False, "1": True, "true": True, "on": True}.get(
            opts["scale_shift"].lower(), opts["scale_shift"])
    if "plan" in opts:
        plan = load_plan(opts["plan"], METHOD)
        plan["_path"] = opts["plan"]
        tr = getattr(ctx.pipe, "transformer", ctx.pipe)
        check_plan(plan, tr, steps=ctx.steps, solver=ctx.solver, schedule=ctx.schedule)
        return BlockCache(delta=delta, plan=plan, scale_shift=ss)
    if delta is None:
        raise HastenError("block-cache needs plan=PATH or delta=NUMBER, e.g. --accel block-cache:delta=0.5")
    from ..api import calibrate as api_calibrate

    cfg = BlockCache(delta=delta)
    plan = api_calibrate(ctx.pipe, cfg, steps=ctx.steps, solver=ctx.solver, schedule=ctx.schedule,
                         guidance_scale=ctx.guidance_scale, seeds=(1000, 1001))
    return BlockCache(delta=delta, plan=plan, scale_shift=False if ss is None else ss)


def from_options(opts: dict) -> BlockCache:
    return BlockCache(delta=opts.get("delta"))


def plot(plan: dict, path) -> Path:
    from .block_cache_plot import plot_plan

    return plot_plan(plan, path)


register(MethodInfo(name=METHOD, config=BlockCache, install=install, level="block", from_spec=from_spec,
                    calibrate=calibrate, from_options=from_options, plot=plot))
