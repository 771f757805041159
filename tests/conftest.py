"""Shared test set-up: one thread per test process (the suite is timed on 2 cores), and the tiny models."""

from __future__ import annotations

import pytest
import torch

from hasten.testing import TINY_PROMPTS, tiny_dit_pipe, tiny_shapes_pipeline

torch.set_num_threads(1)


@pytest.fixture
def make_tiny_pipe():
    """``make_tiny_pipe(layers=2, head_dim=16, guidance_scale=3.0, seed=0, ...)``: a fresh tiny DiT pipeline."""
    return tiny_dit_pipe


@pytest.fixture(scope="module")
def tiny_shapes():
    """A tiny random ``ShapesPipeline`` (:func:`hasten.testing.tiny_shapes_pipeline`), one per test module."""
    return tiny_shapes_pipeline()


@pytest.fixture(scope="module")
def tiny_cond(tiny_shapes):
    """(noise, text tokens, pooled text) for ``TINY_PROMPTS`` on ``tiny_shapes``, noise seed 0."""
    noise = torch.randn(2, *tiny_shapes.latent_shape, generator=torch.Generator().manual_seed(0))
    text, pooled = tiny_shapes.encode_prompt(TINY_PROMPTS, torch.float32)
    return noise, text, pooled
