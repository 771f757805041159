"""Block Caching and Adaptive Guidance through the FULL diffusers pipeline of every model family (tiny
random-weight pipelines from :mod:`hasten.testing_pipelines`: no download, prompt embeddings passed
directly), not only on the bare transformer (that is ``tests/test_adapters.py``).

Per family: with a calibrated plan and a threshold below the smallest recorded change, the pipeline's
output is bitwise the plain pipeline's and nothing is reused; with a large threshold every block
computes only at call 0 of each stream (each guidance branch of pipelines that send them as separate
calls) and its forward is really not called afterwards. For the separate-call families, Block Caching
and Adaptive Guidance work together: the unconditional branch computes its blocks only at step 0.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import hasten
from hasten.adapters import discover_blocks
from hasten.methods.block_cache import schedule_from_changes
from hasten.testing_pipelines import BUILDERS, SEPARATE, STEPS, count_block_calls

torch.set_num_threads(1)

def _signature_hidden() -> bool:
    """Whether hasten's wrapper of a diffusers pipeline's ``scheduler.set_timesteps`` hides its parameters
    (diffusers' ``retrieve_timesteps`` reads them before passing ``sigmas=``)."""
    target = SimpleNamespace(transformer=torch.nn.Linear(2, 2), scheduler=FlowMatchEulerDiscreteScheduler())
    handle = hasten.accelerate(target)
    try:
        return "sigmas" not in inspect.signature(target.scheduler.set_timesteps).parameters
    finally:
        handle.disable()


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    """(name, pipe, run, reference output, calibrated plan, number of blocks, streams per run)."""
    name = request.param
    pipe, run = BUILDERS[name]()
    ref = run(0)
    plan = hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), runner=run, seeds=(1, 2), steps=STEPS)
    nblocks = len(discover_blocks(pipe.transformer))
    return SimpleNamespace(name=name, pipe=pipe, run=run, ref=ref, plan=plan, nblocks=nblocks,
                           streams=2 if name in SEPARATE else 1)


def test_exact_below_the_smallest_change(family):
    f = family
    changes = [v for c in f.plan["l1rel"] for v in c if v is not None]
    assert len(f.plan["l1rel"]) == f.nblocks and len(changes) == f.nblocks * (STEPS - 1)
    smallest = min(changes)
    assert smallest > 0 and all(math.isfinite(v) for v in changes)
    with count_block_calls(f.pipe.transformer) as counts:
        with hasten.accelerate(f.pipe, hasten.BlockCache(plan=f.plan, delta=smallest / 2)) as h:
            out = f.run(0)
            rep = h.report()["methods"]["block-cache"]
    assert torch.equal(out, f.ref)
    assert rep["reused"] == [0] * f.nblocks
    assert counts == rep["computed"] == [STEPS * f.streams] * f.nblocks
    assert torch.equal(f.run(0), f.ref)  # disabled: the plain pipeline again


def test_large_delta_really_skips_blocks(family):
    f = family
    masks = schedule_from_changes(f.plan["l1rel"], 10.0)
    assert masks == [[True] + [False] * (STEPS - 1)] * f.nblocks  # the tiny models change < 10 over a run
    with count_block_calls(f.pipe.transformer) as counts:
        with hasten.accelerate(f.pipe, hasten.BlockCache(plan=f.plan, delta=10.0)) as h:
            out = f.run(0)
            rep = h.report()["methods"]["block-cache"]
    assert counts == rep["computed"] == [f.streams] * f.nblocks  # call 0 of each branch only
    assert rep["reused"] == [(STEPS - 1) * f.streams] * f.nblocks
    assert torch.isfinite(out).all() and not torch.equal(out, f.ref)
    assert torch.equal(f.run(0), f.ref)


def test_block_cache_with_adaptive_guidance_on_separate_calls(family):
    f = family
    if f.name not in SEPARATE:
        pytest.skip("the pipeline batches the guidance branches in one call")
    n = f.nblocks
    with hasten.accelerate(f.pipe, hasten.BlockCache(schedule=[[True] * STEPS] * n),
                           hasten.AdaptiveGuidance(threshold=2.0)) as h:
        assert torch.equal(f.run(0), f.ref)  # never switches, nothing reused: bitwise CFG
        assert h.report()["nfe"] == 2 * STEPS
    sched = [[True, False] * (STEPS // 2)] * n
    cond = sum(sched[0])
    with count_block_calls(f.pipe.transformer) as counts:
        with hasten.accelerate(f.pipe, hasten.BlockCache(schedule=sched),
                               hasten.AdaptiveGuidance(threshold=-1)) as h:
            out = f.run(0)
            rep = h.report()
    # conditional branch: computed where the schedule says; unconditional: only step 0 runs at all
    assert counts == rep["methods"]["block-cache"]["computed"] == [cond + 1] * n
    assert rep["nfe"] == STEPS + 1 and rep["calls"] == 2 * STEPS
    assert [e["rows_sent"] for e in rep["log"] if e["branch"] == "uncond"] == [2] + [0] * (STEPS - 1)
    assert torch.isfinite(out).all() and not torch.equal(out, f.ref)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_plain_nfe_counts_both_branches(name):
    """Batched (also inside cache_context("cond_uncond"): CogVideoX, LTX, Mochi) or separate calls: 2 per step."""
    pipe, run = BUILDERS[name]()
    with hasten.accelerate(pipe) as h:
        run(0)
        assert h.report()["nfe"] == 2 * STEPS


def test_set_timesteps_keeps_its_signature():
    assert not _signature_hidden()
