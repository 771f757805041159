"""Block Caching on hasten's pipeline: the schedule rule, exactness, skipped work, CFG rows, plans."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

import hasten
from hasten.methods.block_cache import ideal_speedup, schedule_from_changes
from hasten.methods.block_cache.runtime import _Slot
from hasten.plans import check_call_timestep, save_plan
from hasten.testing import tiny_dit_pipe

STEPS = 8
LABELS = list(range(10))


def tiny_pipe(seed: int = 0, layers: int = 3) -> hasten.HastenPipeline:
    return tiny_dit_pipe(layers=layers, seed=seed)


def sample(pipe, seed=0, steps=STEPS, solver="euler", labels=LABELS):
    return pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                solver=solver).images


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


@pytest.fixture(scope="module")
def plan(pipe):
    return hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), steps=STEPS, seeds=(1, 2))


# --------------------------------------------------------------------------- the schedule rule (Eq. 7)
def test_constant_change_gives_every_third_call():
    """Convention: compute at 0; reuse while sum_{n=a+1}^{b} L1rel <= delta. 0.2, 0.4 reuse; 0.6 computes."""
    curve = [None] + [0.2] * 9
    (mask,) = schedule_from_changes([curve], 0.5)
    assert [n for n, c in enumerate(mask) if c] == [0, 3, 6, 9]
    (mask,) = schedule_from_changes([curve], 0.4)  # 0.2 + 0.2 = 0.4 <= 0.4: still reuse (floats add exactly)
    assert [n for n, c in enumerate(mask) if c] == [0, 3, 6, 9]
    (mask,) = schedule_from_changes([curve], 0.1)
    assert all(mask)


def test_speedup_never_falls_as_delta_grows():
    rng = random.Random(0)
    for _ in range(30):
        curves = [[None] + [rng.uniform(0.0, 0.6) for _ in range(40)] for _ in range(4)]
        speeds = [ideal_speedup(schedule_from_changes(curves, d)) for d in [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8,
                                                                            1.0, 2.0, 5.0]]
        assert all(b >= a for a, b in zip(speeds, speeds[1:], strict=False)), speeds
        assert speeds[0] == 1.0 and speeds[-1] > 1.0


def test_paper_example_shape():
    """A block whose change grows late is computed more often late (as in the paper's Fig. 4)."""
    curve = [None] + [0.1] * 10 + [0.3] * 9
    (mask,) = schedule_from_changes([curve], 0.5)
    early = sum(mask[1:11])
    late = sum(mask[11:])
    assert late > early


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_delta_below_smallest_change_is_bitwise_exact(solver):
    pipe = tiny_pipe(1)
    ref = sample(pipe, solver=solver)
    plan = hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), steps=STEPS, seeds=(1, 2), solver=solver)
    calls = STEPS * (2 if solver == "heun" else 1)
    assert plan["calls"] == calls and len(plan["schedule"][0]) == calls
    smallest = min(v for c in plan["l1rel"] for v in c if v is not None)
    with hasten.accelerate(pipe, hasten.BlockCache(plan=plan, delta=smallest * 0.99)) as h:
        out = sample(pipe, solver=solver)
        rep = h.report()
    assert torch.equal(out, ref)
    bc = rep["methods"]["block-cache"]
    assert bc["reused"] == [0, 0, 0] and bc["computed"] == [calls] * 3
    assert rep["nfe"] == 2 * calls and rep["calls"] == calls  # CFG: 2 rows per sample per call


def test_skipped_blocks_do_not_call_forward(pipe, plan):
    blocks = list(pipe.transformer.transformer_blocks)
    counts = [0] * len(blocks)
    for i, b in enumerate(blocks):
        orig = b.forward

        def counting(*a, _i=i, _orig=orig, **k):
            counts[_i] += 1
            return _orig(*a, **k)

        b.forward = counting
    try:
        with hasten.accelerate(pipe, hasten.BlockCache(plan=plan)) as h:
            sample(pipe)
            rep = h.report()
        bc = rep["methods"]["block-cache"]
        assert counts == bc["computed"] == [sum(m) for m in plan["schedule"]]
        assert sum(bc["reused"]) > 0 and bc["reused"] == [STEPS - c for c in counts]
        log = [e["block_cache"] for e in rep["log"]]
        assert log[0] == "CCC" and all(len(s) == 3 for s in log)
        assert [sum(s[i] == "C" for s in log) for i in range(3)] == counts
    finally:
        for b in blocks:
            del b.forward


def test_measure_mode_runs_every_block_and_reports_the_reuse_error(pipe, plan):
    """measure=True (diagnostic): the images are those of plain Block Caching, but every reused block also
    runs its forward, and the report gives each block's mean relative error of the reused output."""
    from hasten.testing_pipelines import count_block_calls

    names = [f"transformer_blocks.{i}" for i in range(3)]
    with hasten.accelerate(pipe, hasten.BlockCache(plan=plan)):
        cached = sample(pipe)
    with count_block_calls(pipe.transformer, names) as counts, \
            hasten.accelerate(pipe, hasten.BlockCache(plan=plan, measure=True)) as h:
        measured = sample(pipe)
        rep = h.report()["methods"]["block-cache"]
    assert torch.equal(measured, cached) and counts == [STEPS] * 3
    assert [e is None for e in rep["reuse_error"]] == [r == 0 for r in rep["reused"]]
    assert all(e > 0 for e in rep["reuse_error"] if e is not None)


def test_disable_restores_bitwise_and_state_stays_on_handle(plan):
    pipe = tiny_pipe()
    ref = sample(pipe)
    forward_before = pipe.transformer.forward
    keys_before = set(pipe.transformer.state_dict())
    h = hasten.accelerate(pipe, hasten.BlockCache(plan=plan))
    cached = sample(pipe)
    assert not torch.equal(cached, ref)
    h.disable()
    assert torch.equal(sample(pipe), ref)
    assert "forward" not in pipe.transformer.__dict__ and "velocity_fn" not in pipe.__dict__
    assert all("forward" not in b.__dict__ for b in pipe.transformer.transformer_blocks)
    assert set(pipe.transformer.state_dict()) == keys_before
    assert pipe.transformer.forward == forward_before
    h2 = hasten.accelerate(pipe, hasten.BlockCache(plan=plan))  # can accelerate again after disable
    assert torch.equal(sample(pipe), cached)
    with pytest.raises(hasten.HastenError, match="already accelerated"):
        hasten.accelerate(pipe, hasten.BlockCache(plan=plan))
    h2.disable()


def test_two_pipelines_accelerated_differently_keep_their_results(plan):
    a, b = tiny_pipe(), tiny_pipe()
    with hasten.accelerate(a, hasten.BlockCache(plan=plan, delta=0.3)):
        alone_a = sample(a)
    with hasten.accelerate(b, hasten.BlockCache(plan=plan, delta=2.0)):
        alone_b = sample(b)
    ha = hasten.accelerate(a, hasten.BlockCache(plan=plan, delta=0.3))
    hb = hasten.accelerate(b, hasten.BlockCache(plan=plan, delta=2.0))
    try:
        out_a1, out_b1, out_a2 = sample(a), sample(b), sample(a)
    finally:
        ha.disable()
        hb.disable()
    assert torch.equal(out_a1, alone_a) and torch.equal(out_a2, alone_a) and torch.equal(out_b1, alone_b)
    assert not torch.equal(alone_a, alone_b)
    ra, rb = ha.report(), hb.report()
    assert ra["runs"] == 2 and rb["runs"] == 1
    per_run_a = sum(ra["methods"]["block-cache"]["reused"]) / 2
    assert sum(rb["methods"]["block-cache"]["reused"]) > per_run_a


# --------------------------------------------------------------------------- guidance rows
def _shrink_to_cond_from(call: int):
    """A toy batch-shrinking method (what Adaptive Guidance does): from ``call`` on, send cond rows only."""
    from hasten.hooks import select_rows

    def install(handle):
        def wrapper(inner, *args, **kwargs):
            full = handle.full_batch
            if handle.call_index < call:
                return inner(*args, **kwargs)
            rows = torch.arange(full // 2, full)
            handle.active_rows = rows
            try:
                a, k = select_rows(args, rows, full), select_rows(kwargs, rows, full)
                out = inner(*a, **k).sample
            finally:
                handle.active_rows = None
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=torch.cat([out, out]))  # u = c: guidance gives c

        handle.wrap_call(wrapper, "toy-shrink")

    return install


def test_cfg_rows_keep_conditional_and_unconditional_caches_apart():
    """Shrinking to the cond rows must reuse the cond rows' residuals, never the uncond ones."""
    pipe = tiny_pipe(2)
    with torch.no_grad():  # make the class condition matter, so cond and uncond residuals differ clearly
        for blk in pipe.transformer.transformer_blocks:
            blk.norm1.emb.class_embedder.embedding_table.weight.mul_(30)
    sched = [[True, True, False, False, True, False, False, False]] * 3  # keeps at call 1 (full batch)
    # reference: no shrinking, cond rows only are what matters after call 2
    with hasten.accelerate(pipe, hasten.BlockCache(schedule=sched)) as h:
        install = _shrink_to_cond_from(2)
        install(h)
        shrunk = sample(pipe, labels=[1, 7])
        rep = h.report()
    assert [e["rows_sent"] for e in rep["log"]] == [4, 4] + [2] * 6
    assert rep["nfe"] == pytest.approx((2 * 4 + 6 * 2) / 2)
    assert rep["methods"]["block-cache"]["forced"] == [0, 0, 0]
    # the same run with the cond residuals deliberately replaced by the uncond ones differs a lot,
    # so the comparison below is discriminating
    hb = hasten.accelerate(pipe, hasten.BlockCache(schedule=sched))
    _shrink_to_cond_from(2)(hb)
    states = hb.block_cache_states
    orig_keep = type(states[0]).keep

    def swapped_keep(self, args, kwargs, out, rows):
        orig_keep(self, args, kwargs, out, rows)
        if rows is None and self.slot.cache[0] is not None:
            u, c = self.slot.cache[0].chunk(2)
            self.slot.cache[0] = torch.cat([c, u])

    try:
        type(states[0]).keep = swapped_keep
        mixed = sample(pipe, labels=[1, 7])
    finally:
        type(states[0]).keep = orig_keep
        hb.disable()
    # reference without caching but with the same shrinking: cond-only rows from call 2
    with hasten.accelerate(pipe, hasten.BlockCache(schedule=[[True] * STEPS] * 3)) as hc:
        _shrink_to_cond_from(2)(hc)
        uncached = sample(pipe, labels=[1, 7])
    err_right = (shrunk - uncached).abs().mean()
    err_mixed = (mixed - uncached).abs().mean()
    assert err_mixed > 3 * err_right


def test_rows_without_a_cache_are_computed_not_reused():
    """If a row was not computed at the block's last computation, the block is computed (forced)."""
    pipe = tiny_pipe(3)
    sched = [[True, True, False, False, False, False, False, False]] * 3
    with hasten.accelerate(pipe, hasten.BlockCache(schedule=sched)) as h:
        from hasten.hooks import select_rows

        def wrapper(inner, *args, **kwargs):  # calls 0-1 send the cond rows only, later calls all rows
            full = h.full_batch
            if h.call_index >= 2:
                return inner(*args, **kwargs)
            rows = torch.arange(full // 2, full)
            h.active_rows = rows
            try:
                a, k = select_rows(args, rows, full), select_rows(kwargs, rows, full)
                out = inner(*a, **k).sample
            finally:
                h.active_rows = None
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=torch.cat([out, out]))

        h.wrap_call(wrapper, "toy-grow")
        out = sample(pipe, labels=[3, 4])
        bc = h.report()["methods"]["block-cache"]
    assert torch.isfinite(out).all()
    assert bc["forced"] == [1, 1, 1]  # call 2 finds no uncond cache: computed instead
    assert bc["reused"] == [5, 5, 5]


# --------------------------------------------------------------------------- plans
def test_plan_contents_and_validation(tmp_path, pipe, plan):
    assert plan["method"] == "block-cache" and plan["steps"] == STEPS and plan["solver"] == "euler"
    assert len(plan["l1rel"]) == 3 and plan["l1rel"][0][0] is None and len(plan["l1rel"][0]) == STEPS
    assert plan["conditions"] == LABELS and plan["seeds"] == [1, 2]
    path = save_plan(tmp_path / "plan.json", plan)
    loaded = json.loads(path.read_text())
    assert loaded["schedule"] == plan["schedule"]
    # another model
    other = tiny_pipe(layers=4)
    with pytest.raises(hasten.HastenError, match="another model"):
        hasten.accelerate(other, hasten.BlockCache(plan=str(path)))
    assert "forward" not in other.transformer.__dict__  # nothing left installed after the error
    # another step count: caught at the first call whose timestep differs
    with hasten.accelerate(pipe, hasten.BlockCache(plan=str(path))):
        with pytest.raises(hasten.HastenError, match="plan expects"):
            sample(pipe, steps=STEPS + 2)
    with pytest.raises(hasten.HastenError, match="more denoiser calls"):
        check_call_timestep(plan, STEPS, 1000.0)
    # corrupt JSON, wrong method, missing file, negative delta
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(hasten.HastenError, match="not valid JSON"):
        hasten.accelerate(pipe, hasten.BlockCache(plan=str(bad)))
    wrong = dict(plan, method="linear-ag")
    with pytest.raises(hasten.HastenError, match="not a 'block-cache' plan"):
        hasten.accelerate(pipe, hasten.BlockCache(plan=wrong))
    with pytest.raises(hasten.HastenError, match="not found"):
        hasten.accelerate(pipe, hasten.BlockCache(plan=str(tmp_path / "missing.json")))
    for broken, match in ((dict(plan, model="DiT"), "model entry"),
                          ({k: v for k, v in plan.items() if k != "schedule"}, "missing schedule"),
                          ({k: v for k, v in plan.items() if k != "l1rel"}, "missing l1rel"),
                          (dict(plan, schedule=[m[:-1] for m in plan["schedule"]]), "one row per block")):
        with pytest.raises(hasten.HastenError, match=match):  # one-line errors, not a KeyError mid-run
            hasten.accelerate(pipe, hasten.BlockCache(plan=broken, delta=0.5))
    with pytest.raises(hasten.HastenError, match="schedule= alone"):
        hasten.accelerate(pipe, hasten.BlockCache(plan=plan, schedule=plan["schedule"]))
    # the plan names scale-shift parameters (missing here) trained for its own delta: another delta never reads them
    with hasten.accelerate(pipe, hasten.BlockCache(plan=dict(plan, scale_shift_file="gone.safetensors"),
                                                   delta=plan["delta"] + 0.1)) as h:
        assert not h.report()["methods"]["block-cache"]["scale_shift"]
    with pytest.raises(hasten.HastenError, match="not found"):
        hasten.accelerate(pipe, hasten.BlockCache(plan=dict(plan, scale_shift_file="gone.safetensors")))
    with pytest.raises(hasten.HastenError, match="delta must be"):
        hasten.BlockCache(delta=-0.1)
    with pytest.raises(hasten.HastenError, match="needs delta="):
        hasten.accelerate(pipe, hasten.BlockCache())
    with pytest.raises(hasten.HastenError, match="at least 8"):
        hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), labels=[1, 2, 3], steps=STEPS)
    with pytest.raises(hasten.HastenError, match="at least 2 different seeds"):
        hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), seeds=(0,), steps=STEPS)


def test_more_delta_more_reuse(pipe, plan):
    reused = []
    for d in (0.0, 0.2, 0.5, 1.0, 3.0):
        with hasten.accelerate(pipe, hasten.BlockCache(plan=plan, delta=d)) as h:
            sample(pipe)
            reused.append(sum(h.report()["methods"]["block-cache"]["reused"]))
    assert reused == sorted(reused) and reused[0] == 0 and reused[-1] > 0


def test_block_cache_on_a_copy_does_not_touch_the_original(pipe, plan):
    ref = sample(pipe)
    twin = copy.deepcopy(pipe)
    with hasten.accelerate(twin, hasten.BlockCache(plan=plan)):
        sample(twin)
        assert torch.equal(sample(pipe), ref)


def test_delta_without_a_plan_calibrates_on_the_first_run(pipe, tmp_path, caplog):
    ref0, ref1 = sample(pipe, seed=0), sample(pipe, seed=1)
    with hasten.accelerate(pipe, hasten.BlockCache(delta=0.0)) as h:  # below every change: exact
        assert torch.equal(sample(pipe, seed=0), ref0) and torch.equal(sample(pipe, seed=1), ref1)
        assert h.report()["methods"]["block-cache"]["reused"] == [0, 0, 0]
    with caplog.at_level("INFO", logger="hasten"), hasten.accelerate(pipe, hasten.BlockCache(delta=0.5)) as h:
        first = sample(pipe, seed=0)
        rep = h.report()["methods"]["block-cache"]
        assert rep["calibrated_on_first_run"] == "pending" and rep["reused"] == [0, 0, 0]
        second = sample(pipe, seed=1)
        rep = h.report()["methods"]["block-cache"]
        plan = h.block_cache_plan
    assert torch.equal(first, ref0)  # the calibrating run computes every block
    assert sum(rep["reused"]) > 0 and not torch.equal(second, ref1)  # the second run skips work
    assert rep["calibrated_on_first_run"]["calls"] == STEPS and rep["calibrated_on_first_run"]["seconds"] > 0
    assert "calibrated on the first run" in caplog.text
    assert plan["calls"] == STEPS and plan["delta"] == 0.5
    save_plan(tmp_path / "p.json", plan)  # the way to make it reproducible
    with hasten.accelerate(pipe, hasten.BlockCache(plan=str(tmp_path / "p.json"))) as h:
        again = sample(pipe, seed=1)
        assert h.report()["methods"]["block-cache"]["reused"] == rep["reused"]
    assert torch.equal(again, second)


def test_first_run_calibration_survives_an_interrupted_run_and_keeps_that_runs_guidance_scale(pipe):
    """A first run cut short (Ctrl-C, out of memory: here a block raising at call 3) has partial curves: the
    next run is recorded instead (every block computed, so exact) and the plan covers all its calls. The plan
    keeps the recorded run's guidance scale, so a run at another scale is refused."""
    calls = []

    def interrupt(module, args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt

    def run(seed, scale):
        return pipe(LABELS, num_inference_steps=STEPS, guidance_scale=scale,
                    generator=torch.Generator().manual_seed(seed)).images

    ref = run(1, 3.0)
    with hasten.accelerate(pipe, hasten.BlockCache(delta=0.5)) as h:
        hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(interrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                run(0, 3.0)
        finally:
            hook.remove()
        assert torch.equal(run(1, 3.0), ref)  # recorded instead: every block computed
        with pytest.raises(hasten.HastenError, match="guidance"):  # the plan is made as this run starts
            run(2, 4.0)
        plan = h.block_cache_plan
        assert plan["calls"] == STEPS and plan["guidance_scale"] == 3.0
        run(2, 3.0)
        assert sum(h.report()["methods"]["block-cache"]["reused"]) > 0


def test_scale_shift_time_features_see_unit_timesteps_on_the_0_1000_scale():
    from hasten.methods.block_cache.runtime import time_scale

    assert time_scale({"timesteps": [1.0, 0.75, 0.5]}) == 1000.0  # Flux-style t / 1000
    assert time_scale({"timesteps": [999.0, 500.0]}) == 1.0
    assert time_scale(None) == 1.0


def test_a_block_whose_batch_is_not_the_calls_rows_is_refused_when_rows_are_dropped():
    """Latte's temporal blocks batch (sample, pixel) pairs, not the call's rows: with a method that drops rows
    (AG), the cached residual picked by row would broadcast over the block's batch; it is an error instead."""
    pipe = tiny_pipe()
    with hasten.accelerate(pipe, hasten.BlockCache(schedule=[[True] * STEPS] * 3)) as h:
        st = h.block_cache_states[0]
        st.slot = _Slot(len(st.names), 4)
        st.slot.cache = [torch.randn(4, 16, 8)] + [None] * (len(st.names) - 1)
        st.slot.valid = True
        rows = torch.tensor([2, 3])
        ok = st.reuse([torch.zeros(2, 16, 8)] + [None] * (len(st.names) - 1), rows)  # the call's rows: fine
        assert torch.equal(ok if st.single else ok[0], st.slot.cache[0][2:])
        with pytest.raises(hasten.HastenError, match="not the call's rows"):
            st.reuse([torch.zeros(6, 16, 8)] + [None] * (len(st.names) - 1), rows)
