"""Device and dtype: hasten follows the model's. bfloat16 and float16 on the CPU; the meta device for what runs
without reading values; a CUDA run when a GPU is present (skipped otherwise)."""

from __future__ import annotations

import pytest
import torch

import hasten
from hasten.methods.guidance import NormalEquations
from hasten.testing import tiny_dit_pipe

STEPS = 6
LABELS = list(range(10))


def tiny_pipe(dtype=torch.float32, device="cpu") -> hasten.HastenPipeline:
    return tiny_dit_pipe(dtype=dtype, device=device)


def sample(pipe, seed=0):
    return pipe(LABELS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_the_cpu(dtype):
    pipe = tiny_pipe(dtype)
    ref = sample(pipe)
    assert torch.isfinite(ref).all()
    plan = hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), steps=STEPS, seeds=(1, 2))
    changes = [v for c in plan["l1rel"] for v in c if v is not None]
    below = min(changes) / 2
    with hasten.accelerate(pipe, hasten.BlockCache(plan=plan, delta=below), hasten.AdaptiveGuidance(threshold=2.0)):
        assert torch.equal(sample(pipe), ref)  # exact settings: bitwise in this dtype
    with hasten.accelerate(pipe, hasten.BlockCache(plan=plan, delta=10.0), hasten.AdaptiveGuidance(threshold=-1)) as h:
        out = sample(pipe)
        rep = h.report()
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert sum(rep["methods"]["block-cache"]["reused"]) > 0 and rep["nfe"] == 2 + (STEPS - 1)


def test_caching_runs_on_the_meta_device():
    """Nothing in the Block Caching path creates a CPU tensor or reads a value: it runs on the meta device."""
    tr = tiny_pipe().transformer.to("meta")
    x = torch.empty(4, 1, 8, 8, device="meta")
    labels = torch.zeros(4, dtype=torch.long, device="meta")
    with hasten.accelerate(tr, hasten.BlockCache(schedule=[[True, False, False]] * 2)) as h:
        for t in (900.0, 500.0, 100.0):
            out = tr(x, timestep=torch.full((4,), t, device="meta"), class_labels=labels).sample
        rep = h.report()["methods"]["block-cache"]
        assert h.block_cache_states[0].slots[(None, 4)].cache[0].device.type == "meta"
    assert out.device.type == "meta" and rep["reused"] == [2, 2]
    assert h.block_cache_states[0].slots == {}  # disable() drops the cached residuals


def test_a_plan_applies_to_weights_offloaded_to_the_meta_device():
    """accelerate's offload hooks leave the weights on the meta device: their hash cannot be read, so a plan
    for the same config is applied without the weights check instead of failing to copy meta tensors."""
    from hasten.plans import check_plan, new_plan, weights_hash

    pipe = tiny_pipe()
    plan = new_plan("block-cache", pipe.transformer, solver="euler", steps=3, time_schedule=None,
                    guidance_scale=None, timesteps=[900.0, 500.0, 100.0])
    tr = pipe.transformer.to("meta")
    assert weights_hash(tr) is None and plan["model"]["weights_hash"] is not None
    check_plan(plan, tr)
    with pytest.raises(hasten.HastenError, match="another model"):
        check_plan(plan, tiny_dit_pipe(layers=3).transformer.to("meta"))  # the config is still checked


def test_least_squares_accumulates_on_the_data_device():
    eq = NormalEquations(4)
    eq.add(torch.empty(10, 4, device="meta"), torch.empty(10, device="meta"))
    assert eq.xtx.device.type == "meta" and eq.xty.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_calibration_and_runs_stay_on_the_gpu():
    pipe = tiny_pipe(device="cuda")
    ref = sample(pipe)
    assert ref.device.type == "cuda"
    plan = hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), steps=STEPS, seeds=(1, 2))
    lag = hasten.calibrate(pipe, hasten.LinearAG(threshold=0.99), labels=LABELS * 20, seeds=(0, 1, 2), steps=STEPS)
    with hasten.accelerate(pipe, hasten.BlockCache(plan=plan), hasten.AdaptiveGuidance(threshold=0.99)) as h:
        out = sample(pipe)
        assert out.device.type == "cuda" and torch.isfinite(out).all() and h.report()["nfe"] < 2 * STEPS
    with hasten.accelerate(pipe, hasten.LinearAG(plan=lag)):
        assert torch.isfinite(sample(pipe)).all()
