"""Adaptive Guidance composed with Block Caching: exactness, and per-row caches that never mix branches."""

from __future__ import annotations

import torch
from test_guidance import tiny_dit

from hasten.adapters import discover_blocks
from hasten.api import accelerate
from hasten.methods.block_cache import BlockCache
from hasten.methods.guidance import AdaptiveGuidance
from hasten.pipeline import HastenPipeline

torch.set_num_threads(1)

LABELS = [0, 3, 6, 9]
REUSE = [True, True, False, False, True, False, True, False, True, True]  # compute / reuse per call


def setup():
    pipe = HastenPipeline(tiny_dit(0), num_classes=10, guidance_scale=3.0)
    x0 = pipe.initial_noise(4, torch.Generator().manual_seed(0))
    return pipe, x0, len(discover_blocks(pipe.transformer))


def test_all_compute_cache_and_no_switch_is_bitwise_cfg():
    pipe, x0, nb = setup()
    ref = pipe(LABELS, num_inference_steps=10, latents=x0).images
    with accelerate(pipe, BlockCache(schedule=[[True] * 10] * nb), AdaptiveGuidance(threshold=1.5)) as h:
        out = pipe(LABELS, num_inference_steps=10, latents=x0).images
        assert h.report()["nfe"] == 20
    assert torch.equal(out, ref)


def test_ag_without_switch_adds_nothing_to_block_caching():
    pipe, x0, nb = setup()
    with accelerate(pipe, BlockCache(schedule=[REUSE] * nb)):
        ref = pipe(LABELS, num_inference_steps=10, latents=x0).images
    with accelerate(pipe, AdaptiveGuidance(threshold=1.5), BlockCache(schedule=[REUSE] * nb)):
        out = pipe(LABELS, num_inference_steps=10, latents=x0).images
    assert torch.equal(out, ref)


def test_switching_samples_keep_their_own_caches():
    """Samples switching at different calls in one batch, with blocks reused from cache: each sample
    must come out as when sampled alone (same methods). Rows of the shrunken batch index the per-row
    caches through ``handle.active_rows``; a mixed-up unconditional/conditional cache would differ."""
    pipe, x0, nb = setup()
    # gammas of this tiny model (labels 0, 3, 6, 9) cross 0.81 at calls 5, 0, never, never
    with accelerate(pipe, BlockCache(schedule=[REUSE] * nb), AdaptiveGuidance(threshold=0.81)) as h:
        out = pipe(LABELS, num_inference_steps=10, latents=x0).images
        rep = h.report()
    k = rep["methods"]["adaptive-guidance"]["guided_calls_per_sample"]
    assert len(set(k)) >= 3, k  # the samples really switch at different calls
    assert rep["methods"]["block-cache"]["reused"] == [4] * nb
    assert rep["rows_sent"] == sum(2 * ki + (10 - ki) for ki in k)
    for i in range(4):
        with accelerate(pipe, BlockCache(schedule=[REUSE] * nb), AdaptiveGuidance(threshold=0.81)) as h:
            alone = pipe(LABELS[i:i + 1], num_inference_steps=10, latents=x0[i:i + 1]).images
            assert h.report()["methods"]["adaptive-guidance"]["guided_calls_per_sample"] == [k[i]]
        assert torch.allclose(alone, out[i:i + 1], atol=1e-5, rtol=0)
