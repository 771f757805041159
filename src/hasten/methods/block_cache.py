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
from ..hooks import row_timesteps
from ..plans import check_call_timestep, check_plan, check_run, load_plan, new_plan
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


# --------------------------------------------------------------------------- scale-shift
def time_features(t: torch.Tensor, dim: int = 64) -> torch.Tensor:
    """Sinusoidal features of the transformer's timestep (any scale), shape (B, dim), unit norm per row."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1) / math.sqrt(half)


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
    """Positions of the stream arguments in the block class's forward (instance wrappers are ignored)."""
    params = [p.name for p in inspect.signature(type(module).forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    return [params.index(n) if n in params else None for n in names]


class _Slot:
    """The cached residuals of one block for one stream (see ``hasten.hooks``: a guidance branch sent as
    its own call, or the rows of one batched call): per stream output, and which rows are valid."""

    __slots__ = ("cache", "valid", "batch")

    def __init__(self, n: int, batch: int):
        self.cache: list[torch.Tensor | None] = [None] * n
        self.valid: Any = None  # None: nothing cached, True: every row, BoolTensor: per row
        self.batch = batch


class _Block:
    """State and hook of one cached block (hot path: keep it lean)."""

    __slots__ = ("handle", "index", "name", "names", "pos", "single", "main", "mask", "slots", "slot",
                 "computed", "reused", "forced", "tokens", "ss", "shared", "err_sum", "err_n")

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
        self.err_sum, self.err_n = 0.0, 0
        self.reset()

    def reset(self) -> None:
        self.slots: dict[tuple, _Slot] = {}
        self.slot: _Slot | None = None

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
        slot = self.slot
        v = None if slot is None else slot.valid
        if v is None:
            return False
        if v is True:
            return True
        return bool(v.all()) if rows is None else bool(v.index_select(0, rows).all())

    def __call__(self, orig, *args, **kwargs):
        h = self.handle
        if not h.primary:
            return orig(*args, **kwargs)  # an extra call of another batch size: computed in full
        n = h.call_index
        rows = h.active_rows
        self.slot = self.slots.get(h.stream)
        dec = self.shared["decisions"]
        if n < len(self.mask) and not self.mask[n]:
            if self.ready(rows):
                self.reused += 1
                if dec is not None:
                    dec[self.index] = 82  # "R"
                out = self.reuse(args, kwargs, rows)
                if self.shared["measure"]:
                    self.measure(orig(*args, **kwargs), out)
                if self.shared.get("fit") is not None:
                    self.shared["fit"](self, orig, args, kwargs, rows)
                return out
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
        elif self.slot is not None and self.slot.valid is not None:
            self.drop(rows)  # never reuse a residual older than the latest computation
        return out

    def drop(self, rows) -> None:
        slot = self.slot
        if rows is None:
            slot.valid = None
            slot.cache = [None] * len(self.names)
            return
        v = slot.valid
        if v is True:
            v = torch.ones(slot.batch, dtype=torch.bool, device=rows.device)
        v[rows] = False
        slot.valid = v

    def measure(self, true, approx) -> None:
        t = (true,) if self.single else true
        a = (approx,) if self.single else approx
        num = sum(float((y - z).abs().sum()) for y, z in zip(t, a, strict=False) if y is not None and z is not None)
        den = sum(float(y.abs().sum()) for y in t if y is not None)
        self.err_sum += num / max(den, 1e-12)
        self.err_n += 1

    def keep(self, args, kwargs, out, rows) -> None:
        xs = self.inputs(args, kwargs)
        outs = (out,) if self.single else out
        h = self.handle
        full = h.full_batch
        slot = self.slot
        if slot is None:
            slot = self.slot = self.slots[h.stream] = _Slot(len(self.names), full)
        for k, (x, y) in enumerate(zip(xs, outs, strict=False)):
            if y is None or x is None:
                slot.cache[k] = None
                continue
            r = (y - x).detach()
            if rows is None:
                slot.cache[k] = r
            else:
                c = slot.cache[k]
                if c is None or c.shape[1:] != r.shape[1:]:
                    c = r.new_zeros((full,) + tuple(r.shape[1:]))
                c.index_copy_(0, rows, r)
                slot.cache[k] = c
        if rows is None:
            slot.valid = True
        elif slot.valid is not True:
            v = slot.valid if isinstance(slot.valid, torch.Tensor) else torch.zeros(full, dtype=torch.bool,
                                                                                     device=rows.device)
            v[rows] = True
            slot.valid = v

    def row_timesteps(self, rows) -> torch.Tensor:
        t = row_timesteps(self.handle.timestep, self.handle.full_batch) * self.shared.get("time_scale", 1.0)
        return t if rows is None else t.index_select(0, rows.to(t.device))

    def reuse(self, args, kwargs, rows):
        xs = self.inputs(args, kwargs)
        outs = []
        ss = self.ss
        t = self.row_timesteps(rows) if ss is not None else None
        cache = self.slot.cache
        for k, x in enumerate(xs):
            c = cache[k]
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
        check_plan(plan, handle.transformer, scheduler=getattr(handle.pipeline, "scheduler", None))
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
    if src is True and plan is not None and cfg.delta is not None and cfg.delta != plan.get("delta"):
        raise HastenError(f"the plan's scale-shift parameters were trained for delta {plan.get('delta')}, "
                          f"not {cfg.delta}: calibrate with --delta {cfg.delta} --scale-shift")
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
    shared: dict[str, Any] = {"decisions": None, "measure": bool(cfg.measure)}
    states = [_Block(handle, i, spec, masks[i], shared) for i, spec in enumerate(blocks)]
    ss_state = _load_scale_shift(cfg, plan, blocks)
    if ss_state is not None and cfg.scale_shift is None and plan is not None and cfg.delta is not None \
            and cfg.delta != plan.get("delta"):
        ss_state = None  # the plan's parameters were trained for the plan's own delta (schedule)
    if ss_state is not None:
        device = next(iter(handle.transformer.parameters()), torch.zeros(())).device
        for st, row in zip(states, build_scale_shift(ss_state, blocks, None), strict=False):
            row = [None if m is None else m.to(device) for m in row]
            st.ss = row if any(m is not None for m in row) else None
    nblocks = len(blocks)

    def call(inner, *args, **kwargs):
        if plan is not None and handle.primary:
            if handle.call_index == 0:
                check_run(plan, handle)
            check_call_timestep(plan, handle.call_index, handle.t)
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
                "delta": cfg.delta if cfg.delta is not None else (plan or {}).get("delta"),
                **({"reuse_error": [round(st.err_sum / st.err_n, 6) if st.err_n else None for st in states]}
                   if cfg.measure else {})}

    handle.add_report(METHOD, report)
    handle.block_cache_states = states  # for tests and training


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
    from ..api import accelerate

    handle = accelerate(run.target)
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


# --------------------------------------------------------------------------- scale-shift training
SS_TRAIN_STEPS = 1000  # Adam updates (see train_scale_shift)
SS_LR = 1e-4


class _LstsqFit:
    """Sufficient statistics for the least-squares scale-shift fit of every reused block and stream.

    On a reused call the block also runs (teacher = the uncached block at the student's input x); with
    cached residual r, true residual y - x and error e = (y - x) - r, the per-channel model
    e ~ s(t) r + b(t), s = W_s phi(t), b = W_b phi(t), is linear in (W_s, W_b): per channel c the
    normal equations are accumulated from per-row sums (sum r^2, sum r, count, sum r e, sum e) and
    outer products phi phi^T; ``solve`` returns the ridge solution.
    """

    def __init__(self, feat_dim: int = 64):
        self.f = feat_dim
        self.stats: dict[tuple[int, int], list[torch.Tensor]] = {}

    def __call__(self, blk, orig, args, kwargs, rows) -> None:
        true = orig(*args, **kwargs)
        trues = (true,) if blk.single else true
        phi = time_features(blk.row_timesteps(rows), self.f).double()  # (B, F)
        outer = phi[:, :, None] * phi[:, None, :]  # (B, F, F)
        for k, x in enumerate(blk.inputs(args, kwargs)):
            c = blk.slot.cache[k]
            y = trues[k]
            if c is None or y is None or x is None or blk.ss is None or blk.ss[k] is None:
                continue
            r = (c if rows is None else c.index_select(0, rows)).double()
            e = (y - x).double() - r
            dims = tuple(range(1, r.dim() - 1))
            r2, r1, re, e1 = ((r * r).sum(dims), r.sum(dims), (r * e).sum(dims), e.sum(dims))  # (B, C)
            n = torch.full_like(r1, float(math.prod(r.shape[1:-1])))
            key = (blk.index, k)
            new = [torch.einsum("bc,bfg->cfg", w, outer) for w in (r2, r1, n)]
            new += [torch.einsum("bc,bf->cf", w, phi) for w in (re, e1)]
            acc = self.stats.get(key)
            self.stats[key] = new if acc is None else [a + b for a, b in zip(acc, new, strict=True)]

    def solve(self, states, ridge: float = 1e-3) -> None:
        """Write the ridge solution into the blocks' ScaleShift modules (proj.weight; bias stays 0)."""
        f = self.f
        for (i, k), (arr, ar, an, vr, ve) in self.stats.items():
            m = torch.cat([torch.cat([arr, ar], 2), torch.cat([ar, an], 2)], 1)  # (C, 2F, 2F)
            v = torch.cat([vr, ve], 1)  # (C, 2F)
            scale = m.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)  # (C,)
            m = m + ridge * scale[:, None, None] * torch.eye(2 * f, dtype=m.dtype)
            w = torch.linalg.solve(m, v)  # (C, 2F)
            mod = states[i].ss[k]
            with torch.no_grad():
                mod.proj.weight.copy_(torch.cat([w[:, :f], w[:, f:]], 0).to(mod.proj.weight.dtype))


def train_scale_shift(pipe, plan: dict, delta: float | None = None, train_steps: int = SS_TRAIN_STEPS,
                      labels: Sequence[int] | None = None, seed: int = 3000, lr: float = SS_LR,
                      progress=None, method: str = "adam") -> tuple[dict[str, torch.Tensor], dict]:
    """Distil scale-shift parameters for ``plan`` (at ``delta``) on a hasten pipeline (paper Sec. 3.3).

    Student: the pipeline with Block Caching + scale-shift (zero-initialised = plain caching);
    teacher: the same transformer without caching. Trajectories are always the student's own (its
    output advances x); only the scale-shift parameters change (the transformer is frozen).

    - ``method="adam"`` (default, the paper's output-level distillation): at each call that reuses a
      block, the loss is the MSE between the student's and the teacher's guided velocity at the
      student's x, and one Adam step (``lr``) updates the parameters; ``train_steps`` counts these
      updates. On the digits model at delta 0.15, lr 1e-4 and 1000 updates (21 trajectories, 3.5 min
      on one core) lower the held-out velocity error by 47%; lr 3e-4 and above diverge.
    - ``method="lstsq"``: block-level distillation. At every reused block the uncached block is the
      teacher at the student's input; the per-channel scale/shift maps are the ridge least-squares
      solution (:class:`_LstsqFit`), refitted after each trajectory. ``train_steps`` counts trajectories
      (capped at 8). It lowers each block's own error but, on the digits model, not the output error
      (block errors partly cancel under plain caching), so it is not the default.

    ``val_loss_before/after``: the velocity MSE against the teacher over one held-out trajectory (seed
    ``seed - 1``) at the zero init (= plain caching) and after training; parameters that do not lower
    it are not kept (zeros are returned, ``kept: false``). Returns (state dict, training info).
    """
    import copy
    import time

    from ..api import accelerate
    from ..pipeline import SOLVERS, HastenPipeline, make_schedule

    if not isinstance(pipe, HastenPipeline):
        raise HastenError("scale-shift training runs on a hasten pipeline")
    if train_steps < 1:
        raise HastenError(f"--train-steps must be >= 1, got {train_steps}")
    plan = load_plan(plan, METHOD)
    check_plan(plan, pipe.transformer)
    delta = plan["delta"] if delta is None else float(delta)
    masks = schedule_from_changes(plan["l1rel"], delta)
    state: dict[str, torch.Tensor] = {}
    for i, chans in enumerate(plan["channels"]):
        if all(masks[i]):
            continue  # never reused: nothing to align
        for k, c in enumerate(chans):
            if c is not None:
                m = ScaleShift(int(c))
                state[f"{i}.{k}.proj.weight"] = m.proj.weight.detach().clone()
                state[f"{i}.{k}.proj.bias"] = m.proj.bias.detach().clone()
    if method not in ("lstsq", "adam"):
        raise HastenError(f"unknown scale-shift training method {method!r}: lstsq | adam")
    info = {"method": method, "train_steps": int(train_steps), "lr": lr if method == "adam" else None,
            "delta": delta, "seed": seed, "val_seed": seed - 1, "val_loss_before": None, "val_loss_after": None}
    if not state:
        return state, info
    teacher = HastenPipeline(copy.deepcopy(pipe.transformer).requires_grad_(False), num_classes=pipe.num_classes,
                             guidance_scale=pipe.default_guidance_scale)
    grads = {n: p.requires_grad for n, p in pipe.transformer.named_parameters()}
    pipe.transformer.requires_grad_(False)
    handle = accelerate(pipe, BlockCache(plan=plan, delta=delta, scale_shift=state))
    try:
        mods = [m for st in handle.block_cache_states if st.ss for m in st.ss if m is not None]
        params = [p for m in mods for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        labs = torch.as_tensor(list(range(pipe.num_classes)) if labels is None else list(labels))
        scale = plan.get("guidance_scale") or pipe.default_guidance_scale
        ts = make_schedule(plan.get("time_schedule") or "linear", plan["steps"])
        losses: list[float] = []

        def trajectory(traj_seed: int, train: bool) -> list[float]:
            """One student trajectory; at calls that reuse a block: loss (and an update if ``train``)."""
            g = torch.Generator().manual_seed(traj_seed)
            v_s = pipe.velocity_fn(labs, scale, {"calls": 0, "rows": 0})
            v_t = teacher.velocity_fn(labs, scale, {"calls": 0, "rows": 0})
            calls, seen = [0], []

            def velocity(x, t):
                n = calls[0]
                calls[0] += 1
                if n >= len(masks[0]) or all(m[n] for m in masks) or (train and len(losses) >= train_steps):
                    return v_s(x, t)
                with torch.enable_grad() if train else torch.no_grad():
                    out = v_s(x, t)
                    with torch.no_grad():
                        target = v_t(x, t)
                    loss = torch.nn.functional.mse_loss(out, target)
                    if train:
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        losses.append(float(loss.detach()))
                seen.append(float(loss.detach()))
                return out.detach()

            with torch.no_grad():
                SOLVERS[plan["solver"]](velocity, pipe.initial_noise(len(labs), g), ts)
            return seen

        t0, traj = time.perf_counter(), 0
        val = trajectory(seed - 1, False)  # the loss at every call that reuses a block
        val_before = sum(val) / max(1, len(val))
        if method == "lstsq":
            for p in params:
                p.requires_grad_(False)
            fit = _LstsqFit(mods[0].feat_dim)
            handle.block_cache_states[0].shared["fit"] = fit
            for traj in range(1, min(train_steps, 8) + 1):
                g = torch.Generator().manual_seed(seed + traj - 1)
                with torch.no_grad():
                    pipe(labs, num_inference_steps=plan["steps"], guidance_scale=scale, generator=g,
                         schedule=plan.get("time_schedule") or "linear", solver=plan["solver"])
                fit.solve(handle.block_cache_states)
                if progress is not None:
                    progress(f"scale-shift: {traj} trajectories fitted")
            handle.block_cache_states[0].shared["fit"] = None
        while method == "adam" and len(losses) < train_steps:
            trajectory(seed + traj, True)
            traj += 1
            if progress is not None:
                progress(f"scale-shift: {len(losses)}/{train_steps} updates, loss {losses[-1]:.3g}")
        val = trajectory(seed - 1, False)
        val_after = sum(val) / max(1, len(val))
        trained = {}
        for i, st in enumerate(handle.block_cache_states):
            for k, m in enumerate(st.ss or []):
                if m is not None:
                    trained[f"{i}.{k}.proj.weight"] = m.proj.weight.detach().clone().contiguous()
                    trained[f"{i}.{k}.proj.bias"] = m.proj.bias.detach().clone().contiguous()
        kept = val_after < val_before
        if not kept:  # never ship parameters that do worse than plain caching on held-out data
            trained = {k: torch.zeros_like(v) for k, v in trained.items()}
        info.update(val_loss_before=round(val_before, 8), val_loss_after=round(val_after, 8), kept=kept,
                    trajectories=traj, seconds=round(time.perf_counter() - t0, 1))
        return trained, info
    finally:
        handle.disable()
        for n, p in pipe.transformer.named_parameters():
            p.requires_grad_(grads[n])


def cli_calibrate(run, options: dict, out: Path) -> dict:
    """``hasten calibrate --method block-cache --delta D [--scale-shift --train-steps N]``."""
    if options.get("delta") is None:
        raise HastenError("block-cache calibration needs --delta (e.g. --delta 0.5)")
    plan = calibrate(run, BlockCache(delta=options["delta"]))
    if options.get("scale_shift"):
        from safetensors.torch import save_file

        from ..io import atomic_write

        steps = int(options.get("train_steps") or SS_TRAIN_STEPS)
        state, info = train_scale_shift(run.target, plan, train_steps=steps, labels=run.conditions)
        ss_path = Path(out).with_suffix(".scale_shift.safetensors")
        atomic_write(ss_path, lambda tmp: save_file(state, tmp))
        plan["scale_shift_file"] = ss_path.name
        plan["scale_shift_train"] = info
    return plan


# --------------------------------------------------------------------------- spec / CLI
def from_spec(opts: dict[str, str], ctx) -> BlockCache:
    """``block-cache:plan=plan.json`` or ``block-cache:delta=0.5`` (calibrates on the fly).

    Options: ``plan=PATH``, ``delta=D`` (with a plan: re-derive the schedule from its curves),
    ``scale_shift=1|0|PATH`` (1: the plan's parameters if trained for this delta, else trained now on
    the fly, ``train_steps=N`` Adam updates, default 1000), ``train_steps=N``.
    """
    unknown = set(opts) - {"plan", "delta", "scale_shift", "train_steps"}
    if unknown:
        raise HastenError(f"unknown block-cache option {sorted(unknown)[0]!r}: use plan=PATH or delta=NUMBER")
    try:
        train_steps = int(opts.get("train_steps", SS_TRAIN_STEPS))
    except ValueError:
        raise HastenError(f"block-cache train_steps must be an integer, got {opts['train_steps']!r}") from None
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
        tr = getattr(ctx.pipe, "transformer", ctx.pipe)
        check_plan(plan, tr, steps=ctx.steps, solver=ctx.solver, schedule=ctx.schedule)
    elif delta is None:
        raise HastenError("block-cache needs plan=PATH or delta=NUMBER, e.g. --accel block-cache:delta=0.5")
    else:
        from ..api import calibrate as api_calibrate

        BlockCache(delta=delta)  # validates delta before the expensive part
        plan = api_calibrate(ctx.pipe, BlockCache(delta=delta), steps=ctx.steps, solver=ctx.solver,
                             schedule=ctx.schedule, guidance_scale=ctx.guidance_scale, seeds=(1000, 1001))
    if ss is True:
        use = plan["delta"] if delta is None else delta
        if not (plan.get("scale_shift_file") and plan.get("delta") == use):
            ss, _ = train_scale_shift(ctx.pipe, plan, delta=use, train_steps=train_steps)  # on the fly
    return BlockCache(delta=delta, plan=plan, scale_shift=ss)


def from_options(opts: dict) -> BlockCache:
    return BlockCache(delta=opts.get("delta"))


def plot(plan: dict, path: str | os.PathLike, delta: float | None = None) -> Path:
    """PNG of the change curves L1rel(i, n) (paper Fig. 3) and the compute schedule (paper Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write

    curves = plan["l1rel"]
    delta = plan.get("delta") if delta is None else delta
    masks = schedule_from_changes(curves, delta) if delta is not None else plan["schedule"]
    names = plan.get("blocks") or [f"block {i}" for i in range(len(curves))]
    ncalls = len(curves[0])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 2.2 + 0.35 * len(curves) + 3), sharex=True,
                                   gridspec_kw={"height_ratios": [3, max(1.2, 0.3 * len(curves))]})
    cmap = plt.get_cmap("viridis")
    for i, c in enumerate(curves):
        xs = [n for n in range(ncalls) if c[n] is not None]
        ax1.plot(xs, [c[n] for n in xs], color=cmap(i / max(len(curves) - 1, 1)), lw=1.4, label=names[i])
    ax1.set_ylabel("L1rel(i, n)  (Eq. 6)")
    ax1.set_yscale("log")
    ax1.set_title(f"{plan['model']['class']}, {plan['steps']} {plan['solver']} steps: block change per call")
    ax1.legend(fontsize=7, ncol=2)
    ax1.grid(alpha=0.3)
    for i, m in enumerate(masks):
        xs = [n for n in range(ncalls) if m[n]]
        ax2.scatter(xs, [i] * len(xs), marker="s", s=14, color="black")
    ax2.set_yticks(range(len(curves)), names, fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xlabel("denoiser call n (0 = noise)")
    ax2.set_title(f"schedule for delta = {delta} (square = computed), ideal speedup {ideal_speedup(masks):.2f}x",
                  fontsize=9)
    fig.tight_layout()

    def _write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    try:
        return atomic_write(path, _write)
    finally:
        plt.close(fig)


register(MethodInfo(name=METHOD, config=BlockCache, install=install, level="block", from_spec=from_spec,
                    calibrate=calibrate, from_options=from_options, plot=plot, cli_calibrate=cli_calibrate))
