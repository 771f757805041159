"""Block Caching at run time: the per-block hook, the per-stream residual caches, scale-shift
alignment, and ``install``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...adapters.diffusers import arg_positions, stream_inputs
from ...errors import HastenError
from ...hooks import row_timesteps
from ...plans import check_call_timestep, check_plan, check_run, scheduler_fingerprint
from .calibrate import plan_from_changes
from .record import _Recorder, trajectory_timesteps
from .schedule import METHOD, BlockCache, ideal_speedup, load_block_cache_plan, schedule_from_changes

log = logging.getLogger("hasten")


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
        self.pos = arg_positions(spec.module, spec.outputs)
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
        return stream_inputs(self.names, self.pos, args, kwargs)

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
        if not h.primary or self.shared["bypass"]:
            return orig(*args, **kwargs)  # an extra call of another batch size, or a teacher pass: in full
        n = h.call_index
        rows = h.active_rows
        self.slot = self.slots.get(h.stream)
        dec = self.shared["decisions"]
        if n < len(self.mask) and not self.mask[n]:
            xs = self.inputs(args, kwargs) if self.ready(rows) else None
            if xs is not None and self.fits(xs):
                self.reused += 1
                if dec is not None:
                    dec[self.index] = 82  # "R"
                out = self.reuse(xs, rows)
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

    def fits(self, xs) -> bool:
        """The cached residuals have this call's token count: FlexiDiT changes it between calls, and a
        residual is never carried across a change of patch size (the block computes instead)."""
        x, c = xs[self.main], self.slot.cache[self.main]
        return x is None or c is None or x.shape[1:] == c.shape[1:]

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
        if slot is None or any(x is not None and c is not None and c.shape[1:] != x.shape[1:]
                               for x, c in zip(xs, slot.cache, strict=False)):
            slot = self.slot = self.slots[h.stream] = _Slot(len(self.names), full)  # new (or new token count)
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

    def reuse(self, xs, rows):
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
            if r.shape[0] != x.shape[0]:  # a broadcast here would silently give every row one residual
                raise HastenError(
                    f"Block Caching: block {self.name} takes {x.shape[0]} rows where the call sent "
                    f"{r.shape[0]} (its batch is not the call's rows, as in Latte's temporal blocks), so a "
                    "method that drops guidance rows cannot be combined with Block Caching on this model")
            if ss is not None and ss[k] is not None:
                r = ss[k](r, t)
            outs.append(x + r)
        return outs[0] if self.single else tuple(outs)


# --------------------------------------------------------------------------- install
def time_scale(plan: dict | None) -> float:
    """Factor that brings the transformer's timesteps to the 0-1000 range the scale-shift features assume:
    1000 for models called with t in [0, 1] (Flux, QwenImage and other pipelines pass t / 1000), else 1."""
    ts = [abs(t) for t in (plan or {}).get("timesteps", []) if t is not None]
    return 1000.0 if ts and max(ts) <= 1.5 else 1.0


def resolve_masks(cfg: BlockCache, handle) -> tuple[list[list[bool]], dict | None]:
    """The compute masks for ``cfg`` on ``handle``'s transformer, and the plan (if any)."""
    if cfg.schedule is not None and (cfg.plan is not None or cfg.delta is not None):
        raise HastenError("BlockCache takes schedule= alone: a plan or delta would be ignored")
    if cfg.plan is not None:
        plan = load_block_cache_plan(cfg.plan)
        check_plan(plan, handle.transformer, scheduler=getattr(handle.pipeline, "scheduler", None))
        if cfg.delta is not None:
            masks = schedule_from_changes(plan["l1rel"], cfg.delta)
        else:
            masks = [[bool(v) for v in m] for m in plan["schedule"]]
        return masks, plan
    if cfg.schedule is not None:
        return [[bool(v) for v in m] for m in cfg.schedule], None
    if cfg.delta is not None:
        return None, None  # calibrated on the first run
    raise HastenError("BlockCache needs delta= (calibrated on the first run), a plan (hasten.calibrate(pipe, "
                      "BlockCache(delta=0.5), ...) or `hasten calibrate`), or schedule=[[...]]")


def _load_scale_shift(cfg: BlockCache, plan: dict | None, blocks) -> dict | None:
    src = cfg.scale_shift
    if src is False:
        return None
    other_delta = plan is not None and cfg.delta is not None and cfg.delta != plan.get("delta")
    if src is None and other_delta:
        return None  # the plan's parameters were trained for the plan's own delta (schedule): not read
    if src is True and other_delta:
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


def build_scale_shift(state: dict, blocks, channels: list | None = None) -> list[list[ScaleShift | None]]:
    """ScaleShift modules per block and stream from a state dict with keys ``{i}.{k}.proj.weight`` / ``.bias``;
    with the plan's ``channels`` (per block and stream), each module's width is checked against them."""
    mods = []
    for i, spec in enumerate(blocks):
        row = []
        for k in range(len(spec.outputs)):
            w, bias = state.get(f"{i}.{k}.proj.weight"), state.get(f"{i}.{k}.proj.bias")
            if w is None:
                row.append(None)
                continue
            want = channels[i][k] if channels and i < len(channels) and k < len(channels[i]) else None
            if bias is None or w.ndim != 2 or (want is not None and w.shape[0] != 2 * want):
                raise HastenError(f"the scale-shift parameters of block {i} ({spec.name}), output {k}, do not fit "
                                  "this plan and model: train them again with this plan")
            m = ScaleShift(w.shape[0] // 2, w.shape[1])
            m.load_state_dict({"proj.weight": w, "proj.bias": bias})
            row.append(m)
        mods.append(row)
    return mods


def install(handle, cfg: BlockCache) -> None:
    """Install Block Caching: one hook per block and a call wrapper (plan checks, decision log).

    ``BlockCache(delta=...)`` without a plan or schedule calibrates on the first run: that run computes
    every block (its output is exact) while recording L1rel (Eq. 6) on its own inputs; the schedule for
    ``delta`` (Eq. 7) applies from the second run on. The cost (the first run's time) is logged and
    reported; ``handle.block_cache_plan`` holds the plan, to save with ``hasten.plans.save_plan`` for
    reproducible runs (a calibration over several seeds and conditions, ``hasten.calibrate``, is the
    better plan).
    """
    blocks = handle.blocks()
    masks, plan = resolve_masks(cfg, handle)
    first_run = masks is None
    if first_run:
        masks = [[] for _ in blocks]  # no schedule yet: every call computes every block
    if len(masks) != len(blocks):
        raise HastenError(f"the schedule has {len(masks)} blocks but the model has {len(blocks)}")
    shared: dict[str, Any] = {"decisions": None, "measure": bool(cfg.measure), "time_scale": time_scale(plan),
                              "bypass": False}  # bypass: every block computes, caches untouched (a teacher pass)
    states = [_Block(handle, i, spec, masks[i], shared) for i, spec in enumerate(blocks)]
    calibration: dict[str, Any] = {}
    if first_run:
        rec = _Recorder(handle, blocks)
        for i, spec in enumerate(blocks):  # inside the caching hooks: sees every computed output
            handle.wrap_block(spec.module, rec.hook(i), spec.name)
    ss_state = _load_scale_shift(cfg, plan, blocks)
    if ss_state is not None:
        for st, row in zip(states, build_scale_shift(ss_state, blocks, (plan or {}).get("channels")), strict=False):
            row = [None if m is None else m.to(handle.device) for m in row]
            st.ss = row if any(m is not None for m in row) else None
    nblocks = len(blocks)

    def recording() -> bool:  # first-run calibration still recording (_plan_from_first_run ends it)
        return first_run and rec.active

    def call(inner, *args, **kwargs):
        if plan is not None and handle.primary:
            if handle.call_index == 0:
                check_run(plan, handle)
            check_call_timestep(plan, handle.call_index, handle.t)
        if recording() and handle.run_index == rec.run and handle.call_index == 0 and handle.primary:
            rec.guidance_scale = handle.guidance_scale  # the recorded run's, not the next one's
        dec = bytearray(b"-" * nblocks)
        shared["decisions"] = dec
        try:
            return inner(*args, **kwargs)
        except BaseException:
            if recording() and handle.run_index == rec.run:
                rec.interrupted = True  # its curves are partial: record the next run instead
            raise
        finally:
            shared["decisions"] = None
            handle.log_entry["block_cache"] = dec.decode()

    def on_run() -> None:
        nonlocal plan
        if recording() and handle.run_index > rec.run and rec.interrupted:
            log.warning("Block Caching: the calibration run was interrupted; calibrating on this run instead")
            rec.restart(handle.run_index)
        elif recording() and handle.run_index > rec.run:
            plan = _plan_from_first_run(handle, rec, blocks, cfg.delta)
            new_masks = [[bool(v) for v in m] for m in plan["schedule"]]
            for st, m in zip(states, new_masks, strict=True):
                st.mask = m
            masks[:] = new_masks
            calibration.update(plan["calibration"])
            handle.block_cache_plan = plan
            log.info("Block Caching calibrated on the first run: %d calls, %.2f s, ideal speedup %.2fx at delta %g",
                     plan["calls"], calibration["seconds"], plan["ideal_speedup"], cfg.delta)
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
                **({"calibrated_on_first_run": dict(calibration) or "pending"} if first_run else {}),
                **({"reuse_error": [round(st.err_sum / st.err_n, 6) if st.err_n else None for st in states]}
                   if cfg.measure else {})}

    handle.add_report(METHOD, report)
    handle.block_cache_states = states  # for tests and training
    handle.block_cache_plan = None  # first-run calibration: the plan, once the first run is done

    def free() -> None:  # disable(): the counters stay on the handle, the cached residuals (GPU memory) go
        for st in states:
            st.reset()
        if first_run:
            rec.reset()

    handle._undo.append(free)


def _plan_from_first_run(handle, rec: _Recorder, blocks, delta: float) -> dict:
    """The plan recorded during the first complete run (every block computed): Eq. 6 curves, Eq. 7 schedule
    for ``delta``. Its ``steps`` are the run's denoiser calls (a Heun step makes two)."""
    rec.active = False
    rec.reset()
    timesteps = trajectory_timesteps(e for e in handle.report()["log"] if e["run"] == rec.run)[rec.run]
    seconds = handle._run_walls.get(rec.run, 0.0)
    return plan_from_changes(handle.transformer, rec.curves(len(timesteps)), timesteps, delta,
                             [b.name for b in blocks], rec.channels, solver="first-run", steps=len(timesteps),
                             time_schedule=None, guidance_scale=rec.guidance_scale,
                             scheduler=scheduler_fingerprint(getattr(handle.pipeline, "scheduler", None)),
                             calibration={"on": "the first run", "calls": len(timesteps),
                                          "seconds": round(seconds, 3)})
