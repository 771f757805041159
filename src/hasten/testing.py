"""Helpers for hasten's own tests (and users' tests of scripts built on hasten)."""

from __future__ import annotations

import sys


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
