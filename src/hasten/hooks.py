"""The acceleration handle: interception of denoiser calls and blocks, with all state on the handle.

``hasten.accelerate(target, *methods)`` builds one :class:`Handle` and asks every method to install
itself through it. This module is the contract between the handle and the methods.

Contract (stable; methods in ``hasten.methods`` build against it)
------------------------------------------------------------------
**Installing.** A method is a config dataclass plus ``install(handle, config)``. It never assigns to
the target itself: it asks the handle, which records how to undo every change, so that
``handle.disable()`` (or leaving ``with hasten.accelerate(...)``) restores the target bitwise:

- ``handle.wrap_call(fn, name)``: ``fn(inner, *args, **kwargs)`` intercepts every transformer call.
  Wrappers nest in install order, the first installed is the OUTERMOST (so pass guidance methods that
  shrink the batch before block methods, or simply in any order: ``accelerate`` sorts methods by their
  ``level`` attribute: "call" before "block" before "token").
- ``handle.wrap_block(module, fn, name)``: ``fn(orig_forward, *args, **kwargs)`` replaces one block's
  forward (instance attribute; the class and the state dict are untouched).
- ``handle.set_attr(obj, name, value)``: any other reversible attribute change.
- ``handle.on_run_start(fn)``: ``fn()`` is called when a new sampling run starts.
- ``handle.add_report(name, fn)``: ``fn() -> dict`` is merged into ``handle.report()["methods"][name]``.

**Per-call state, read by methods.** Set by the handle at the entry of each transformer call (the
outermost layer), before any method wrapper runs:

- ``handle.call_index``: index of the current denoiser call within the current run (0, 1, ...). With
  Euler and batched CFG it is the step index; with Heun a step makes two calls (2 i and 2 i + 1).
- ``handle.run_index``: runs since the handle was made (0, 1, ...).
- ``handle.full_batch``: rows of the call as the pipeline sent it (the full guidance batch; for
  hasten's pipeline with CFG that is ``[uncond rows; cond rows]``, 2 B rows).
- ``handle.timestep``: the ``timestep`` argument of the call as sent (a tensor or a number).
- ``handle.log_entry``: the decision-log dict of this call; methods add their decision under their key.
- ``handle.guidance_scale``: the run's classifier-free guidance scale when the pipeline tells it
  (hasten's pipeline through ``velocity_fn``; diffusers pipelines through ``pipe._guidance_scale``,
  read at ``set_timesteps``); ``None`` otherwise.

**Batch shrinking.** ``handle.active_rows`` is ``None`` (all ``full_batch`` rows are sent) or a
``LongTensor`` of indices into the full guidance batch, sorted ascending, naming the rows that are
actually sent to the inner forward, in that order. A call-level method that drops rows (Adaptive
Guidance stops sending the unconditional row of switched samples) sets it before calling ``inner``
with the sliced arguments (:func:`slice_rows` slices every batch-sized tensor) and must restore it to
``None`` before returning (use ``try/finally``). Block methods index their per-row caches with it, so
conditional and unconditional caches are never mixed and shrinking never misaligns rows. Only one
method may shrink the batch in a call (nesting two shrinkers is an error).

**Runs.** The call index is reset to 0 at the start of each run:
- hasten pipeline target: at every ``pipe(...)`` (the handle wraps ``pipe.velocity_fn``, which the
  pipeline calls once per run); ``num_samples`` is then the number of labels;
- diffusers pipeline target: at every ``scheduler.set_timesteps`` (called once per run by diffusers
  pipelines);
- bare transformer: when the timestep moves against the direction of the current run (diffusers
  timesteps fall 999 -> 0, hasten's flow time rises 0 -> 1000; a repeated timestep, as in Heun, is not
  a new run), or on ``handle.reset()``. Call ``handle.reset()`` between runs if in doubt.

**Counting.** NFE = rows actually sent to the transformer (after shrinking) / ``num_samples``, so a CFG
step counts 2 and Adaptive Guidance's saving shows. ``num_samples`` is the number of labels for
hasten's pipeline, else the first call's batch size in the run (then one call counts 1).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import HastenError

_MISSING = object()
_OWNER_ATTR = "_hasten_handle"


def _arg_position(fn: Callable, name: str) -> int | None:
    """Positional index of parameter ``name`` of ``fn`` (without ``self``), or None."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.name == name and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return i
    return None


def get_arg(args: tuple, kwargs: dict, name: str, pos: int | None, default: Any = None) -> Any:
    """The argument ``name`` of a call, whether passed by position ``pos`` or by keyword."""
    if name in kwargs:
        return kwargs[name]
    if pos is not None and pos < len(args):
        return args[pos]
    return default


def slice_rows(args: tuple, kwargs: dict, rows: torch.Tensor, full_batch: int) -> tuple[tuple, dict]:
    """Index dim 0 of every tensor argument whose first dimension is ``full_batch`` with ``rows``.

    Tensors of other shapes (rotary embeddings, image ids, masks without a batch dim) pass unchanged;
    so does everything that is not a tensor.
    """

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == full_batch:
            return v.index_select(0, rows)
        return v

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _scalar(t: Any) -> float | None:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


class Handle:
    """What ``hasten.accelerate`` returns: the installed methods, their state, the report, and undo."""

    def __init__(self, target: Any, transformer: nn.Module, pipeline: Any = None, kind: str = "transformer",
                 blocks: Any = None):
        self.target = target
        self.transformer = transformer
        self.pipeline = pipeline
        self.kind = kind  # "hasten" | "diffusers" | "transformer"
        self.explicit_blocks = blocks
        self.methods: list[Any] = []
        # per-call state (see the module docstring)
        self.call_index = -1
        self.run_index = -1
        self.full_batch = 0
        self.timestep: Any = None
        self.active_rows: torch.Tensor | None = None
        self.num_samples: int | None = None
        self.guidance_scale: float | None = None  # of the current run, when the pipeline tells it
        self.log_entry: dict | None = None
        # bookkeeping
        self._undo: list[tuple[Any, str, Any]] = []
        self._call_wrappers: list[tuple[str, Callable]] = []
        self._run_start_fns: list[Callable[[], None]] = []
        self._reports: dict[str, Callable[[], dict]] = {}
        self._blocks = None
        self._enabled = False
        self._pending_reset = True
        self._run_t: list[float] = []  # timesteps seen in this run (for run detection)
        self._orig_forward = None
        self._chain: Callable | None = None
        self._ts_pos: int | None = None
        self._hs_pos: int | None = None
        self.clear_report()

    # ------------------------------------------------------------------ registration (used by methods)
    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` (instance attribute) and record how to undo it."""
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)
        self._undo.append((obj, name, old))
        object.__setattr__(obj, name, value) if isinstance(obj, nn.Module) else setattr(obj, name, value)

    def wrap_block(self, module: nn.Module, fn: Callable, name: str = "") -> None:
        """Replace ``module.forward`` by ``functools.partial(fn, orig_forward)``; undone by ``disable``."""
        orig = module.forward
        self.set_attr(module, "forward", functools.partial(fn, orig))

    def wrap_call(self, fn: Callable, name: str) -> None:
        """Intercept whole transformer calls: ``fn(inner, *args, **kwargs)``; first installed = outermost."""
        self._call_wrappers.append((name, fn))
        self._build_chain()

    def on_run_start(self, fn: Callable[[], None]) -> None:
        self._run_start_fns.append(fn)

    def add_report(self, name: str, fn: Callable[[], dict]) -> None:
        self._reports[name] = fn

    def blocks(self) -> list:
        """The transformer's blocks as ``BlockSpec`` objects (discovered once, or the explicit list)."""
        if self._blocks is None:
            from .adapters import discover_blocks

            self._blocks = discover_blocks(self.transformer, self.explicit_blocks)
        return self._blocks

    # ------------------------------------------------------------------ install / undo
    def _install_core(self) -> None:
        tr = self.transformer
        owner = tr.__dict__.get(_OWNER_ATTR)
        if owner is not None and owner._enabled:
            raise HastenError("this model is already accelerated by another handle: "
                              "call disable() on that handle first")
        self._enabled = True
        self.set_attr(tr, _OWNER_ATTR, self)
        orig = tr.forward
        self._orig_forward = orig
        cls_forward = functools.partial(type(tr).forward, tr)  # the class's signature, not a wrapper's
        self._ts_pos = _arg_position(cls_forward, "timestep")
        self._hs_pos = _arg_position(cls_forward, "hidden_states")
        if self._hs_pos is None:
            self._hs_pos = 0
        self._build_chain()
        self.set_attr(tr, "forward", self._forward)
        if self.kind == "hasten":
            pipe = self.pipeline
            orig_vfn = pipe.velocity_fn

            def velocity_fn(labels, *a, **k):
                self.reset(num_samples=len(labels))
                gs = a[0] if a else k.get("guidance_scale")
                self.guidance_scale = None if gs is None else float(gs)
                return orig_vfn(labels, *a, **k)

            self.set_attr(pipe, "velocity_fn", velocity_fn)
        elif self.kind == "diffusers" and hasattr(getattr(self.pipeline, "scheduler", None), "set_timesteps"):
            sched = self.pipeline.scheduler
            orig_st = sched.set_timesteps

            def set_timesteps(*a, **k):
                self.reset()
                gs = getattr(self.pipeline, "_guidance_scale", None)  # set by diffusers pipelines' __call__
                self.guidance_scale = float(gs) if isinstance(gs, (int, float)) else None
                return orig_st(*a, **k)

            self.set_attr(sched, "set_timesteps", set_timesteps)

    def disable(self) -> None:
        """Undo every change, newest first: the target computes exactly as before ``accelerate``."""
        while self._undo:
            obj, name, old = self._undo.pop()
            if old is _MISSING:
                try:
                    delattr(obj, name) if not isinstance(obj, nn.Module) else object.__delattr__(obj, name)
                except AttributeError:
                    pass
            elif isinstance(obj, nn.Module):
                object.__setattr__(obj, name, old)
            else:
                setattr(obj, name, old)
        self._enabled = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disable()

    # ------------------------------------------------------------------ runs
    def reset(self, num_samples: int | None = None) -> None:
        """Start a new run at the next call: call index back to 0, per-run caches dropped."""
        self._pending_reset = True
        self._pending_samples = num_samples
        self._run_clock = time.perf_counter()

    def _start_run(self) -> None:
        self._pending_reset = False
        self.run_index += 1
        self.call_index = -1
        self._run_t = []
        self.num_samples = getattr(self, "_pending_samples", None)
        self._pending_samples = None
        start = getattr(self, "_run_clock", None)
        self._run_start = start if start is not None else time.perf_counter()
        self._run_clock = None
        self._counters["runs"] += 1
        for fn in self._run_start_fns:
            fn()

    def _detect_new_run(self, t: float | None) -> bool:
        """Bare-transformer rule: the timestep moved against the direction of the current run."""
        if t is None or self.kind != "transformer" or not self._run_t:
            return False
        first, last = self._run_t[0], self._run_t[-1]
        if last == first:
            return False  # direction not known yet (one timestep or repeats)
        direction = 1.0 if last > first else -1.0
        return (t - last) * direction < 0

    # ------------------------------------------------------------------ the call path
    def _build_chain(self) -> None:
        if self._orig_forward is None:
            return
        orig, hs_pos, counters = self._orig_forward, self._hs_pos, self._counters

        def innermost(*args, **kwargs):
            hs = get_arg(args, kwargs, "hidden_states", hs_pos)
            counters["rows"] += int(hs.shape[0]) if isinstance(hs, torch.Tensor) else 1
            return orig(*args, **kwargs)

        chain = innermost
        for _, fn in reversed(self._call_wrappers):
            chain = functools.partial(fn, chain)
        self._chain = chain

    def _forward(self, *args, **kwargs):
        hs = get_arg(args, kwargs, "hidden_states", self._hs_pos)
        ts = get_arg(args, kwargs, "timestep", self._ts_pos)
        t = _scalar(ts)
        if self._pending_reset or self._detect_new_run(t):
            self._start_run()
        self.call_index += 1
        if t is not None:
            self._run_t.append(t)
        self.full_batch = int(hs.shape[0]) if isinstance(hs, torch.Tensor) else 1
        if self.num_samples is None:
            self.num_samples = self.full_batch
        self.timestep = ts
        self.active_rows = None
        entry = {"run": self.run_index, "call": self.call_index, "t": t, "rows": self.full_batch}
        self.log_entry = entry
        self._log.append(entry)
        c = self._counters
        c["calls"] += 1
        rows_before = c["rows"]
        t0 = time.perf_counter()
        try:
            out = self._chain(*args, **kwargs)
        finally:
            self.active_rows = None
            t1 = time.perf_counter()
            c["transformer_s"] += t1 - t0
            self._run_end = t1
            self._samples_rows[self.run_index] = self.num_samples
        entry["rows_sent"] = c["rows"] - rows_before
        c["nfe"] += (c["rows"] - rows_before) / max(self.num_samples, 1)
        self._run_walls[self.run_index] = self._run_end - self._run_start
        return out

    # ------------------------------------------------------------------ report
    def clear_report(self) -> None:
        """Forget the log and counters (the installed methods stay)."""
        self._log: list[dict] = []
        self._counters = {"runs": 0, "calls": 0, "rows": 0, "nfe": 0.0, "transformer_s": 0.0}
        self._run_walls: dict[int, float] = {}
        self._samples_rows: dict[int, int] = {}
        self._build_chain()

    def report(self, log: bool = True) -> dict:
        """Counters and the per-call decision log since the handle was made (or ``clear_report``).

        ``nfe`` is per sample and per run (averaged over runs): rows sent / samples, so a CFG step
        counts 2. ``wall_s`` sums each run's time from its start to the end of its last call.
        """
        c = self._counters
        runs = max(c["runs"], 1)
        rep: dict[str, Any] = {
            "methods_installed": [type(m).__name__ for m in self.methods],
            "runs": c["runs"],
            "calls": c["calls"],
            "rows_sent": c["rows"],
            "nfe": round(c["nfe"] / runs, 4),
            "wall_s": round(sum(self._run_walls.values()), 4),
            "transformer_s": round(c["transformer_s"], 4),
            "methods": {name: fn() for name, fn in self._reports.items()},
        }
        if log:
            rep["log"] = [dict(e) for e in self._log]
        return rep

    def __repr__(self) -> str:
        state = "enabled" if self._enabled else "disabled"
        names = [type(m).__name__ for m in self.methods]
        return f"<hasten.Handle {state} on {type(self.transformer).__name__}: {names}>"
