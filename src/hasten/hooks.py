"""The acceleration handle: interception of denoiser calls and blocks, with all state on the handle.

``hasten.accelerate(target, *methods)`` builds one :class:`Handle` and asks every method to install
itself through it. This module is the contract between the handle and the methods.

Mechanism. hasten registers diffusers ``ModelHook`` objects in the model's ``HookRegistry`` (the
mechanism behind ``enable_cache``, group offloading and layerwise casting): one hook named
``hasten`` on the transformer and one per wrapped block. The registry chains hooks and unlinks any
one of them without disturbing the others, so hasten can be installed and removed in any order
relative to diffusers' caches, offloading and accelerate's CPU-offload hooks. The transformer hook
is stateful, so diffusers' ``cache_context(name)`` reaches it: that name is the call's *branch*.

Contract (stable; methods in ``hasten.methods`` build against it)
------------------------------------------------------------------
**Installing.** A method is a config dataclass plus ``install(handle, config)``. It never assigns to
the target itself: it asks the handle, which records how to undo every change, so that
``handle.disable()`` (or leaving ``with hasten.accelerate(...)``) restores the target bitwise:

- ``handle.wrap_call(fn, name)``: ``fn(inner, *args, **kwargs)`` intercepts every transformer call.
  Wrappers nest in install order, the first installed is the OUTERMOST (``accelerate`` sorts methods
  by their ``level``: "call" before "block" before "token", so guidance wraps caching).
- ``handle.wrap_block(module, fn, name)``: ``fn(inner_forward, *args, **kwargs)`` replaces one block's
  forward (a hook in the block's registry; the class and the state dict are untouched).
- ``handle.set_attr(obj, name, value)``: any other reversible attribute change.
- ``handle.on_run_start(fn)``: ``fn()`` is called when a new sampling run starts.
- ``handle.add_report(name, fn)``: ``fn() -> dict`` is merged into ``handle.report()["methods"][name]``.

**Per-call state, read by methods.** Set by the handle at the entry of each transformer call (the
outermost layer), before any method wrapper runs:

- ``handle.branch``: the diffusers cache-context name of the call (``"cond"``, ``"uncond"``,
  ``"cond_uncond"``, ...), or ``None`` when the pipeline sets none.
- ``handle.stream``: ``(branch, full_batch)``. Calls of one stream form one trajectory: pipelines
  that send the guidance branches as separate calls (Wan, Flux true CFG, QwenImage) make two
  streams, a pipeline that batches them makes one (rows ``[uncond; cond]`` or ``[cond; uncond]``);
  an extra call with another batch size (SD3 skip-layer guidance) is a stream of its own instead of
  resetting the others. ``handle.primary`` is False for such extra streams (no context name and a
  batch other than the run's first call's); block methods compute them in full.
- ``handle.call_index``: index of the current call within the current run *in its stream* (0, 1,
  ...). With Euler it is the step index for every layout; with Heun a step makes two calls.
- ``handle.run_index``: runs since the handle was made (0, 1, ...).
- ``handle.full_batch``: rows of the call as the pipeline sent it.
- ``handle.timestep``: the ``timestep`` argument as sent (a number, a (B,) or a per-token (B, L)
  tensor); ``handle.t`` is its scalar reading (the largest value of the first row: per-token
  timesteps give the noised tokens' level).
- ``handle.log_entry``: the decision-log dict of this call; methods add their decision under their key.
- ``handle.guidance_scale``: the run's classifier-free guidance scale when the pipeline tells it
  (hasten's pipeline through ``velocity_fn``; diffusers pipelines through ``pipe._guidance_scale``,
  read at ``set_timesteps``); ``None`` otherwise.

**Batch shrinking.** ``handle.active_rows`` is ``None`` (all ``full_batch`` rows are sent) or a
``LongTensor`` of indices into the call's rows, sorted ascending, naming the rows that are actually
sent to the inner forward, in that order. A call-level method that drops rows (Adaptive Guidance
stops sending the unconditional row of switched samples) sets it before calling ``inner`` with the
sliced arguments (:func:`select_rows`) and restores it to ``None`` before returning (``try/finally``).
Block methods index their per-row caches with it. Only one method may shrink the batch.

**Runs.** The call index is reset at the start of each run: at every ``pipe(...)`` of hasten's
pipeline (its ``velocity_fn``), at every ``scheduler.set_timesteps`` of a diffusers pipeline, on
``handle.reset()``, and (any target) when the timestep moves against the direction of the current
run (diffusers timesteps fall 999 -> 0, hasten's flow time rises 0 -> 1000; a repeated timestep, as
in Heun or a second branch, is not a new run).

**Counting.** ``report()["nfe"]`` = transformer rows actually sent (after shrinking) per sample, per
run, whatever is installed: a CFG step counts 2 whether the branches are batched or separate calls.
Samples per run: the number of labels for hasten's pipeline; otherwise the rows of the run's first
call, halved when that call is a batched guidance call (its two halves of ``hidden_states`` are
identical, as every diffusers pipeline builds them with ``cat([latents] * 2)``; in no context or in
a batched one such as LTX's ``"cond_uncond"``).

**Log.** ``report()["log"]`` holds one entry per call, the newest ``log_limit`` (default 10,000) only.
"""

from __future__ import annotations

import collections
import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import HookFunctionReference, StateManager
from torch import nn

from .errors import HastenError

_MISSING = object()
HOOK_NAME = "hasten"
LOG_LIMIT = 10_000
SEPARATE_BRANCHES = ("cond", "uncond")  # cache-context names of guidance branches sent as separate calls


TRUE_CFG_PIPELINES = ("FluxPipeline", "QwenImagePipeline", "HunyuanVideoPipeline")


def run_guidance_scale(pipeline: Any) -> float | None:
    """The classifier-free guidance scale of the diffusers pipeline run now in progress (read when it sets its
    timesteps): ``true_cfg_scale`` for the true-CFG pipelines (Flux, QwenImage, HunyuanVideo: their
    ``guidance_scale`` is the embedded distilled guidance), else ``pipeline._guidance_scale`` when the pipeline
    keeps it, else the ``guidance_scale`` argument of its ``__call__`` (DiT and PixArt keep it only there).
    None when it cannot be found."""
    true_cfg = any(c.__name__ in TRUE_CFG_PIPELINES for c in type(pipeline).__mro__)
    if not true_cfg:
        gs = getattr(pipeline, "_guidance_scale", None)  # set by most diffusers pipelines' __call__
        if isinstance(gs, (int, float)):
            return float(gs)
    name = "true_cfg_scale" if true_cfg else "guidance_scale"
    frame = inspect.currentframe()
    for _ in range(12):  # set_timesteps <- (retrieve_timesteps <-) the pipeline's __call__
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return None
        if frame.f_locals.get("self") is pipeline:
            gs = frame.f_locals.get(name)
            return float(gs) if isinstance(gs, (int, float)) else None
    return None


class _WatchedSetTimesteps:
    """A scheduler's ``set_timesteps`` that first starts a run on the handle and reads its guidance scale. A
    callable object, not a closure, so that a deep copy of the scheduler (LTX-2 copies its scheduler for the
    audio latents) gets its own plain method back instead of one that sets the original's timesteps."""

    def __init__(self, handle: Any, sched: Any):
        self.handle, self.sched, self.orig = handle, sched, sched.set_timesteps
        functools.update_wrapper(self, self.orig)  # diffusers' retrieve_timesteps reads its signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.handle.reset()
        self.handle.guidance_scale = run_guidance_scale(self.handle.pipeline)
        return self.orig(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        copy_of_sched = memo.get(id(self.sched))
        return self if copy_of_sched is None else type(copy_of_sched).set_timesteps.__get__(copy_of_sched)


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


def select_rows(obj: Any, index: torch.Tensor, n: int) -> Any:
    """Recursively take rows ``index`` of every tensor with a leading batch dimension ``n`` (args, kwargs,
    nested dicts/lists/tuples); other values (rotary embeddings, image ids, masks without a batch dim,
    non-tensors) pass through."""
    if torch.is_tensor(obj):
        return obj.index_select(0, index.to(obj.device)) if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, dict):
        return {k: select_rows(v, index, n) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(select_rows(v, index, n) for v in obj)
    return obj


def _scalar(t: Any) -> float | None:
    """One number for a call's timestep: a number, a (B,) tensor's first value, or for per-token
    timesteps (B, L) the largest value of the first row (the level of the tokens being denoised)."""
    if isinstance(t, torch.Tensor):
        if not t.numel() or t.device.type == "meta":
            return None
        return float(t[0].max()) if t.dim() >= 2 else float(t.reshape(-1)[0])
    if isinstance(t, (int, float)):
        return float(t)
    return None


def row_timesteps(t: Any, rows: int) -> torch.Tensor:
    """One timestep per row (float32): a scalar is repeated, per-token (B, L) timesteps give each row's
    largest value."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if t.dim() >= 2:
        t = t.flatten(1).amax(1)
    t = t.reshape(-1)
    return t.expand(rows) if t.numel() == 1 else t


def is_batched_guidance(hidden_states: Any) -> bool:
    """Whether a call's rows are ``cat([latents] * 2)``: an even batch with identical halves."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() == 0 or hidden_states.is_meta:
        return False
    n = hidden_states.shape[0]
    return n >= 2 and n % 2 == 0 and torch.equal(hidden_states[: n // 2], hidden_states[n // 2:])


class _BranchContext(StateManager):
    """Receives the cache context diffusers sets with ``transformer.cache_context(name)``."""

    def __init__(self) -> None:
        super().__init__(dict)

    @property
    def name(self) -> str | None:
        ctx = self._context
        return None if ctx is None else getattr(ctx, "name", ctx)


class _CallHook(ModelHook):
    """The transformer-level hook: runs the handle's call path around the inner forward."""

    _is_stateful = True  # so that diffusers' cache_context reaches ``branch``

    def __init__(self, handle: Handle):
        super().__init__()
        self.handle = handle
        self.branch = _BranchContext()

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.handle._forward(self.fn_ref.original_forward, *args, **kwargs)

    def _set_context(self, module: nn.Module, name: str | None) -> None:  # diffusers < 0.36
        self.branch._context = name

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.handle.reset()
        return module


class _BlockHook(ModelHook):
    """A block-level hook: ``fn(inner_forward, *args, **kwargs)``."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.fn_ref.original_forward, *args, **kwargs)


def _registry(module: nn.Module) -> HookRegistry:
    return HookRegistry.check_if_exists_or_initialize(module)


class _KeptRef(HookFunctionReference):
    """The function reference of a hasten hook (it has ``new_forward``).

    When a hook registered before ours is removed, diffusers' ``remove_hook`` re-links the chain by
    assigning our reference's ``forward``, which for a ``new_forward`` hook would drop the hook
    itself; here that assignment re-links ``original_forward``, what our ``new_forward`` calls.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and self.__dict__.get("_kept"):
            name = "original_forward"
        object.__setattr__(self, name, value)


def register_hook(module: nn.Module, hook: ModelHook, name: str) -> Callable[[], None]:
    """Register ``hook`` in ``module``'s HookRegistry; returns the function that removes it.

    Removal leaves every other hook working whatever the order: other registry hooks (diffusers'
    caches, group offloading) and accelerate's ``add_hook_to_module`` wrappers (CPU offload). Two
    details make that true: diffusers' ``remove_hook`` re-links the next hook by assigning its
    ``forward``, which silently drops a next hook that has ``new_forward`` (its caches do), so we
    re-link that hook's ``original_forward`` instead; and accelerate's removal restores
    ``forward = _old_forward``, so on a module it already wraps we register *under* its wrapper.
    """
    fresh = "_diffusers_hook" not in module.__dict__ and "forward" not in module.__dict__
    # accelerate's add_hook_to_module (CPU offload) wraps forward and calls module._old_forward; its
    # removal restores forward = _old_forward. Register under it, so that its removal keeps ours.
    accel = module.__dict__.get("_hf_hook") is not None and "_old_forward" in module.__dict__
    if accel:
        accel_forward = module.__dict__.get("forward")
        object.__setattr__(module, "forward", module.__dict__["_old_forward"])
    registry = _registry(module)
    registry.register_hook(hook, name)
    registry.invalidate_child_registries_cache()
    hook.fn_ref.__class__ = _KeptRef
    hook.fn_ref._kept = True
    ours = module.__dict__.get("forward")  # the registry's outermost wrapper right now
    if accel:
        object.__setattr__(module, "_old_forward", ours)
        object.__setattr__(module, "forward", accel_forward)

    def remove() -> None:
        if name not in registry.hooks:
            return
        outer = module.__dict__.get("forward")
        covered = registry._hook_order[-1] == name and outer is not ours
        index = registry._hook_order.index(name)
        nxt = registry._fn_refs[index + 1] if index + 1 < len(registry._fn_refs) else None
        keep = None if nxt is None or nxt.original_forward is None else nxt.forward
        registry.remove_hook(name, recurse=False)
        if keep is not None and nxt.forward is not keep:
            # the next hook has a new_forward (diffusers' caches do): re-link what it calls, not itself
            object.__setattr__(nxt, "original_forward", nxt.forward)
            object.__setattr__(nxt, "forward", keep)
        registry.invalidate_child_registries_cache()
        if covered:  # something wrapped our forward from outside the registry: re-link it, keep it
            restored = module.__dict__.get("forward")
            object.__setattr__(module, "forward", outer)
            if module.__dict__.get("_old_forward") is ours:  # accelerate's hook calls _old_forward
                object.__setattr__(module, "_old_forward", restored)
        elif fresh and not registry.hooks:  # the module is exactly as we found it
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_diffusers_hook", None)

    return remove


class Handle:
    """What ``hasten.accelerate`` returns: the installed methods, their state, the report, and undo."""

    def __init__(self, target: Any, transformer: nn.Module, pipeline: Any = None, kind: str = "transformer",
                 blocks: Any = None, log_limit: int = LOG_LIMIT):
        self.target = target
        self.transformer = transformer
        self.pipeline = pipeline
        self.kind = kind  # "hasten" | "diffusers" | "transformer"
        self.explicit_blocks = blocks
        self.log_limit = int(log_limit)
        self.methods: list[Any] = []
        self.tuned_plan: dict | None = None  # the ``hasten tune`` plan installed (solver, steps), if any
        # per-call state (see the module docstring)
        self.call_index = -1
        self.run_index = -1
        self.full_batch = 0
        self.branch: str | None = None
        self.stream: tuple[str | None, int] = (None, 0)
        self.primary = True
        self.timestep: Any = None
        self.t: float | None = None
        self.active_rows: torch.Tensor | None = None
        self.num_samples: int | None = None
        self.guidance_scale: float | None = None  # of the current run, when the pipeline tells it
        self.log_entry: dict | None = None
        # bookkeeping
        self._undo: list[Callable[[], None]] = []
        self._call_wrappers: list[tuple[str, Callable]] = []
        self._run_start_fns: list[Callable[[], None]] = []
        self._reports: dict[str, Callable[[], dict]] = {}
        self._blocks = None
        self._enabled = False
        self._pending_reset = True
        self._pending_samples: int | None = None
        self._run_clock: float | None = None
        self._run_t: tuple[float, float] | None = None  # (first, last) timestep of this run (run detection)
        self._stream_calls: dict[tuple, int] = {}
        self._first_batch = 0
        self._hook: _CallHook | None = None
        self._chain: Callable | None = None
        self._ts_pos: int | None = None
        self._hs_pos: int | None = None
        self.clear_report()

    # ------------------------------------------------------------------ registration (used by methods)
    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` (instance attribute) and record how to undo it."""
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)

        def undo() -> None:
            if old is _MISSING:
                try:
                    object.__delattr__(obj, name) if isinstance(obj, nn.Module) else delattr(obj, name)
                except AttributeError:
                    pass
            elif isinstance(obj, nn.Module):
                object.__setattr__(obj, name, old)
            else:
                setattr(obj, name, old)

        self._undo.append(undo)
        object.__setattr__(obj, name, value) if isinstance(obj, nn.Module) else setattr(obj, name, value)

    def _register(self, module: nn.Module, hook: ModelHook, name: str) -> None:
        self._undo.append(register_hook(module, hook, name))

    def wrap_block(self, module: nn.Module, fn: Callable, name: str = "") -> None:
        """Hook ``module``: its forward becomes ``fn(inner_forward, *args, **kwargs)``; undone by ``disable``."""
        registry = module.__dict__.get("_diffusers_hook")
        k = 0 if registry is None else sum(1 for n in registry.hooks if n.startswith(HOOK_NAME))
        self._register(module, _BlockHook(fn), f"{HOOK_NAME}.{k}")

    def wrap_call(self, fn: Callable, name: str) -> None:
        """Intercept whole transformer calls: ``fn(inner, *args, **kwargs)``; first installed = outermost."""
        self._call_wrappers.append((name, fn))
        self._chain = None

        def undo() -> None:
            self._call_wrappers.remove((name, fn))
            self._chain = None

        self._undo.append(undo)

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

    @property
    def device(self) -> torch.device:
        """The transformer's device (where methods create their tensors)."""
        p = next(iter(self.transformer.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def compile(self, **compile_kwargs: Any) -> Handle:
        """Regional ``torch.compile`` under hasten's hooks: each block's own computation (what runs below
        every hasten hook of that block) is compiled; hasten's decisions stay eager around it, so no
        decision is traced, guarded or recompiled per step. Supported order: ``accelerate`` first, then
        ``handle.compile(...)`` (``compile_kwargs`` go to ``torch.compile``; default backend inductor).
        Compiling the whole transformer over hasten's hooks is not supported (dynamo would trace the
        per-call decisions). ``disable()`` removes the compiled functions with the hooks."""
        for spec in self.blocks():
            registry = spec.module.__dict__.get("_diffusers_hook")
            names = [] if registry is None else [n for n in registry._hook_order if n.startswith(HOOK_NAME)]
            if not names:  # no block method on this block: a pass-through hook to compile under
                self.wrap_block(spec.module, lambda inner, *a, **k: inner(*a, **k), spec.name)
                registry = spec.module.__dict__["_diffusers_hook"]
                names = [n for n in registry._hook_order if n.startswith(HOOK_NAME)]
            ref = registry.hooks[names[0]].fn_ref  # the innermost hasten hook
            eager = ref.original_forward
            compiled = torch.compile(eager, **compile_kwargs)
            ref.original_forward = compiled

            def undo(ref=ref, eager=eager, compiled=compiled) -> None:
                if ref.original_forward is compiled:  # else a hook below was removed and diffusers relinked since
                    ref.original_forward = eager

            self._undo.append(undo)
        return self

    # ------------------------------------------------------------------ install / undo
    def _install_core(self) -> None:
        tr = self.transformer
        registry = tr.__dict__.get("_diffusers_hook")
        if registry is not None and HOOK_NAME in registry.hooks:
            raise HastenError("this model is already accelerated by another handle: "
                              "call disable() on that handle first")
        self._enabled = True
        from .adapters.diffusers import unwrap

        inner = unwrap(tr)  # a torch.compile or PEFT wrapper's forward is (*args, **kwargs)
        cls_forward = functools.partial(type(inner).forward, inner)  # the class's signature, not a wrapper's
        self._ts_pos = _arg_position(cls_forward, "timestep")
        self._hs_pos = _arg_position(cls_forward, "hidden_states")
        if self._hs_pos is None:
            self._hs_pos = 0
        self._hook = _CallHook(self)
        self._register(tr, self._hook, HOOK_NAME)
        if self.kind == "hasten":
            pipe = self.pipeline
            orig_vfn = pipe.velocity_fn

            @functools.wraps(orig_vfn)
            def velocity_fn(labels, *a, **k):
                self.reset(num_samples=len(labels))
                gs = a[0] if a else k.get("guidance_scale")
                self.guidance_scale = None if gs is None else float(gs)
                return orig_vfn(labels, *a, **k)

            self.set_attr(pipe, "velocity_fn", velocity_fn)
        elif self.kind == "diffusers":
            self.watch_scheduler()

    def watch_scheduler(self) -> None:
        """A diffusers pipeline starts each run by setting its scheduler's timesteps: wrap ``set_timesteps`` to
        start a run there and read its guidance scale. Called again when the scheduler is swapped (tuned plans)."""
        sched = getattr(self.pipeline, "scheduler", None)
        if not hasattr(sched, "set_timesteps"):
            return
        self.set_attr(sched, "set_timesteps", _WatchedSetTimesteps(self, sched))

    def disable(self) -> None:
        """Undo every change, newest first: the target computes exactly as before ``accelerate``."""
        while self._undo:
            self._undo.pop()()
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
        """Start a new run at the next call: call indices back to 0, per-run caches dropped."""
        self._pending_reset = True
        self._pending_samples = num_samples
        self._run_clock = time.perf_counter()

    def _start_run(self) -> None:
        self._pending_reset = False
        self.run_index += 1
        self._run_t = None
        self._stream_calls = {}
        self._first_batch = 0
        self.num_samples = self._pending_samples
        self._pending_samples = None
        start = self._run_clock
        self._run_start = start if start is not None else time.perf_counter()
        self._run_clock = None
        self._counters["runs"] += 1
        for fn in self._run_start_fns:
            fn()

    def _detect_new_run(self, t: float | None) -> bool:
        """The timestep moved against the direction of the current run."""
        if t is None or self._run_t is None:
            return False
        first, last = self._run_t
        if last == first:
            return False  # direction not known yet (one timestep or repeats)
        direction = 1.0 if last > first else -1.0
        return (t - last) * direction < 0

    # ------------------------------------------------------------------ the call path
    def _forward(self, inner_forward: Callable, *args: Any, **kwargs: Any) -> Any:
        hs = get_arg(args, kwargs, "hidden_states", self._hs_pos)
        ts = get_arg(args, kwargs, "timestep", self._ts_pos)
        t = _scalar(ts)
        if self._pending_reset or self._detect_new_run(t):
            self._start_run()
        if t is not None:
            self._run_t = (t, t) if self._run_t is None else (self._run_t[0], t)
        rows = int(hs.shape[0]) if isinstance(hs, torch.Tensor) else 1
        branch = self._hook.branch.name if self._hook is not None else None
        if not self._first_batch:
            self._first_batch = rows
            if self.num_samples is None:
                batched = branch not in SEPARATE_BRANCHES and is_batched_guidance(hs)  # e.g. "cond_uncond"
                self.num_samples = rows // 2 if batched else rows
        stream = (branch, rows)
        n = self._stream_calls.get(stream, 0)
        self._stream_calls[stream] = n + 1
        self.branch, self.stream, self.call_index = branch, stream, n
        self.primary = branch is not None or rows == self._first_batch
        self.full_batch = rows
        self.timestep, self.t = ts, t
        self.active_rows = None
        entry = {"run": self.run_index, "call": n, "t": t, "rows": rows}
        if branch is not None:
            entry["branch"] = branch
        self.log_entry = entry
        self._log.append(entry)
        c = self._counters
        c["calls"] += 1
        rows_before = c["rows"]
        chain = self._chain_for(inner_forward)
        t0 = time.perf_counter()
        try:
            out = chain(*args, **kwargs)
        finally:
            self.active_rows = None
            t1 = time.perf_counter()
            c["transformer_s"] += t1 - t0
            self._run_end = t1
        entry["rows_sent"] = c["rows"] - rows_before
        c["nfe"] += (c["rows"] - rows_before) / max(self.num_samples or 1, 1)
        self._run_walls[self.run_index] = self._run_end - self._run_start
        return out

    def _chain_for(self, inner_forward: Callable) -> Callable:
        """The method wrappers around ``inner_forward`` (cached while neither changes)."""
        if self._chain is not None and self._chain_key is inner_forward:  # reset when the wrappers change
            return self._chain
        hs_pos, counters = self._hs_pos, self._counters

        def innermost(*args, **kwargs):
            hs = get_arg(args, kwargs, "hidden_states", hs_pos)
            counters["rows"] += int(hs.shape[0]) if isinstance(hs, torch.Tensor) else 1
            return inner_forward(*args, **kwargs)

        chain = innermost
        for _, fn in reversed(self._call_wrappers):
            chain = functools.partial(fn, chain)
        self._chain, self._chain_key = chain, inner_forward
        return chain

    # ------------------------------------------------------------------ report
    def clear_report(self) -> None:
        """Forget the log and counters (the installed methods stay)."""
        self._log: collections.deque[dict] = collections.deque(maxlen=self.log_limit)
        self._counters = {"runs": 0, "calls": 0, "rows": 0, "nfe": 0.0, "transformer_s": 0.0}
        self._run_walls: dict[int, float] = {}
        self._chain = None
        self._chain_key = None

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


def resolve_target(target: Any) -> tuple[str, nn.Module, Any]:
    """(kind, transformer, pipeline) for hasten's pipeline (it has ``velocity_fn``), a diffusers pipeline
    (its ``.transformer`` is accelerated) or a bare model."""
    if isinstance(target, Handle):
        raise HastenError("pass the pipeline or model to accelerate, not a handle")
    tr = getattr(target, "transformer", None)
    if isinstance(tr, nn.Module) and not isinstance(target, nn.Module):
        return ("hasten" if callable(getattr(target, "velocity_fn", None)) else "diffusers"), tr, target
    if isinstance(target, nn.Module):
        return "transformer", target, None
    raise HastenError(f"cannot accelerate a {type(target).__name__}: pass a hasten pipeline, a diffusers "
                      "pipeline or a diffusers transformer model")


def attach(target: Any, blocks: Any = None, log_limit: int = LOG_LIMIT) -> Handle:
    """A handle installed on ``target`` with no method yet (``hasten.accelerate`` adds the methods;
    calibration adds its recorders)."""
    kind, transformer, pipeline = resolve_target(target)
    handle = Handle(target, transformer, pipeline, kind, blocks, log_limit)
    handle._install_core()
    return handle
