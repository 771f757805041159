"""torch.compile under hasten's hooks (``handle.compile()``, regional: each block's own computation): the same
images as eager within float tolerance, one graph per block computation with no graph break, and no
recompilation from step to step or run to run."""

from __future__ import annotations

import pytest
import torch

import hasten
from hasten.testing import tiny_dit_pipe

STEPS = 6
LABELS = list(range(10))


@pytest.fixture(scope="module")
def pipe():
    return tiny_dit_pipe(layers=3)


def sample(pipe, seed=0):
    return pipe(LABELS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_blocks_match_eager_without_graph_breaks_or_recompiles(pipe, backend):
    torch._dynamo.reset()
    plain = sample(pipe)
    plan = hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), steps=STEPS, seeds=(1, 2))
    methods = (hasten.BlockCache(plan=plan), hasten.AdaptiveGuidance(threshold=0.999))
    with hasten.accelerate(pipe, *methods) as h:
        eager = sample(pipe)
        eager_rep = h.report(log=False)
    with hasten.accelerate(pipe, *methods) as h:
        h.compile(backend=backend)
        compiled = sample(pipe)
        frames = dict(torch._dynamo.utils.counters["frames"])
        again = sample(pipe, seed=1)
        rep = h.report(log=False)
        assert dict(torch._dynamo.utils.counters["frames"]) == frames  # nothing compiled again in run 2
        # the hot path: one block's computation is one graph, no break
        blk = pipe.transformer.transformer_blocks[0]
        inner = blk._diffusers_hook.hooks["hasten.0"].fn_ref.original_forward
        x = torch.randn(20, 16, 32)
        kwargs = {"timestep": torch.full((20,), 500.0), "class_labels": torch.zeros(20, dtype=torch.long)}
        explained = torch._dynamo.explain(inner._torchdynamo_orig_callable)(x, **kwargs)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=0)  # stated tolerance: 1e-4 on [0, 1] images
    assert rep["methods"]["block-cache"]["reused"] == [2 * r for r in eager_rep["methods"]["block-cache"]["reused"]]
    assert torch.isfinite(again).all()
    assert "_diffusers_hook" not in pipe.transformer.transformer_blocks[0].__dict__  # disable() removed it all
    assert torch.equal(sample(pipe), plain)  # and the model computes exactly as before
