"""FlexiDiT (Anagnostidis et al. 2025): one DiT that also runs at coarser patch sizes (4x fewer tokens
per doubling), so the early, noisy denoising steps cost a fraction of the late ones.

``flexify(transformer, patch_sizes=(2, 4))`` converts, in place, any diffusers transformer whose input
is a ``PatchEmbed`` and whose output is one linear de-embedding followed by the usual unpatchify
(``SD3Transformer2DModel``, ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``), and
``FluxTransformer2DModel``, whose pipeline packs the patches and sends rotary position ids (see
``_flexify_packed``). This is the paper's **shared-parameter variant**:

- The patch embedding and de-embedding of the coarse sizes live at an underlying patch size
  ``P = max(patch_sizes)`` and are projected to each patch size ``p`` with PI-resize (FlexiViT, Beyer
  et al. 2023): with ``B_{a->b}`` the bilinear resize of an ``a x a`` patch to ``b x b`` as a matrix,
  weights at size ``a`` become ``pinv(B_{a->b}^T) w`` at size ``b``, the least-squares solution of
  ``<x, w> = <B x, w'>``, exact
  for every ``x`` when ``b >= a`` (``pi_resize``; the identity is tested). Embedding: ``w_p =
  pinv(B_{P->p}^T) w_P``, initialised ``w_P = B_{P->p0}^T w_{p0}`` so that the original patch size
  ``p0`` reproduces the pretrained weights (``pinv(B^T) B^T = I`` as ``B_{P->p0}`` has full row rank);
  at init a coarse patch is embedded as the pretrained model embeds its bilinear down-sampling. The
  de-embedding is the transpose construction: ``W_P = B_{p0->P} W_{p0}`` (the coarse output patch is
  the bilinear up-sampling of what the pretrained head would emit) and ``W_p = pinv(B_{p->P}) W_P``;
  the output bias likewise. The embedding bias is shared, not projected. In the paper's notation
  (Sec. 3.1, App. C.2: underlying size p' = 4, "Q_embed ... the pseudo-inverse of the bi-linear
  interpolation projection", init ``w_flex = Q_embed^+ w_embed``, de-embedding "with flipped
  dimensions", init ``w = w_de Q_de^+``): ``Q_embed(p) = pinv(B_{P->p}^T)``, ``Q_de(p) = pinv(B_{p->P})``.
- Positional embeddings of a coarse patch come from its pixel coordinates: the pretrained grid of
  positional embeddings (whatever its kind: SD3's cropped table, DiT's sincos) interpolated bilinearly at
  the coarse patch's centre, which for a patch covering ``k x k`` original cells is their average.
- A learned per-patch-size embedding added to every token of that size after tokenisation (the paper:
  zero for the pretrained size; its init for new sizes is not stated: zero here), and
  patch-size-specific norms (the paper names them without saying which): here a learned elementwise
  scale and shift after the final norm for each coarse size, identity at init.

The original patch size is not touched: ``transformer.flex_mode = p0`` (the default) runs the
pretrained modules themselves, bitwise. This is a choice where the paper has every size read the one
set of underlying weights: here the original size keeps its own pretrained embedding and
de-embedding (which the underlying weights reproduce exactly at init), so that the powerful mode stays
the pretrained model whatever fine-tuning does to the coarse ones (the blocks are shared either way).

``flex_mode = p`` (or ``with patch_size(transformer, p):``) runs size ``p``: the patch embedding,
de-embedding and unpatchify use ``p`` for that call. The scheduler ``hasten.FlexiDiT`` (below) picks the
mode per denoiser call; fine-tuning (``hasten flexify``, for ``shapes`` and ``digits``) and the LoRA variant
(per-size ``peft`` adapters on the same modules, base frozen) are in ``hasten.flexidit_train``.

Rotary models (Flux): the position ids of the image tokens are built by the pipeline from the latent
grid; at size ``p = k p0`` they are rebuilt on the coarse grid at each patch's centre in fine-token
units, ``(k i + (k - 1) / 2, k j + (k - 1) / 2)``, so that the rotary phases keep meaning the same image
positions (``coarse_ids``; the mean of the covered tokens' ids, as the averaged sin-cos table above).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HastenError
from ..hooks import select_rows
from .guidance import _layout, is_guidance_call, unwrap_output


# --------------------------------------------------------------------------- PI-resize
@lru_cache(maxsize=32)
def resize_matrix(src: int, dst: int) -> torch.Tensor:
    """``B`` (dst^2, src^2), float64: the resize of a ``src x src`` patch to ``dst x dst`` as a matrix acting on
    row-major flattened patches. Up-sampling is bilinear (no antialiasing, half-pixel centres), as FlexiViT's
    PI-resize. Down-sampling averages each cell (area): at a factor of 2 that is exactly the bilinear
    resize, and at larger factors the bilinear one would read only the middle pixels of each cell (our
    choice; the paper's patch sizes differ by a factor of 2)."""
    basis = torch.eye(src * src, dtype=torch.float64).reshape(src * src, 1, src, src)
    if dst < src:
        out = F.interpolate(basis, size=(dst, dst), mode="area")
    else:
        out = F.interpolate(basis, size=(dst, dst), mode="bilinear", align_corners=False, antialias=False)
    return out.reshape(src * src, dst * dst).T.contiguous()


@lru_cache(maxsize=32)
def pi_resize_matrix(src: int, dst: int) -> torch.Tensor:
    """``pinv(B^T)`` (dst^2, src^2), float64 on the CPU, with ``B = resize_matrix(src, dst)``: PI-resize as a
    matrix on row-major flattened patches. Callers move it to their weights' device and dtype."""
    return torch.linalg.pinv(resize_matrix(src, dst).T)


def pi_resize(w: torch.Tensor, dst: int) -> torch.Tensor:
    """PI-resize (FlexiViT Eq. 3) of patch weights ``w`` (..., src, src) to (..., dst, dst):
    ``pinv(B^T) w`` with ``B = resize_matrix(src, dst)``; ``<x, w> == <B x, pi_resize(w)>`` for every
    ``x`` when ``dst >= src``. Computed in float64, returned in ``w``'s dtype."""
    src = w.shape[-1]
    if w.shape[-2] != src:
        raise HastenError(f"patch weights must be square, got {tuple(w.shape[-2:])}")
    proj = pi_resize_matrix(src, dst).to(w.device)  # (dst^2, src^2)
    flat = w.reshape(-1, src * src).double()
    return (flat @ proj.T).reshape(*w.shape[:-2], dst, dst).to(w.dtype)


def _embedding_at_underlying_size(w0: torch.Tensor, big: int) -> torch.Tensor:
    """``B_{P->p0}^T w0``: patch-embedding weights (D, C, p0, p0) at the underlying size P, so that PI-resize
    back to ``p0`` gives ``w0`` again and a P-patch is embedded as its bilinear down-sampling is."""
    d, c, p0 = w0.shape[0], w0.shape[1], w0.shape[-1]
    w_big = w0.reshape(d * c, -1).double() @ resize_matrix(big, p0).to(w0.device)
    return w_big.reshape(d, c, big, big).to(w0.dtype)


def _embedding_at_size(weight: torch.Tensor, p: int) -> torch.Tensor:
    """PI-resize (:func:`pi_resize`'s matrix) of the underlying weights (D, C, P, P) to (D, C, p, p), in the
    weights' dtype and differentiable (the training path)."""
    d, c, big = weight.shape[0], weight.shape[1], weight.shape[-1]
    proj = pi_resize_matrix(big, p).to(weight.device, weight.dtype)  # (p^2, P^2)
    return (weight.reshape(d * c, -1) @ proj.T).reshape(d, c, p, p)


# --------------------------------------------------------------------------- the modules
class FlexPatchEmbed(nn.Module):
    """Wraps a diffusers ``PatchEmbed``: the original module at size ``p0``, PI-resized shared weights
    at any other size (see the module docstring)."""

    def __init__(self, orig: nn.Module, patch_sizes: Sequence[int], owner: Any):
        super().__init__()
        if getattr(orig, "layer_norm", False):
            raise HastenError("flexify: a PatchEmbed with layer_norm=True is not supported")
        self.orig = orig
        self.p0 = int(orig.patch_size)
        self.big = max(patch_sizes)
        self._owner = [owner]  # not a submodule: the transformer owns this module
        w0 = orig.proj.weight.detach()  # (D, C, p0, p0)
        self.weight = nn.Parameter(_embedding_at_underlying_size(w0, self.big))
        self.size_embed = nn.ParameterDict({str(p): nn.Parameter(w0.new_zeros(w0.shape[0])) for p in patch_sizes
                                            if p != self.p0})

    def weight_for(self, p: int) -> torch.Tensor:
        """The embedding weights (D, C, p, p) at size ``p``: PI-resize of the shared ones (kept
        differentiable while training; computed once per weights version at inference)."""
        return _cached(self, ("w", p), (self.weight,), lambda: _embedding_at_size(self.weight, p))

    def original_positions(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The pretrained positional embeddings for a (height, width) latent: (h0, w0, D)."""
        zeros = torch.zeros(1, self.orig.proj.in_channels, height, width, device=device, dtype=dtype)
        pos = self.orig(zeros)
        if self.orig.proj.bias is not None:
            pos = pos - self.orig.proj.bias
        return pos.reshape(height // self.p0, width // self.p0, -1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        p = self._owner[0].flex_mode
        if p == self.p0:
            return self.orig(latent)
        height, width = latent.shape[-2:]
        if height % p or width % p:
            raise HastenError(f"flexify: latent {height}x{width} is not divisible by patch size {p}")
        x = F.conv2d(latent, self.weight_for(p), self.orig.proj.bias, stride=p)
        x = x.flatten(2).transpose(1, 2)
        key = ("pos", p, height, width, latent.device, latent.dtype)
        pos = _cached(self, key, (), lambda: self._coarse_positions(p, height, width, latent.device, latent.dtype))
        return (x + pos + self.size_embed[str(p)]).to(latent.dtype)

    @torch.no_grad()
    def _coarse_positions(self, p: int, height: int, width: int, device: torch.device, dtype: torch.dtype
                          ) -> torch.Tensor:
        pos = self.original_positions(height, width, device, dtype)  # (h0, w0, D)
        k = p // self.p0
        return F.avg_pool2d(pos.permute(2, 0, 1)[None], k).flatten(2).transpose(1, 2)  # centres of the k x k cells


class FlexTokenEmbed(nn.Module):
    """Wraps the linear patch embedding of a model whose pipeline packs the patches into tokens (Flux's
    ``x_embedder``: ``C p0^2 -> D`` on tokens laid out ``(c, dy, dx)``, which is a ``p0 x p0`` convolution's
    weight flattened): the original at ``p0``, the shared PI-resized weights and a per-size embedding at
    other sizes, as ``FlexPatchEmbed``. There is no positional table: positions are the rotary ids, which
    the call hook of ``flexify`` rebuilds on the coarse grid."""

    def __init__(self, orig: nn.Linear, p0: int, patch_sizes: Sequence[int], owner: Any):
        super().__init__()
        d, width = orig.weight.shape
        if width % (p0 * p0):
            raise HastenError(f"flexify: input width {width} is not a multiple of patch size {p0}^2")
        self.orig, self.p0, self.big = orig, p0, max(patch_sizes)
        self._owner = [owner]
        w0 = orig.weight.detach().reshape(d, width // (p0 * p0), p0, p0)
        self.weight = nn.Parameter(_embedding_at_underlying_size(w0, self.big))
        self.size_embed = nn.ParameterDict({str(p): nn.Parameter(w0.new_zeros(d)) for p in patch_sizes if p != p0})

    def weight_for(self, p: int) -> torch.Tensor:
        """The embedding weights (D, C p^2) at size ``p`` (cached at inference, as ``FlexPatchEmbed``)."""
        return _cached(self, ("w", p), (self.weight,),
                       lambda: _embedding_at_size(self.weight, p).reshape(self.weight.shape[0], -1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self._owner[0].flex_mode
        if p == self.p0:
            return self.orig(tokens)
        return F.linear(tokens, self.weight_for(p), self.orig.bias) + self.size_embed[str(p)]


class FlexOutput(nn.Module):
    """Wraps the de-embedding linear (D -> p0^2 C): the original at ``p0``, PI-resized shared weights
    (transposed construction) and a per-size output scale/shift at other sizes."""

    def __init__(self, orig: nn.Linear, p0: int, patch_sizes: Sequence[int], owner: Any,
                 channels_first: bool = False):
        super().__init__()
        self.orig, self.p0, self.big = orig, p0, max(patch_sizes)
        self._owner = [owner]
        self.channels_first = channels_first  # rows ordered (c, p, q) (Flux's packing), else (p, q, c)
        out = orig.out_features
        if out % (p0 * p0):
            raise HastenError(f"flexify: output width {out} is not a multiple of patch size {p0}^2")
        self.c = out // (p0 * p0)
        w = orig.weight.detach()
        up = resize_matrix(p0, self.big).to(w.device)  # (P^2, p0^2)
        w = w.reshape(self.c, p0 * p0, -1).transpose(0, 1) if channels_first else w.reshape(p0 * p0, self.c, -1)
        self.weight = nn.Parameter(torch.einsum("ij,jcd->icd", up, w.double()).to(w.dtype))  # (P^2, C, D)
        b = None if orig.bias is None else orig.bias.detach()
        if b is not None:
            b = b.reshape(self.c, p0 * p0).T if channels_first else b.reshape(p0 * p0, self.c)
        self.bias = None if b is None else nn.Parameter((up @ b.double()).to(b.dtype))
        d = orig.in_features
        self.norm_scale = nn.ParameterDict({str(p): nn.Parameter(w.new_ones(d)) for p in patch_sizes if p != p0})
        self.norm_shift = nn.ParameterDict({str(p): nn.Parameter(w.new_zeros(d)) for p in patch_sizes if p != p0})

    def weight_for(self, p: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        return _cached(self, ("w", p), params, lambda: self._weight_for(p))

    def _weight_for(self, p: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        back = torch.linalg.pinv(resize_matrix(p, self.big)).to(self.weight.device, self.weight.dtype)  # (p^2, P^2)
        w = torch.einsum("ij,jcd->icd", back, self.weight)  # (p^2, C, D)
        b = None if self.bias is None else back @ self.bias  # (p^2, C)
        if self.channels_first:
            w, b = w.transpose(0, 1), None if b is None else b.T
        return w.reshape(p * p * self.c, -1), None if b is None else b.reshape(-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        p = self._owner[0].flex_mode
        if p == self.p0:
            return self.orig(h)
        h = h * self.norm_scale[str(p)] + self.norm_shift[str(p)]
        w, b = self.weight_for(p)
        return F.linear(h, w, b)


def _cached(module: nn.Module, key: tuple, params: tuple, make: Callable[[], Any]) -> Any:
    """``make()`` memoised on ``module`` while gradients are off (inference), keyed by ``key`` and the
    in-place versions of ``params`` (so an optimiser step invalidates it); recomputed while training."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return make()
    cache = module.__dict__.setdefault("_flex_cache", {})
    stamp = tuple(p._version for p in params) + tuple(p.data_ptr() for p in params)
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        with torch.no_grad():
            hit = cache[key] = (stamp, make())
    return hit[1]


# --------------------------------------------------------------------------- flexify
_OUTPUTS = ("proj_out_2", "proj_out")  # DiT's de-embedding is proj_out_2 (proj_out_1 is its adaLN)


def flexify(transformer: nn.Module, patch_sizes: Sequence[int] = (2, 4)) -> nn.Module:
    """Make ``transformer`` (in place) runnable at every patch size in ``patch_sizes`` (multiples of its
    own); returns it. ``transformer.flex_mode`` selects the size; its own size is the default and is
    the pretrained model bitwise."""
    from diffusers.models.embeddings import PatchEmbed

    if getattr(transformer, "flex_patch_sizes", None) is not None:
        raise HastenError("this transformer is already flexified")
    if isinstance_by_name(transformer, "FluxTransformer2DModel"):
        return _flexify_packed(transformer, patch_sizes)
    embed = getattr(transformer, "pos_embed", None)
    if not isinstance(embed, PatchEmbed):
        raise HastenError(f"flexify needs a transformer with a diffusers PatchEmbed as pos_embed; "
                          f"{type(transformer).__name__} has {type(embed).__name__}")
    name = next((n for n in _OUTPUTS if isinstance(getattr(transformer, n, None), nn.Linear)), None)
    if name is None:
        raise HastenError(f"flexify: no linear de-embedding ({' or '.join(_OUTPUTS)}) on {type(transformer).__name__}")
    p0 = int(embed.patch_size)
    sizes = _flex_sizes(transformer, p0, patch_sizes)
    transformer.pos_embed = FlexPatchEmbed(embed, sizes, transformer)
    setattr(transformer, name, FlexOutput(getattr(transformer, name), p0, sizes, transformer))
    return transformer


def _flex_sizes(transformer: nn.Module, p0: int, patch_sizes: Sequence[int]) -> list[int]:
    """Check the sizes (multiples of ``p0``, at least one coarse) and mark ``transformer`` as flexified."""
    sizes = sorted({int(p) for p in patch_sizes} | {p0})
    bad = [p for p in sizes if p % p0 or p < p0]
    if bad:
        raise HastenError(f"patch sizes must be multiples of the model's own ({p0}), got {bad[0]}")
    if len(sizes) < 2:
        raise HastenError(f"flexify needs at least one patch size besides the model's own ({p0})")
    object.__setattr__(transformer, "flex_mode", p0)
    transformer.flex_patch_sizes = tuple(sizes)
    transformer.flex_base_patch_size = p0
    return sizes


PACKED_PATCH = 2  # Flux pipelines pack 2 x 2 latent pixels into each token (the transformer's patch_size is 1)


def _flexify_packed(transformer: nn.Module, patch_sizes: Sequence[int]) -> nn.Module:
    """``flexify`` for Flux-style models, whose pipeline packs ``2 x 2`` latent patches into tokens and sends
    rotary position ids (``img_ids``) instead of the model adding a positional table. Patch sizes are in
    latent pixels, as for the other models (the original is 2). At a coarse size ``p = k 2`` a call hook,
    innermost on the transformer, repacks the pipeline's tokens into ``p x p`` patches and rebuilds the
    image ids on the coarse grid at each patch's centre in fine-token units, ``(k i + (k - 1) / 2,
    k j + (k - 1) / 2)``, so that the rotary phases keep meaning the same image positions (the analogue
    of the averaged sin-cos table of ``FlexPatchEmbed``); the output is unpacked back to the pipeline's
    ``2 x 2`` tokens, so the pipeline and its scheduler see the usual shapes. The embedding and
    de-embedding are the PI-resized shared weights (``FlexTokenEmbed``, ``FlexOutput`` in Flux's
    channel-first layout). Only one plain image grid is supported at coarse sizes (not Kontext's extra
    reference-image tokens: other ids are a clear error), and no ControlNet residuals (they are sized for
    the fine tokens)."""
    from ..hooks import _BlockHook, register_hook

    if int(transformer.config.patch_size) != 1:
        raise HastenError("flexify: a Flux transformer with patch_size != 1 is not supported")
    p0 = PACKED_PATCH
    sizes = _flex_sizes(transformer, p0, patch_sizes)
    transformer.flex_packed = True
    transformer.x_embedder = FlexTokenEmbed(transformer.x_embedder, p0, sizes, transformer)
    transformer.proj_out = FlexOutput(transformer.proj_out, p0, sizes, transformer, channels_first=True)

    def call(inner: Callable, *args: Any, **kwargs: Any) -> Any:
        p = transformer.flex_mode
        if p == p0:
            return inner(*args, **kwargs)
        ids = kwargs.get("img_ids")
        if ids is None:
            raise HastenError("flexify: a Flux call at a coarse patch size needs img_ids= as a keyword")
        if any(kwargs.get(k) is not None for k in ("controlnet_block_samples", "controlnet_single_block_samples")):
            raise HastenError("flexify: ControlNet residuals are sized for the fine tokens; run such calls at "
                              "the model's own patch size")
        args = list(args)
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rows, cols = packed_grid(ids, hs.shape[1])
        k = p // p0
        if rows % k or cols % k:
            raise HastenError(f"flexify: latent {rows * p0}x{cols * p0} is not divisible by patch size {p}")
        coarse = pack_latent(unpack_tokens(hs, p0, rows, cols), p)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = coarse
        else:
            args[0] = coarse
        kwargs["img_ids"] = coarse_ids(ids, k, rows, cols)
        sample, rebuild = unwrap_output(inner(*args, **kwargs))
        return rebuild(pack_latent(unpack_tokens(sample, p, rows // k, cols // k), p0))

    register_hook(transformer, _BlockHook(call), "flexify")
    return transformer


def pack_latent(latent: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p^2), each token laid out ``(c, dy, dx)`` (Flux's ``_pack_latents``)."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_tokens(tokens: torch.Tensor, p: int, rows: int, cols: int) -> torch.Tensor:
    """The inverse of ``pack_latent`` for a ``rows x cols`` grid of tokens: (B, C, rows p, cols p)."""
    b, _, width = tokens.shape
    c = width // (p * p)
    x = tokens.reshape(b, rows, cols, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, rows * p, cols * p)


def packed_grid(img_ids: torch.Tensor, tokens: int) -> tuple[int, int]:
    """(rows, cols) of the token grid that Flux's ``img_ids`` (N, 3) describe; a clear error unless they
    are one plain row-major grid (``_prepare_latent_image_ids``) of ``tokens`` tokens."""
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    if rows * cols != tokens or ids.shape[0] != tokens or not torch.equal(ids[:, 1:].cpu().to(grid.dtype), grid):
        raise HastenError("flexify: at a coarse patch size the image ids must be one plain latent grid "
                          "(Flux's _prepare_latent_image_ids); these are not")
    return rows, cols


def coarse_ids(img_ids: torch.Tensor, k: int, rows: int, cols: int) -> torch.Tensor:
    """Image ids of the ``(rows / k) x (cols / k)`` coarse grid: each patch at the centre of the ``k x k``
    fine tokens it covers, ``k i + (k - 1) / 2``, in fine-token units (the first id column is kept)."""
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    dtype = ids.dtype if ids.is_floating_point() else torch.float32
    i = torch.arange(rows // k, device=ids.device, dtype=dtype) * k + (k - 1) / 2
    j = torch.arange(cols // k, device=ids.device, dtype=dtype) * k + (k - 1) / 2
    out = torch.empty(rows // k, cols // k, 3, device=ids.device, dtype=dtype)
    out[..., 0], out[..., 1], out[..., 2] = ids[0, 0], i[:, None], j[None, :]
    out = out.reshape(-1, 3)
    return out.expand(img_ids.shape[0], -1, -1) if img_ids.dim() == 3 else out


@contextmanager
def patch_size(transformer: nn.Module, p: int):
    """Run ``transformer`` at patch size ``p`` inside the block: the flex modules read ``flex_mode``,
    and the model's own unpatchify reads its ``patch_size`` (config or attribute), set for the call."""
    sizes = getattr(transformer, "flex_patch_sizes", None)
    if sizes is None:
        raise HastenError("call hasten.flexify(transformer) first")
    if p not in sizes:
        raise HastenError(f"patch size {p} is not one of this model's {list(sizes)}")
    old_mode = transformer.flex_mode
    cfg = getattr(transformer, "_internal_dict", None)
    packed = getattr(transformer, "flex_packed", False)  # Flux: the call hook repacks; its config keeps 1
    old_cfg = None if cfg is None or packed else cfg.get("patch_size")
    old_attr = transformer.__dict__.get("patch_size")
    lora = (getattr(transformer, "flex_lora", None) or {}).get(p)  # the LoRA variant's adapters for size p
    layers: list[nn.Module] = []
    adapters: list[nn.Parameter] = []
    trainable: list[bool] = []
    try:  # everything set below is restored in ``finally``, even when setting it fails half-way
        transformer.flex_mode = p
        if old_cfg is not None:
            transformer._internal_dict = type(cfg)({**cfg, "patch_size": p})
        if "patch_size" in transformer.__dict__:
            transformer.patch_size = p
        if lora is not None:
            # peft's disable_adapters() also sets requires_grad=False on the adapters, which would drop the
            # gradient of a loss computed here and back-propagated after the block: keep the caller's flags
            found = _lora_found(transformer)
            layers, adapters = found["layers"], found["params"]
            trainable = [q.requires_grad for q in adapters]
            for layer in layers:  # what diffusers' set_adapter() and enable_adapters() do, on the cached layers
                if layer.active_adapters != [lora]:
                    layer.set_adapter(lora)
                layer.enable_adapters(True)
        yield transformer
    finally:
        for layer in layers:
            layer.enable_adapters(False)
        for q, flag in zip(adapters, trainable, strict=False):
            q.requires_grad_(flag)
        transformer.flex_mode = old_mode
        if old_cfg is not None:
            transformer._internal_dict = cfg
        if old_attr is not None:
            transformer.patch_size = old_attr


def _lora_found(transformer: nn.Module) -> dict:
    """The transformer's peft LoRA layers, their module names, the LoRA parameters and a cache of
    :func:`_lora_widths`, from one module walk per set of adapters (dropped when adapters are added): diffusers'
    model-level ``set_adapter``/``enable_adapters``/``disable_adapters`` walk every module on every call
    (4.0 ms against a 14 ms one-image call of ``shapes-flexi``, ``benchmarks/flexidit_shapes/switch``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(sorted(getattr(transformer, "peft_config", {}) or {}))
    hit = transformer.__dict__.get("_flex_lora_layers")
    if hit is None or hit["key"] != key:
        named = [(n, m) for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)]
        hit = transformer.__dict__["_flex_lora_layers"] = {
            "key": key, "names": [n for n, _ in named], "layers": [m for _, m in named],
            "params": [q for n, q in transformer.named_parameters() if "lora_" in n], "widths": {}}
    return hit


def flexi_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The parameters flexify added (shared embed/de-embed, size embeddings, output norms)."""
    out: list[nn.Parameter] = []
    for m in transformer.modules():
        if isinstance(m, (FlexPatchEmbed, FlexTokenEmbed, FlexOutput)):
            out += [p for n, p in m.named_parameters() if not n.startswith("orig.")]
    return out


# --------------------------------------------------------------------------- the inference scheduler
@dataclass
class FlexiDiT:
    """FlexiDiT's inference scheduler (Sec. 3.3): the first ``weak_steps`` denoiser calls of every run at
    the coarse patch size ``weak_patch`` (4x fewer tokens per doubling), the rest at the model's own.
    Weak first, powerful last: the paper finds the reverse order worse (Fig. 19). ``weak_steps=0`` is
    bitwise the unaccelerated run. The transformer must be flexified (``hasten.flexify``) and, for useful
    images, fine-tuned (``hasten flexify``).

    ``weak_guide_steps=G``: the paper's guidance variant (Sec. 3.4) on the G calls after the weak ones,
    for pipelines that batch [uncond; cond]: the conditional branch runs powerful and the guide runs
    weak, and when the two branches run at different sizes the paper's guide is the *conditional*
    prediction of the weak model, ``v(x, c; p_weak) + s (v(x, c; p_powerful) - v(x, c; p_weak))``: the
    call sends the conditional rows once at each size and returns the weak one in the unconditional rows,
    so the pipeline's own CFG formula gives exactly that. (The paper tunes a separate guidance scale for
    such steps; here the pipeline's scale applies.)"""

    weak_steps: int | None = None
    compute: float | None = None  # instead of weak_steps: the share of the full compute to spend
    weak_patch: int | None = None  # default: the largest flexified size
    weak_guide_steps: int = 0  # the paper's guidance variant: calls after the weak ones with a weak guide
    level = "call"

    def __post_init__(self) -> None:
        if (self.weak_steps is None) == (self.compute is None):
            raise HastenError("FlexiDiT needs exactly one of weak_steps=K or compute=SHARE")
        if self.weak_steps is not None and (not isinstance(self.weak_steps, int) or isinstance(self.weak_steps, bool)
                                            or self.weak_steps < 0):
            raise HastenError(f"FlexiDiT needs weak_steps >= 0 (an integer), got {self.weak_steps!r}")
        if self.compute is not None and not (0.0 < float(self.compute) <= 1.0):
            raise HastenError(f"FlexiDiT needs 0 < compute <= 1, got {self.compute!r}")
        if not isinstance(self.weak_guide_steps, int) or self.weak_guide_steps < 0:
            raise HastenError(f"FlexiDiT needs weak_guide_steps >= 0, got {self.weak_guide_steps!r}")

    def weak_calls(self, calls: int, ratio: float) -> int:
        """Weak calls in a run of ``calls``: ``weak_steps``, or for ``compute = c`` the fewest K with
        ``(K r + (calls - K)) / calls <= c`` where ``r`` is the weak/powerful FLOPs ratio of one call
        (the paper's compute share, Sec. 4: theoretical denoiser FLOPs); all calls weak when even that
        spends more than ``c``."""
        if self.weak_steps is not None:
            return min(self.weak_steps, calls)
        k = math.ceil(calls * (1.0 - float(self.compute)) / (1.0 - ratio) - 1e-9)
        return max(0, min(calls, k))


def install_flexidit(handle: Any, config: FlexiDiT) -> None:
    tr = handle.transformer
    sizes = getattr(tr, "flex_patch_sizes", None)
    if sizes is None:
        raise HastenError("FlexiDiT needs a flexified transformer: hasten.flexify(pipe.transformer) first")
    weak = max(sizes) if config.weak_patch is None else int(config.weak_patch)
    if weak not in sizes or weak == tr.flex_base_patch_size:
        coarse = [p for p in sizes if p != tr.flex_base_patch_size]
        raise HastenError(f"weak_patch {weak} is not one of the coarse sizes {coarse}")
    counts: dict[str, Any] = {"weak_calls": 0, "weak_guide_calls": 0, "powerful_calls": 0, "flops": 0,
                              "full_flops": 0}
    layout = None
    if config.weak_guide_steps:
        layout = _layout(handle, None)
        if layout.separate:
            raise HastenError("FlexiDiT's weak guide needs a pipeline that batches [uncond; cond] in one call")
    run = {"index": None, "weak": 0}

    def plan_run(hw: tuple[int, int] | None, hs: torch.Tensor, text: Any) -> None:
        """At a run's first call: how many calls of it run weak (``compute=``: from the run's step count,
        read from the pipeline's scheduler, and the FLOPs ratio of this latent and prompt length)."""
        run["index"] = handle.run_index
        ts = getattr(getattr(handle.pipeline, "scheduler", None), "timesteps", None)
        calls = 0 if ts is None else len(ts)
        if config.compute is not None and calls == 0:
            raise HastenError("FlexiDiT(compute=...) reads the step count from the pipeline's scheduler; "
                              "this pipeline has none: use weak_steps=K")
        ratio = _flops(hw, hs, text, weak)["total"] / _flops(hw, hs, text, None)["total"] if config.compute else 1.0
        run["weak"] = config.weak_calls(calls or config.weak_steps or 0, ratio)

    def _flops(hw: tuple[int, int] | None, hs: torch.Tensor, text: Any, p: int | None) -> dict:
        if hw is None:
            raise HastenError("FlexiDiT: cannot read the latent size of this call (Flux: pass img_ids=)")
        m = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.dim() == 3 else 0
        return transformer_flops(tr, hw[0], hw[1], p, text_tokens=m, batch=int(hs.shape[0]))

    def wrapper(inner: Callable, *args: Any, **kwargs: Any) -> Any:
        hs = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states")
        hw = latent_size(tr, hs, kwargs.get("img_ids"))
        if run["index"] != handle.run_index:
            plan_run(hw, hs, text)
            run["tokens"] = []
        try:
            full = _flops(hw, hs, text, None)["total"]
        except HastenError:
            full = None
        is_weak = handle.call_index < run["weak"]
        weak_guide = (not is_weak and handle.call_index < run["weak"] + config.weak_guide_steps
                      and layout is not None and is_guidance_call(layout, args, kwargs))
        if full is not None:
            counts["full_flops"] += full
            w = _flops(hw, hs, text, weak)["total"]
            counts["flops"] += w if is_weak else (full + w) / 2 if weak_guide else full
        counts["weak_calls" if is_weak else "weak_guide_calls" if weak_guide else "powerful_calls"] += 1
        if hw is not None:
            p = weak if is_weak else tr.flex_base_patch_size
            run["tokens"].append((hw[0] // p) * (hw[1] // p))
        if is_weak:
            with patch_size(tr, weak):
                return inner(*args, **kwargs)
        if weak_guide:
            n = int(hs.shape[0])
            uncond, cond = layout.halves(n // 2)
            sub_args, sub_kwargs = select_rows(args, cond, n), select_rows(kwargs, cond, n)
            out = inner(*sub_args, **sub_kwargs)
            powerful, rebuild = unwrap_output(out)
            with patch_size(tr, weak):
                guide = unwrap_output(inner(*sub_args, **sub_kwargs))[0]
            both = powerful.new_empty((n, *powerful.shape[1:]))
            both[cond.to(both.device)], both[uncond.to(both.device)] = powerful, guide
            return rebuild(both)
        return inner(*args, **kwargs)

    def report() -> dict:
        share = counts["flops"] / counts["full_flops"] if counts["full_flops"] else None
        return {"weak_patch": weak, "weak_steps": config.weak_steps, "compute": config.compute,
                "weak_calls": counts["weak_calls"], "weak_guide_calls": counts["weak_guide_calls"],
                "powerful_calls": counts["powerful_calls"],
                "transformer_flops": counts["flops"], "compute_share": None if share is None else round(share, 4),
                "image_tokens_per_call": list(run.get("tokens", []))}  # of the last run (the conditional branch)

    handle.wrap_call(wrapper, "flexidit")
    handle.add_report("flexidit", report)


def latent_size(transformer: nn.Module, hidden_states: torch.Tensor, img_ids: torch.Tensor | None = None
                ) -> tuple[int, int] | None:
    """(height, width) in latent pixels of a call: the last two dims of ``hidden_states``, or for a
    packed (Flux) model the token grid of ``img_ids`` times the packing; ``None`` when it cannot be read."""
    if not getattr(transformer, "flex_packed", False):
        return int(hidden_states.shape[-2]), int(hidden_states.shape[-1])
    if img_ids is None:
        return None
    try:
        rows, cols = packed_grid(img_ids, hidden_states.shape[1])
    except HastenError:
        return None
    return rows * PACKED_PATCH, cols * PACKED_PATCH


def _register() -> None:
    from . import MethodInfo, register

    register(MethodInfo("flexidit", FlexiDiT, install_flexidit, level="call"))


_register()


# --------------------------------------------------------------------------- FLOPs
def transformer_flops(transformer: nn.Module, height: int, width: int, patch: int | None = None,
                      text_tokens: int = 0, batch: int = 1) -> dict:
    """Analytic forward FLOPs (multiply and add counted separately, as ``torch.utils.flop_counter``) of
    one transformer call on a ``height x width`` latent at patch size ``patch`` (default: the model's).

    With D the width, N = (height / patch)(width / patch) image tokens, M text tokens, C / C_out the
    latent channels, ff the feed-forward multiplier (4):

    - ``SD3Transformer2DModel`` (joint blocks): per block ``24 (N + M) D^2`` for the projections and
      feed-forwards of both streams, ``24 D^2`` for the two adaLN projections (D -> 6D each), and ``4 (N + M)^2 D`` for
      attention (QK^T and AV); the last block (``context_pre_only``) drops the text stream's output
      projection and feed-forward (``-18 M D^2``) and its adaLN is ``4 D^2``. Outside the blocks: the patch
      embedding ``2 N D C p^2``, the caption projection ``2 M J D``, the time and pooled-text embedders
      ``2 (256 D + P D + 2 D^2)``, the output norm ``4 D^2`` and de-embedding ``2 N D p^2 C_out``.
    - ``DiTTransformer2DModel``: per block ``24 N D^2 + 4 N^2 D`` and its adaLN-Zero with the timestep
      and class embedding ``2 (256 D + D^2) + 12 D^2``; outside: patch embedding, the output adaLN
      ``2 (256 D + D^2) + 4 D^2`` and de-embedding.
    - ``FluxTransformer2DModel`` (the pipeline packs ``2 x 2`` latent pixels per token: C is the latent's
      channels, ``in_channels / 4``): each double-stream block as an SD3 joint block with both streams in
      full, ``24 (N + M) D^2 + 24 D^2 + 4 (N + M)^2 D``; each single-stream block on the ``L = N + M``
      concatenated tokens: QKV ``6 L D^2``, MLP in ``8 L D^2``, the fused output projection (5D -> D)
      ``10 L D^2``, its adaLN (D -> 3D) ``6 D^2`` and attention ``4 L^2 D``; outside: patch embedding, the
      text embedding ``2 M J D``, the time, pooled-text (and guidance) embedders ``2 (256 D + D^2)``,
      ``2 (P D + D^2)`` (and ``2 (256 D + D^2)``), the output norm ``4 D^2`` and de-embedding.

    At a coarse size with a LoRA (the LoRA variant), the adapters' FLOPs are added (:func:`lora_flops`).
    Returns ``{"total", "attention", "linear"}`` for the batch. Checked against the flop counter in the
    tests (attention counted there with PyTorch's math kernel)."""
    cfg = transformer.config
    flux = isinstance_by_name(transformer, "FluxTransformer2DModel")
    p0 = PACKED_PATCH if flux else cfg.patch_size
    p = int(patch or getattr(transformer, "flex_base_patch_size", None) or p0)
    n = (height // p) * (width // p)
    d = cfg.num_attention_heads * cfg.attention_head_dim
    c, c_out = cfg.in_channels, cfg.out_channels or cfg.in_channels
    if flux:
        c, c_out = c // (p0 * p0), c_out // (p0 * p0)
    name = type(transformer).__name__
    embed, head = 2 * n * d * c * p * p, 2 * n * d * p * p * c_out
    if flux:
        m, L = int(text_tokens), n + int(text_tokens)
        double, single = cfg.num_layers, cfg.num_single_layers
        attn = (double + single) * 4 * L * L * d
        blocks = double * (24 * L * d * d + 24 * d * d) + single * (24 * L * d * d + 6 * d * d)
        embedders = 2 * (256 * d + d * d) + 2 * (cfg.pooled_projection_dim * d + d * d)
        if cfg.guidance_embeds:
            embedders += 2 * (256 * d + d * d)
        outside = embed + 2 * m * cfg.joint_attention_dim * d + embedders + 4 * d * d + head
    elif isinstance_by_name(transformer, "SD3Transformer2DModel"):
        if cfg.get("dual_attention_layers"):
            raise HastenError("transformer_flops: SD3.5 dual-attention layers are not counted")
        m, layers = int(text_tokens), cfg.num_layers
        attn = layers * 4 * (n + m) ** 2 * d
        blocks = layers * (24 * (n + m) * d * d + 24 * d * d) - (18 * m * d * d + 8 * d * d)
        outside = (embed + 2 * m * cfg.joint_attention_dim * d + 2 * (256 * d + cfg.pooled_projection_dim * d
                   + 2 * d * d) + 4 * d * d + head)
    elif isinstance_by_name(transformer, "DiTTransformer2DModel"):
        layers = cfg.num_layers
        attn = layers * 4 * n * n * d
        blocks = layers * (24 * n * d * d + 2 * (256 * d + d * d) + 12 * d * d)
        outside = embed + 2 * (256 * d + d * d) + 4 * d * d + head
    else:
        raise HastenError(f"transformer_flops knows SD3Transformer2DModel, DiTTransformer2DModel and "
                          f"FluxTransformer2DModel, not {name}")
    linear = blocks + outside + lora_flops(transformer, p, n, int(text_tokens))
    return {"total": batch * (linear + attn), "attention": batch * attn, "linear": batch * linear}


_TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context")


def lora_flops(transformer: nn.Module, patch: int, image_tokens: int, text_tokens: int) -> int:
    """FLOPs of the LoRA adapters active at ``patch`` (the LoRA variant's coarse sizes; 0 elsewhere), run
    unmerged beside their base layers: ``2 T r (in + out)`` per adapted linear layer of rank r, with T the
    text tokens for the text stream's layers (MMDiT) and the image tokens otherwise."""
    name = (getattr(transformer, "flex_lora", None) or {}).get(patch)
    if name is None:
        return 0
    image, text = _lora_widths(transformer, name)
    return 2 * (image_tokens * image + text_tokens * text)


def _lora_widths(transformer: nn.Module, name: str) -> tuple[int, int]:
    """``sum r (in + out)`` over adapter ``name``'s layers on the image stream and on the text stream, found once
    per set of adapters (:func:`lora_flops` runs on every call of a FlexiDiT run: no module walk there)."""
    found = _lora_found(transformer)
    if name not in found["widths"]:
        widths = [0, 0]
        for module_name, layer in zip(found["names"], found["layers"], strict=True):
            if name in getattr(layer, "r", {}):
                widths[any(s in module_name for s in _TEXT_STREAM)] += layer.r[name] * (layer.in_features +
                                                                                         layer.out_features)
        found["widths"][name] = (widths[0], widths[1])
    return found["widths"][name]


def isinstance_by_name(obj: Any, cls_name: str) -> bool:
    return any(c.__name__ == cls_name for c in type(obj).__mro__)
