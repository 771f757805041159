"""Pipelines that send each guidance branch as its own transformer call (diffusers' WanPipeline, built here
from tiny random-weight components): per-branch Block Caching state keyed by diffusers' cache context,
Adaptive Guidance that skips the unconditional call, and both together."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

import hasten
from hasten.testing_pipelines import count_block_calls

B, STEPS = 2, 4


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                               out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    pe, ne = torch.randn(B, 5, 16, generator=g), torch.randn(B, 5, 16, generator=g)

    def run(seed: int = 0) -> torch.Tensor:
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=32, width=32, num_frames=5,
                    num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(seed)).frames

    return pipe, run


def test_branches_are_streams_with_their_own_call_index(wan):
    pipe, run = wan
    with hasten.accelerate(pipe) as h:
        run()
        rep = h.report()
    assert [(e["branch"], e["call"]) for e in rep["log"][:4]] == [("cond", 0), ("uncond", 0), ("cond", 1),
                                                                  ("uncond", 1)]
    assert rep["nfe"] == 2 * STEPS  # rows per sample: two branch calls of B rows per step


def test_block_cache_keeps_one_cache_per_branch(wan):
    pipe, run = wan
    ref = run()
    with hasten.accelerate(pipe, hasten.BlockCache(schedule=[[True] * STEPS] * 2)):
        assert torch.equal(run(), ref)  # nothing reused: bitwise
    sched = [[True, False, True, False]] * 2
    with count_block_calls(pipe.transformer) as counts:
        with hasten.accelerate(pipe, hasten.BlockCache(schedule=sched)) as h:
            cached = run()
            states = h.block_cache_states
            assert set(states[0].slots) == {("cond", B), ("uncond", B)}
            rep = h.report()["methods"]["block-cache"]
    assert counts == [2 * 2] * 2 and rep["reused"] == [2 * 2] * 2  # per branch: computed at 0, 2
    # the same schedule with ONE cache shared by both branches is much further from the reference,
    # so per-branch state is what keeps caching accurate here
    with hasten.accelerate(pipe, hasten.BlockCache(schedule=sched)) as h:
        class Shared(dict):
            def get(self, key, default=None):
                return dict.get(self, "one", default)

            def __setitem__(self, key, value):
                dict.__setitem__(self, "one", value)

        h.on_run_start(lambda: [setattr(st, "slots", Shared()) for st in h.block_cache_states])
        shared = run()
    err_branch = (cached - ref).abs().mean()
    err_shared = (shared - ref).abs().mean()
    assert err_shared > 2 * err_branch > 0


def test_adaptive_guidance_skips_the_unconditional_call(wan):
    pipe, run = wan
    ref = run()
    with hasten.accelerate(pipe, hasten.AdaptiveGuidance(threshold=2.0)) as h:
        assert torch.equal(run(), ref)  # never switches: bitwise CFG
        assert h.report()["nfe"] == 2 * STEPS
    cond_out, step_in = [], []
    with count_block_calls(pipe.transformer) as counts:
        with hasten.accelerate(pipe, hasten.AdaptiveGuidance(threshold=-1)) as h:
            def spy(inner, *a, **k):
                out = inner(*a, **k)
                if h.branch == "cond":
                    cond_out.append(out[0].clone())
                return out

            h.wrap_call(spy, "spy")
            step = pipe.scheduler.step
            h.set_attr(pipe.scheduler, "step", lambda out, *a, **k: step_in.append(out.clone()) or step(out, *a, **k))
            run()
            rep = h.report()
    assert counts == [STEPS + 1] * 2  # step 0: both branches; then the conditional call only
    assert rep["nfe"] == STEPS + 1 and rep["calls"] == 2 * STEPS
    assert [e["rows_sent"] for e in rep["log"] if e["branch"] == "uncond"] == [B] + [0] * (STEPS - 1)
    ag = rep["methods"]["adaptive-guidance"]
    assert ag["nfe_per_sample"] == [STEPS + 1] * B and ag["ag_switch_call"] == [1] * B
    for j in range(1, STEPS):  # u := c, so the pipeline's guided prediction is exactly the conditional one
        assert torch.equal(step_in[j], cond_out[j])


def test_block_cache_and_adaptive_guidance_together(wan):
    pipe, run = wan
    ref = run()
    with hasten.accelerate(pipe, hasten.BlockCache(schedule=[[True] * STEPS] * 2),
                           hasten.AdaptiveGuidance(threshold=2.0)):
        assert torch.equal(run(), ref)
    with count_block_calls(pipe.transformer) as counts:
        with hasten.accelerate(pipe, hasten.BlockCache(schedule=[[True, False, True, False]] * 2),
                               hasten.AdaptiveGuidance(threshold=-1)) as h:
            out = run()
            rep = h.report()
    # cond: computed at steps 0 and 2; uncond: only step 0 runs at all
    assert counts == [3, 3] and rep["nfe"] == STEPS + 1
    assert rep["methods"]["block-cache"]["computed"] == [3, 3]
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_scale_shift_trains_on_a_diffusers_pipeline(wan):
    """Scale-shift distillation through the calibration runner on a pipeline that is not hasten's own: it
    updates, lowers the held-out error against the uncached model, and the trained parameters load."""
    from hasten.api import calibration_run
    from hasten.scale_shift import train_scale_shift

    pipe, run = wan
    plan = hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), runner=run, seeds=(1, 2), steps=STEPS)
    assert plan["guidance_scale"] == 5.0  # not given to calibrate: the runs' own, so other scales are refused
    delta = 10.0  # every block reused after call 0: the most to align
    runner = calibration_run(pipe, runner=run, seeds=(0, 1), steps=STEPS)
    state, info = train_scale_shift(pipe, plan, delta=delta, train_steps=30, lr=3e-3, run=runner)
    assert info["method"] == "adam-output" and info["trajectories"] >= 1
    assert info["kept"] and info["val_loss_after"] < info["val_loss_before"]
    assert any(float(v.abs().sum()) > 0 for v in state.values())
    ref = run()
    with hasten.accelerate(pipe, hasten.BlockCache(plan=plan, delta=delta)):
        plain_err = (run() - ref).pow(2).mean()
    with hasten.accelerate(pipe, hasten.BlockCache(plan=plan, delta=delta, scale_shift=state)) as h:
        aligned_err = (run() - ref).pow(2).mean()
        assert h.report()["methods"]["block-cache"]["scale_shift"]
    assert torch.isfinite(aligned_err) and aligned_err != plain_err


def test_linear_ag_records_its_regression_on_separate_branch_calls(wan):
    """The LinearAG recorder pairs each step's conditional call with the unconditional one that follows it:
    the normal equations of the regressed calls (1 and 3 of 4) are those of the predictions the pipeline got."""
    from hasten.hooks import attach
    from hasten.methods.guidance import LinearAGRecorder, NormalEquations, _layout, linear_ag_design, unwrap_output

    pipe, run = wan
    seen: list[tuple[str, torch.Tensor]] = []
    h = attach(pipe)
    try:
        rec = LinearAGRecorder(h, _layout(h, None))
        h.on_run_start(rec.new_run)
        h.wrap_call(rec, "rec")

        def spy(inner, *args, **kwargs):
            out = inner(*args, **kwargs)
            seen.append((h.branch, unwrap_output(out)[0].clone()))
            return out

        h.wrap_call(spy, "spy")
        with torch.no_grad():
            for seed in (0, 1):
                h.reset()
                run(seed)
    finally:
        h.disable()
    assert [b for b, _ in seen] == ["cond", "uncond"] * (2 * STEPS)
    assert sorted(rec.eqs) == [1, 3] and rec.trajectories == 2 * B and rec.run_timesteps[0] == rec.run_timesteps[1]
    c = [p for b, p in seen if b == "cond"]
    u = [p for b, p in seen if b == "uncond"]
    for j in (1, 3):
        want = NormalEquations(4)
        for r in range(2):
            k = r * STEPS + j
            want.add(linear_ag_design(c[k], c[k - 1], u[k - 1]), u[k])
        torch.testing.assert_close(rec.eqs[j].xtx, want.xtx)
        torch.testing.assert_close(rec.eqs[j].xty, want.xty)


def test_guidance_methods_refuse_a_second_expert(wan):
    """Wan 2.2 runs its low-noise steps on transformer_2, which hasten does not intercept: AG would report calls
    saved that the second expert still makes, so guidance methods refuse it with a one-line error."""
    import copy

    from hasten.errors import HastenError

    pipe, _ = wan
    two = copy.copy(pipe)  # the same components, plus a second expert
    two.register_modules(transformer_2=copy.deepcopy(pipe.transformer))
    for method in (hasten.AdaptiveGuidance(threshold=0.99), hasten.GuidanceInterval(0.2, 0.8)):
        with pytest.raises(HastenError, match="second expert"):
            hasten.accelerate(two, method)
    hasten.accelerate(two, hasten.BlockCache(schedule=[[True] * STEPS] * 2)).disable()  # the first expert's blocks
    assert getattr(pipe, "transformer_2", None) is None  # the fixture's pipeline is untouched


def test_a_deep_copy_of_the_watched_scheduler_sets_its_own_timesteps(wan):
    """LTX-2 deep-copies its scheduler for the audio latents: the copy's set_timesteps must be its own, not the
    watched original's (which a closure over the bound method would be)."""
    import copy

    pipe, _ = wan
    with hasten.accelerate(pipe, hasten.BlockCache(schedule=[[True] * STEPS] * 2)):
        pipe.scheduler.set_timesteps(7)
        clone = copy.deepcopy(pipe.scheduler)
        clone.set_timesteps(3)
        assert len(clone.timesteps) == 3 and len(pipe.scheduler.timesteps) == 7
