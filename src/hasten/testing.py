"""Helpers for hasten's own tests (and users' tests of scripts built on hasten)."""

from __future__ import annotations

import sys

TINY_PROMPTS = ["a red circle", "two blue squares to the left of a green triangle"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``hasten ARGS`` in-process through the real entry point; returns (exit code, stdout, stderr).

    ``capsys`` is pytest's fixture; the console entry point is used so that the one-line error and
    exit-code-2 path is the one users get.
    """
    from .cli import main

    old = sys.argv
    sys.argv = ["hasten", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def tiny_dit_pipe(layers: int = 2, head_dim: int = 16, guidance_scale: float = 3.0, seed: int = 0,
                  dtype=None, device: str = "cpu", **config):
    """A class-conditional ``HastenPipeline`` over a tiny random ``DiTTransformer2DModel`` (8x8x1 images,
    16 tokens, 10 classes): the model most of hasten's tests run on. ``config`` overrides the DiT config."""
    import torch
    from diffusers import DiTTransformer2DModel

    from .pipeline import HastenPipeline

    torch.manual_seed(seed)
    cfg = dict(num_attention_heads=2, attention_head_dim=head_dim, in_channels=1, out_channels=1, num_layers=layers,
               sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    cfg.update(config)
    tr = DiTTransformer2DModel(**cfg).to(device, dtype)
    return HastenPipeline(tr, guidance_scale=guidance_scale)


def tiny_shapes_pipeline(seed: int = 0):
    """A ``ShapesPipeline`` with a 2-block random transformer and a small random VAE (the real MiniLM
    text encoder): the text-to-image stack at test size."""
    import torch
    from diffusers import AutoencoderKL

    from .pipelines.shapes import ShapesPipeline, ShapesTransformer2DModel, default_scheduler, load_text_encoder
    from .train_shapes import transformer_config, vae_config

    torch.manual_seed(seed)
    te, tok = load_text_encoder()
    tr = ShapesTransformer2DModel(**transformer_config(num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                                       caption_projection_dim=32)).eval()
    vae = AutoencoderKL(**vae_config(block_out_channels=[8, 8, 8], norm_num_groups=4)).eval()
    pipe = ShapesPipeline(transformer=tr, vae=vae, scheduler=default_scheduler(), text_encoder=te, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def teacher_euler(pipe, noise, text, pooled, sigmas):
    """The conditional branch of ``pipe``'s transformer, one Euler step per interval of ``sigmas`` (float32,
    as the scheduler steps): what a fresh distilled student must reproduce."""
    import torch

    s = torch.tensor(sigmas, dtype=torch.float32)
    x = noise.clone()
    with torch.no_grad():
        for d in range(len(sigmas) - 1):
            v = pipe.transformer(hidden_states=x, timestep=(s[d] * 1000).expand(x.shape[0]),
                                 encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)[0]
            x = x + (s[d + 1] - s[d]) * v
    return x
