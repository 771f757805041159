"""Peer acceleration methods for ``hasten bench``: diffusers' cache hooks and cache-dit's DBCache.

Each installer takes a **private copy** of a :class:`~hasten.pipeline.HastenPipeline` (the benchmark
gives every configuration its own copy of the transformer, so nothing a peer patches can leak into
another configuration) and installs the peer on it the way its documentation says, adapted only where
this model needs it. The adaptations, all visible here, are:

- ``DiTTransformer2DModel`` is not a diffusers ``CacheMixin``, so ``transformer.enable_cache(...)`` does
  not exist on it; the ``apply_*`` functions that ``enable_cache`` dispatches to are called directly.
- diffusers' hooks read a cache context that diffusers pipelines set around every denoiser call
  (``with transformer.cache_context("cond"): ...``). A forward pre-hook sets it here, once per call,
  with the step index and the timestep in diffusers' convention (1000 = noise, 0 = data; hasten's
  flow-matching time ``t`` runs the other way, so ``timestep = 1000 (1 - t)``). The same value feeds
  the ``current_timestep_callback`` of PyramidAttentionBroadcast and FasterCache, whose default
  timestep ranges are written in that convention.
- TaylorSeerCache's default identifiers (``^transformer_blocks.*attn``) full-match no module of a DiT
  (its attention is ``attn1``), so it would silently hook nothing; the benchmark names the DiT's
  self-attention and feed-forward modules, which is what the TaylorSeer paper caches.
- FasterCache splits the batched guidance inputs only for the keyword arguments it knows; DiT's
  ``class_labels`` is added to that list (the inputs are ``[uncond; cond]``, FasterCache's order).
- MagCache needs per-model magnitude ratios: they are calibrated first with diffusers' own
  ``MagCacheConfig(calibrate=True)`` on a calibration batch (different seed from the benchmark).
- cache-dit is driven through its registered DiT recipe (``BlockAdapter`` with ``DiTPatchFunctor``,
  ``ForwardPattern.Pattern_3``). cache-dit patches the pipeline *class*'s ``__call__``; each install
  uses a throwaway subclass so that no other pipeline is affected.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..pipeline import TIME_SCALE, HastenPipeline

# module-name patterns for the DiT's self-attention and feed-forward (TaylorSeer, FasterCache, PAB)
DIT_ATTN = r"transformer_blocks\.\d+\.attn1"
DIT_FF = r"transformer_blocks\.\d+\.ff"


def copy_pipeline(pipe: HastenPipeline, cls: type[HastenPipeline] | None = None) -> HastenPipeline:
    """A new pipeline (optionally of a subclass) around a deep copy of ``pipe``'s transformer."""
    cls = cls or type(pipe)
    return cls(copy.deepcopy(pipe.transformer), num_classes=pipe.num_classes,
               guidance_scale=pipe.default_guidance_scale, name=pipe.name)


# --------------------------------------------------------------------------- diffusers hooks
class DiffusersCacheContext:
    """Sets diffusers' cache context before every transformer call and tracks the current timestep."""

    def __init__(self, transformer: torch.nn.Module):
        from diffusers.hooks import HookRegistry

        self.transformer = transformer
        self.step = 0
        self.timestep = float(TIME_SCALE)  # diffusers convention: start at noise
        self._registry = HookRegistry.check_if_exists_or_initialize(transformer)
        self._handle = transformer.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        ts = kwargs.get("timestep")
        t = float(torch.as_tensor(ts).flatten()[0]) if ts is not None else 0.0
        self.timestep = TIME_SCALE - t
        _set_cache_context(module, CacheContext("cond_uncond", step_index=self.step, timestep=self.timestep,
                                                sigma=self.timestep / TIME_SCALE))
        self.step += 1

    def current_timestep(self) -> float:
        return self.timestep

    def start_run(self) -> None:
        """Reset the step counter and every stateful diffusers hook (a new sampling run)."""
        self.step = 0
        self.timestep = float(TIME_SCALE)
        self._registry.reset_stateful_hooks(recurse=True)

    def hooks_changed(self) -> None:
        """Hooks were added or removed below the transformer: drop diffusers' cached list of them (as
        ``enable_cache``/``disable_cache`` do), or the context would not reach the new hooks."""
        self._registry.invalidate_child_registries_cache()

    def remove(self) -> None:
        """Remove this context hook and every diffusers hook under the transformer."""
        from diffusers.hooks import HookRegistry

        self._handle.remove()
        for module in self.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if isinstance(registry, HookRegistry):
                for name in list(registry.hooks):
                    registry.remove_hook(name, recurse=False)
        self.hooks_changed()


def diffusers_hook_config(kind: str, params: dict, current_timestep: Callable[[], float], *, guided: bool,
                          split_kwargs: Sequence[str] = (), cache_identifiers: Sequence[str] | None = None) -> Any:
    """The bench's recipe for diffusers cache hook ``kind`` (its config object), shared by every model.

    ``current_timestep`` feeds the hooks that gate on time (diffusers' 0..1000, noise at 1000); ``guided``:
    the batch is [uncond; cond] rows (FasterCache splits it); ``split_kwargs``: the model's own keywords batched
    with those rows, beyond the SD3 ones diffusers lists; ``cache_identifiers``: TaylorSeer's module names
    (its defaults otherwise). MagCache reads ``params["steps"]`` and ``params["mag_ratios"]``."""
    import diffusers.hooks as H

    if kind == "first-block-cache":
        return H.FirstBlockCacheConfig(threshold=float(params["threshold"]))
    if kind == "taylorseer-cache":
        extra = {"cache_identifiers": list(cache_identifiers)} if cache_identifiers is not None else {}
        return H.TaylorSeerCacheConfig(cache_interval=int(params["cache_interval"]),
                                       disable_cache_before_step=int(params.get("warmup_steps", 3)),
                                       max_order=int(params.get("max_order", 1)),
                                       taylor_factors_dtype=torch.float32, **extra)
    if kind == "pyramid-attention-broadcast":
        lo, hi = params.get("timestep_range", (100, 800))
        return H.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(params["skip_range"]),
            spatial_attention_timestep_skip_range=(lo, hi),
            current_timestep_callback=current_timestep)
    if kind == "faster-cache":
        lo, hi = params.get("timestep_range", (-1, 681))
        cfg = H.FasterCacheConfig(
            spatial_attention_block_skip_range=int(params.get("skip_range", 2)),
            spatial_attention_timestep_skip_range=(lo, hi),
            unconditional_batch_skip_range=int(params.get("uncond_skip_range", 5)),
            current_timestep_callback=current_timestep,
            attention_weight_callback=lambda _: float(params.get("attention_weight", 0.3)),
            # without CFG the batch is B conditional rows, not [uncond; cond]: nothing to split
            tensor_format="BCHW", is_guidance_distilled=not guided)
        cfg._unconditional_conditional_input_kwargs_identifiers = [
            *cfg._unconditional_conditional_input_kwargs_identifiers, *split_kwargs]
        return cfg
    if kind == "mag-cache":
        return H.MagCacheConfig(threshold=float(params["threshold"]),
                                max_skip_steps=int(params.get("max_skip", 3)),
                                retention_ratio=float(params.get("retention", 0.2)),
                                num_inference_steps=int(params["steps"]), mag_ratios=params["mag_ratios"])
    raise ValueError(f"unknown diffusers cache hook {kind!r}")


_APPLY = {"first-block-cache": "apply_first_block_cache", "taylorseer-cache": "apply_taylorseer_cache",
          "pyramid-attention-broadcast": "apply_pyramid_attention_broadcast",
          "faster-cache": "apply_faster_cache", "mag-cache": "apply_mag_cache"}
DIFFUSERS_KINDS = tuple(_APPLY)


def install_diffusers_hook(pipe: HastenPipeline, kind: str, params: dict) -> DiffusersCacheContext:
    """Install one diffusers cache hook on ``pipe``. Returns the context (``start_run``, ``remove``)."""
    import diffusers.hooks as H

    ctx = DiffusersCacheContext(pipe.transformer)
    try:
        if kind == "mag-cache" and "mag_ratios" not in params:
            params = {**params, "mag_ratios": calibrate_mag_ratios(pipe, int(params["steps"]),
                                                                   params.get("calibration", {}))}
        config = diffusers_hook_config(kind, params, ctx.current_timestep,
                                       guided=float(getattr(pipe, "default_guidance_scale", 2.0)) > 1.0,
                                       split_kwargs=("class_labels",), cache_identifiers=(DIT_ATTN, DIT_FF))
        getattr(H, _APPLY[kind])(pipe.transformer, config)
    except BaseException:
        ctx.remove()  # a failed install leaves nothing on the shared model
        raise
    ctx.hooks_changed()
    return ctx


def calibrate_mag_ratios(pipe: HastenPipeline, steps: int, calibration: dict) -> list[float]:
    """MagCache's own calibration (``MagCacheConfig(calibrate=True)``) on a separate batch, on a copy.

    diffusers prints the ratios at the end of the calibrated run (and then clears its state), so the
    printed list is read back from stdout.
    """
    import diffusers.hooks as H

    cal = copy_pipeline(pipe)
    ctx = DiffusersCacheContext(cal.transformer)
    H.apply_mag_cache(cal.transformer, H.MagCacheConfig(calibrate=True, num_inference_steps=steps))
    labels = torch.arange(int(calibration.get("samples", 20))) % pipe.num_classes
    gen = torch.Generator().manual_seed(int(calibration.get("seed", 12345)))
    buf = io.StringIO()
    ctx.start_run()
    with contextlib.redirect_stdout(buf):
        cal(labels, num_inference_steps=steps, generator=gen,
            guidance_scale=calibration.get("guidance_scale"))
    return parse_mag_ratios(buf.getvalue(), steps)


def parse_mag_ratios(printed: str, steps: int) -> list[float]:
    """The ratios diffusers' MagCache calibration printed (the last list in ``printed``)."""
    lists = re.findall(r"\[[^\[\]]*\]", printed)
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios")
    ratios = [float(r) for r in ast.literal_eval(lists[-1])]
    if len(ratios) != steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {steps} steps")
    return ratios


# --------------------------------------------------------------------------- cache-dit
def cache_dit_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("cache-dit")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return None


def install_cache_dit(pipe: HastenPipeline, params: dict, copy_model: bool = True) -> HastenPipeline:
    """cache-dit DBCache (optionally with its TaylorSeer calibrator) on a copy of ``pipe``.

    Returns the pipeline to sample with, whose class is a throwaway subclass because cache-dit patches
    ``type(pipe).__call__``. With ``copy_model=False`` it shares ``pipe``'s transformer, which cache-dit
    then patches for good (its ``disable_cache`` does not restore the forward): for a last use only.
    """
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    try:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig
        from cache_dit.caching.patch_functors import DiTPatchFunctor
    except ImportError as e:
        raise RuntimeError(f"cache-dit is not installed ({e}); install the bench extra: "
                           "pip install 'hasten[bench]'") from None
    cls = type(f"{type(pipe).__name__}CacheDiT", (type(pipe),), {})
    own = copy_pipeline(pipe, cls) if copy_model else cls(pipe.transformer, num_classes=pipe.num_classes,
                                                          guidance_scale=pipe.default_guidance_scale,
                                                          name=pipe.name)
    adapter = BlockAdapter(pipe=own, transformer=own.transformer, blocks=own.transformer.transformer_blocks,
                           forward_pattern=ForwardPattern.Pattern_3, patch_functor=DiTPatchFunctor(),
                           check_forward_pattern=True)
    cache_config = DBCacheConfig(Fn_compute_blocks=int(params.get("Fn", 1)),
                                 Bn_compute_blocks=int(params.get("Bn", 0)),
                                 residual_diff_threshold=float(params["threshold"]),
                                 max_warmup_steps=int(params.get("warmup_steps", 8)),
                                 max_continuous_cached_steps=int(params.get("max_continuous", -1)),
                                 num_inference_steps=int(params["steps"]),
                                 enable_separate_cfg=False)  # hasten batches [uncond; cond] in one call
    calibrator = None
    if params.get("taylorseer"):
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=int(params.get("taylorseer_order", 1)))
    cache_dit.enable_cache(adapter, cache_config=cache_config, calibrator_config=calibrator)
    return own
