"""Shared test set-up: one thread per test process (the suite is timed on 2 cores), and the tiny models."""

from __future__ import annotations

import pytest
import torch

from hasten.testing import tiny_dit_pipe

torch.set_num_threads(1)


@pytest.fixture
def make_tiny_pipe():
    """``make_tiny_pipe(layers=2, head_dim=16, guidance_scale=3.0, seed=0, ...)``: a fresh tiny DiT pipeline."""
    return tiny_dit_pipe
