"""Guidance in a limited interval (Kynkaenniemi et al. 2024): bitwise CFG for the whole range, bitwise the
conditional prediction for an empty one, unconditional rows really skipped outside the interval (counted),
separate-branch pipelines, composition rules and bad input."""

from __future__ import annotations

import pytest
import torch
from test_guidance import sample, tiny_dit
from test_separate_branches import STEPS, wan  # noqa: F401 (fixture)

import hasten
from hasten.errors import HastenError
from hasten.methods.guidance import noise_level
from hasten.pipeline import HastenPipeline
from hasten.specs import guidance_interval_from_spec

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe() -> HastenPipeline:
    return HastenPipeline(tiny_dit(), num_classes=10, guidance_scale=3.0)


def _rows(pipe):
    """Rows the transformer really computes: a hook on its first block (inside hasten's row selection)."""
    rows = []

    def hook(m, a, k):
        rows.append((a[0] if a else k["hidden_states"]).shape[0])

    return rows, pipe.transformer.transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)


def test_whole_range_is_bitwise_cfg_and_empty_interval_is_bitwise_conditional(pipe):
    ref = sample(pipe).images
    with hasten.accelerate(pipe, hasten.GuidanceInterval(0.0, 1.0)) as h:
        assert torch.equal(sample(pipe).images, ref)
        rep = h.report()["methods"]["guidance-interval"]
    assert rep["guided_calls"] == 8 and rep["unguided_calls"] == 0
    cond_only = sample(pipe, guidance_scale=1.0).images
    with hasten.accelerate(pipe, hasten.GuidanceInterval(0.5, 0.5)):
        assert torch.equal(sample(pipe).images, cond_only)


def test_rows_are_skipped_exactly_outside_the_interval(pipe):
    rows, hook = _rows(pipe)
    try:
        with hasten.accelerate(pipe, hasten.GuidanceInterval(0.3, 0.7)) as h:
            out = sample(pipe)
            rep = h.report()["methods"]["guidance-interval"]
    finally:
        hook.remove()
    b = len([1, 2, 3, 4])
    sigmas = [1.0 - t for t in out.timesteps[:-1]]  # Euler calls at the grid's times (Movie Gen: 0 = noise)
    inside = [0.3 < s <= 0.7 for s in sigmas]
    assert 0 < sum(inside) < len(inside)
    assert rows == [2 * b if i else b for i in inside]  # the unconditional rows were not sent
    assert rep["guided_calls"] == sum(inside) and rep["unguided_calls"] == len(inside) - sum(inside)
    assert rep["uncond_rows_skipped"] == b * (len(inside) - sum(inside))
    assert not torch.equal(out.images, sample(pipe).images)  # it did change the run


def test_separate_branch_pipeline_skips_the_unconditional_call(wan):  # noqa: F811
    pipe, run = wan
    ref = run()
    with hasten.accelerate(pipe, hasten.GuidanceInterval(0.0, 1.0)):
        assert torch.equal(run(), ref)
    calls = []
    hook = pipe.transformer.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with hasten.accelerate(pipe, hasten.GuidanceInterval(0.0, 0.0)) as h:
            run()
            log = h.report()["log"]
    finally:
        hook.remove()
    assert len(calls) == STEPS  # only the conditional call of each step ran
    assert {e.get("branch") for e in log} == {"cond", "uncond"}  # the pipeline still asked for both


def test_noise_level_conventions(pipe):
    class H:
        pipeline, t = pipe, 250.0
    assert noise_level(H) == 0.75  # hasten's pipeline: t = 0 is noise

    class D:
        pipeline, t = None, 250.0
    assert noise_level(D) == 0.25  # diffusers: t / num_train_timesteps, 1 = noise

    class F:
        pipeline, t = None, 0.25
    assert noise_level(F, unit_time=True) == 0.25  # Flux, QwenImage: the transformer gets t / 1000

    class N:
        pipeline, t = None, None
    with pytest.raises(HastenError, match="needs the transformer's timestep"):
        noise_level(N)


@pytest.mark.parametrize("family", ["dit", "pixart", "flux", "qwenimage", "hunyuanvideo", "wan"])
def test_interval_guides_at_the_right_calls_and_the_run_scale_is_read_on_every_family(family):
    """Each tiny pipeline's 4 steps at the scheduler's sigmas; guided exactly where 0.2 < sigma <= 0.8, whether
    the transformer gets t in [0, 1000] or t / 1000 (Flux, QwenImage); the handle reads the run's real CFG
    scale (true_cfg_scale on the true-CFG pipelines, the __call__ argument on DiT and PixArt)."""
    from hasten.testing_pipelines import BUILDERS, GUIDANCE, TRUE_CFG

    pipe, run = BUILDERS[family]()
    with torch.no_grad(), hasten.accelerate(pipe, hasten.GuidanceInterval(0.2, 0.8)) as h:
        run(0)
        rep = h.report()
    ts = sorted({e["t"] for e in rep["log"]}, reverse=True)
    scale = 1.0 if max(ts) <= 1.5 else float(pipe.scheduler.config.num_train_timesteps)
    inside = sum(0.2 < t / scale <= 0.8 for t in ts)
    assert 0 < inside < len(ts)
    got = rep["methods"]["guidance-interval"]
    assert (got["guided_calls"], got["unguided_calls"]) == (inside, len(ts) - inside)
    assert h.guidance_scale == (TRUE_CFG if family in ("flux", "qwenimage", "hunyuanvideo") else GUIDANCE)


def test_bad_intervals_and_combinations(pipe):
    for lo, hi in ((-0.1, 0.5), (0.6, 0.5), ("a", 1), (float("nan"), 1)):
        with pytest.raises(HastenError, match="GuidanceInterval"):
            hasten.GuidanceInterval(lo, hi)
    with pytest.raises(HastenError, match="cannot be combined"):
        hasten.accelerate(pipe, hasten.GuidanceInterval(0.2, 0.8), hasten.AdaptiveGuidance(threshold=0.99))
    assert guidance_interval_from_spec({"lo": "0.2", "hi": "0.8"}) == hasten.GuidanceInterval(0.2, 0.8)
    with pytest.raises(HastenError, match="unknown option"):
        guidance_interval_from_spec({"low": "0.2"})
