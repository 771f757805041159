"""Tiny random-weight diffusers pipelines, one per model family hasten supports, for tests and the family
benchmark (``benchmarks/families.py``). Nothing is downloaded: every transformer is built from a small
config with random weights, text encoders and tokenizers are left out (prompt embeddings, pooled
embeddings and attention masks are passed directly), and a VAE is built (tiny) only where the pipeline
cannot return latents without one (DiT always decodes).

``BUILDERS[family]()`` returns ``(pipe, run)``: ``run(seed)`` samples ``STEPS`` steps with classifier-free
guidance on (scale 4.5; ``true_cfg_scale`` 4 where the pipeline sends the branches as separate calls)
for ``B`` samples, the noise drawn from ``seed`` (the prompt embeddings are fixed per pipeline), and
returns the final latents. ``SEPARATE`` names the families whose pipeline calls the transformer once per
guidance branch (inside diffusers' ``cache_context("cond")`` / ``("uncond")``); the others batch the
branches in one call. ``PIPELINES`` gives each family's pipeline class name.

    pipe, run = BUILDERS["wan"]()
    ref = run(0)
    with hasten.accelerate(pipe, hasten.BlockCache(schedule=...)) as h:
        out = run(0)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

STEPS = 4  # denoising steps of every run
B = 2  # samples per run
GUIDANCE = 4.5  # guidance scale of pipelines that batch the guidance branches
TRUE_CFG = 4.0  # true_cfg_scale of pipelines that send them as separate calls
L = 5  # prompt tokens

Run = Callable[[int], torch.Tensor]
Builder = Callable[[], tuple[Any, Run]]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _embeds(dim: int = 16, pooled: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed prompt embeddings: conditional and negative, pooled ones if asked, all-ones masks."""
    g = _gen(seed)
    out = {"pe": torch.randn(B, L, dim, generator=g), "ne": torch.randn(B, L, dim, generator=g),
           "mask": torch.ones(B, L, dtype=torch.long)}
    if pooled is not None:
        out["pp"] = torch.randn(B, pooled, generator=g)
        out["np"] = torch.randn(B, pooled, generator=g)
    return out


def _ready(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.eval()
    return pipe


def _masked_prompt_run(pipe: Any, e: dict[str, torch.Tensor], size: int) -> Run:
    """``run(seed)`` for pipelines taking prompt embeddings with attention masks (PixArt, Sana): batched CFG
    with the negative embeddings, ``size`` x ``size`` pixels, no resolution binning, latents out."""

    def run(seed: int) -> torch.Tensor:
        return pipe(negative_prompt=None, prompt_embeds=e["pe"], prompt_attention_mask=e["mask"],
                    negative_prompt_embeds=e["ne"], negative_prompt_attention_mask=e["mask"], height=size,
                    width=size, use_resolution_binning=False, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    output_type="latent", generator=_gen(seed)).images

    return run


def build_dit() -> tuple[Any, Run]:
    """DiTPipeline: class labels, rows [cond; uncond] in one call, learned sigma, DDIM. The pipeline always
    decodes, so a tiny VAE (scaling factor 1) is built and the final latents are read at its input."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                               norm_type="ada_norm_zero")
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=8, scaling_factor=1.0).eval()
    pipe = _ready(DiTPipeline(tr, vae, DDIMScheduler()))
    seen: list[torch.Tensor] = []
    # latents / 1.0 is bitwise the latents: post_quant_conv's input is the pipeline's final latents
    vae.post_quant_conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))

    def run(seed: int) -> torch.Tensor:
        seen.clear()
        pipe(class_labels=[1, 2], num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=_gen(seed),
             output_type="pt")
        return seen[-1]

    return pipe, run


def build_pixart() -> tuple[Any, Run]:
    """PixArtSigmaPipeline: [uncond; cond] in one call, negative prompt embeddings, no VAE."""
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    tr = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                  num_attention_heads=2, caption_channels=16, in_channels=4, cross_attention_dim=16,
                                  out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                  num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                  norm_elementwise_affine=False, norm_eps=1e-6)
    pipe = _ready(PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                                      scheduler=DDIMScheduler()))
    e = _embeds()

    return pipe, _masked_prompt_run(pipe, e, 64)


def build_sd3() -> tuple[Any, Run]:
    """StableDiffusion3Pipeline: [uncond; cond] in one call, pooled embeddings, flow matching, no VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                               pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    pipe = _ready(StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                           text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                           text_encoder_3=None, tokenizer_3=None))
    e = _embeds(pooled=16)

    def run(seed: int) -> torch.Tensor:
        return pipe(prompt_embeds=e["pe"], negative_prompt_embeds=e["ne"], pooled_prompt_embeds=e["pp"],
                    negative_pooled_prompt_embeds=e["np"], height=64, width=64, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, output_type="latent", generator=_gen(seed)).images

    return pipe, run


def build_flux() -> tuple[Any, Run]:
    """FluxPipeline with true CFG (``true_cfg_scale`` > 1 and negative embeddings): separate branch calls."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                axes_dims_rope=(2, 2, 4))
    pipe = _ready(FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                               tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr))
    e = _embeds(pooled=16)

    def run(seed: int) -> torch.Tensor:
        return pipe(prompt_embeds=e["pe"], pooled_prompt_embeds=e["pp"], negative_prompt_embeds=e["ne"],
                    negative_pooled_prompt_embeds=e["np"], true_cfg_scale=TRUE_CFG, height=64, width=64,
                    num_inference_steps=STEPS, output_type="latent", generator=_gen(seed)).images

    return pipe, run


def build_cogvideox() -> tuple[Any, Run]:
    """CogVideoXPipeline: [uncond; cond] in one call (``cache_context("cond_uncond")``), no VAE."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    tr = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                     time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8,
                                     sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                     max_text_seq_length=L)
    pipe = _ready(CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                                    scheduler=CogVideoXDDIMScheduler()))
    e = _embeds()

    def run(seed: int) -> torch.Tensor:
        return pipe(prompt_embeds=e["pe"], negative_prompt_embeds=e["ne"], height=64, width=64, num_frames=9,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                    generator=_gen(seed)).frames

    return pipe, run


def build_wan() -> tuple[Any, Run]:
    """WanPipeline: the branches as separate calls, no VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                               out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    pipe = _ready(WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                              scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)))
    e = _embeds()

    def run(seed: int) -> torch.Tensor:
        return pipe(prompt_embeds=e["pe"], negative_prompt_embeds=e["ne"], height=64, width=64, num_frames=5,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                    generator=_gen(seed)).frames

    return pipe, run


def build_hunyuanvideo() -> tuple[Any, Run]:
    """HunyuanVideoPipeline with true CFG (``true_cfg_scale`` > 1 and negative embeddings): separate branch
    calls; a transformer without guidance embedding, no VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    tr = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                        patch_size_t=1, guidance_embeds=False, text_embed_dim=16,
                                        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
    pipe = _ready(HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=None,
                                       scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None,
                                       tokenizer_2=None))
    e = _embeds(pooled=8)

    def run(seed: int) -> torch.Tensor:
        return pipe(prompt_embeds=e["pe"], pooled_prompt_embeds=e["pp"], prompt_attention_mask=e["mask"],
                    negative_prompt_embeds=e["ne"], negative_pooled_prompt_embeds=e["np"],
                    negative_prompt_attention_mask=e["mask"], true_cfg_scale=TRUE_CFG, height=32, width=32,
                    num_frames=5, num_inference_steps=STEPS, output_type="latent", generator=_gen(seed)).frames

    return pipe, run


def build_ltx() -> tuple[Any, Run]:
    """LTXPipeline: [uncond; cond] in one call (``cache_context("cond_uncond")``), packed latents, no VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    tr = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                    num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=2,
                                    caption_channels=16)
    pipe = _ready(LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                              tokenizer=None, transformer=tr))
    e = _embeds()

    def run(seed: int) -> torch.Tensor:
        return pipe(prompt_embeds=e["pe"], prompt_attention_mask=e["mask"], negative_prompt_embeds=e["ne"],
                    negative_prompt_attention_mask=e["mask"], height=128, width=128, num_frames=9,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                    generator=_gen(seed)).frames

    return pipe, run


def build_mochi() -> tuple[Any, Run]:
    """MochiPipeline: [uncond; cond] in one call (``cache_context("cond_uncond")``), no VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(0)
    tr = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                 pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                 max_sequence_length=L)
    pipe = _ready(MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                tokenizer=None, transformer=tr))
    e = _embeds()

    def run(seed: int) -> torch.Tensor:
        return pipe(prompt_embeds=e["pe"], prompt_attention_mask=e["mask"], negative_prompt_embeds=e["ne"],
                    negative_prompt_attention_mask=e["mask"], height=32, width=32, num_frames=7,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                    generator=_gen(seed)).frames

    return pipe, run


def build_sana() -> tuple[Any, Run]:
    """SanaPipeline: [uncond; cond] in one call, no VAE (latents 8x8 at 256 px, the VAE-less scale 32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(0)
    tr = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1)
    pipe = _ready(SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                               scheduler=FlowMatchEulerDiscreteScheduler()))
    e = _embeds()

    return pipe, _masked_prompt_run(pipe, e, 256)


def build_qwenimage() -> tuple[Any, Run]:
    """QwenImagePipeline with true CFG: separate branch calls, packed latents, no VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(0)
    tr = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
    pipe = _ready(QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                    tokenizer=None, transformer=tr))
    e = _embeds()

    def run(seed: int) -> torch.Tensor:
        return pipe(prompt_embeds=e["pe"], prompt_embeds_mask=e["mask"], negative_prompt_embeds=e["ne"],
                    negative_prompt_embeds_mask=e["mask"], true_cfg_scale=TRUE_CFG, height=64, width=64,
                    num_inference_steps=STEPS, output_type="latent", generator=_gen(seed)).images

    return pipe, run


BUILDERS: dict[str, Builder] = {
    "dit": build_dit, "pixart": build_pixart, "sd3": build_sd3, "flux": build_flux, "cogvideox": build_cogvideox,
    "wan": build_wan, "hunyuanvideo": build_hunyuanvideo, "ltx": build_ltx, "mochi": build_mochi,
    "sana": build_sana, "qwenimage": build_qwenimage,
}
PIPELINES: dict[str, str] = {
    "dit": "DiTPipeline", "pixart": "PixArtSigmaPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
    "cogvideox": "CogVideoXPipeline", "wan": "WanPipeline", "hunyuanvideo": "HunyuanVideoPipeline",
    "ltx": "LTXPipeline", "mochi": "MochiPipeline", "sana": "SanaPipeline", "qwenimage": "QwenImagePipeline",
}
SEPARATE: frozenset[str] = frozenset({"flux", "wan", "hunyuanvideo", "qwenimage"})


@contextlib.contextmanager
def count_block_calls(transformer: torch.nn.Module, blocks: list | None = None) -> Iterator[list[int]]:
    """Count real forward calls of every block hasten discovers on ``transformer`` (or of the explicit
    ``blocks``, as ``hasten.accelerate(..., blocks=...)`` takes them).

    Enter it BEFORE ``hasten.accelerate`` and leave it after the handle is disabled: the counting forward
    sits under hasten's hooks, so a reused block (whose forward hasten does not call) is not counted.
    """
    from .adapters import discover_blocks

    blocks = discover_blocks(transformer, blocks)
    counts = [0] * len(blocks)
    for i, spec in enumerate(blocks):
        orig = spec.module.forward

        def counting(*a: Any, _i: int = i, _orig: Callable = orig, **k: Any) -> Any:
            counts[_i] += 1
            return _orig(*a, **k)

        spec.module.forward = counting
    try:
        yield counts
    finally:
        for spec in blocks:
            spec.module.__dict__.pop("forward", None)
