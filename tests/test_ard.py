"""ARD (autoregressive distillation): the student's masks, KV cache, initialisation, training and the
trajectory data set, on a tiny text-to-image stack."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch

from hasten import HastenError
from hasten.distill.ard import (
    ARDConfig,
    ARDStudent,
    HistoryAttention,
    ard_flops,
    block_causal_mask,
    gated_attention,
    load_ard,
    own_history_inputs,
    save_ard,
    train_ard,
)
from hasten.distill.trajectories import generate_trajectories, kept_indices, load_trajectories, teacher_states
from hasten.testing import TINY_PROMPTS as PROMPTS
from hasten.testing import run_cli, teacher_euler
from hasten.testing_pipelines import count_block_calls

SIGMAS = [1.0, 0.6, 0.4, 0.2, 0.0]


def trajectory_data(tiny_shapes, tiny_cond, copies: int) -> dict:
    """A tiny trajectory set (what :func:`load_trajectories` returns): the teacher's 4 kept states on PROMPTS,
    repeated ``copies`` times."""
    noise, text, pooled = tiny_cond
    states, sigmas = teacher_states(tiny_shapes, PROMPTS, noise, 5, kept_indices(5, 4))
    return {"states": states.repeat(copies, 1, 1, 1, 1), "text": text.repeat(copies, 1, 1),
            "pooled": pooled.repeat(copies, 1), "sigmas": sigmas}


def test_kept_indices_follow_the_papers_spacing():
    assert kept_indices(25, 4) == [0, 10, 15, 20, 25]  # DDIM 25 -> 15 -> 10 -> 5 -> 0 in the paper
    assert kept_indices(10, 4) == [0, 4, 6, 8, 10]
    assert kept_indices(4, 4) == [0, 1, 2, 3, 4]
    assert kept_indices(25, 1) == [0, 25]
    with pytest.raises(HastenError):
        kept_indices(3, 4)


def test_masks_are_block_causal_below_n_and_block_diagonal_above():
    m = block_causal_mask(3, 2)
    assert m.tolist()[4] == [True] * 6 and m.tolist()[0] == [True, True, False, False, False, False]
    assert m.tolist()[2] == [True, True, True, True, False, False]
    d = block_causal_mask(3, 2, history=False)
    assert d.tolist()[2] == [False, False, True, True, False, False]


def test_only_the_lower_n_blocks_attend_across_groups(tiny_shapes):
    """The history attention (block-causal across groups) sits in blocks 0..N-1; the upper blocks keep the
    teacher's processor, which sees one group per row: the groups are separate rows there."""
    layers = len(tiny_shapes.transformer.transformer_blocks)
    teacher_proc = type(tiny_shapes.transformer.transformer_blocks[0].attn.processor)
    for n in (0, 1, layers):
        blocks = ARDStudent(tiny_shapes.transformer, SIGMAS, n).transformer.transformer_blocks
        assert [isinstance(b.attn.processor, HistoryAttention) for b in blocks] == [i < n for i in range(layers)]
        assert all(type(b.attn.processor) is teacher_proc for b in blocks[n:])


def test_cached_passes_are_checked_and_a_training_pass_leaves_the_transformer_usable(tiny_shapes, tiny_cond):
    noise, text, pooled = tiny_cond
    student = ARDStudent(tiny_shapes.transformer, SIGMAS, 1).eval()
    with torch.no_grad(), student.kv_cache():
        with pytest.raises(HastenError, match="pass 2 needs the KV cache of groups 0..1"):
            student(noise, text, pooled, group=2)  # the cache is empty
        student(noise, text, pooled, group=0)
        with pytest.raises(HastenError, match="pass 0 needs"):
            student(noise, text, pooled, group=0)  # group 0 is cached already
    states = torch.randn(noise.shape[0], 4, *noise.shape[1:])
    with torch.no_grad():
        student(states, text, pooled)  # teacher-forced: 4 groups per sample in the history blocks
        plain = student.transformer(hidden_states=noise, timestep=torch.full((noise.shape[0],), 500.0),
                                    encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)[0]
    assert plain.shape == noise.shape  # one group per row again
    with pytest.raises(HastenError, match="must decrease within"):
        ARDStudent(tiny_shapes.transformer, [0.0, 0.5, 1.0], 1)


def test_n0_student_at_init_is_the_teacher_taking_k_euler_steps_bitwise(tiny_shapes, tiny_cond):
    """The exactness setting: a fresh N = 0 student samples exactly the teacher's K big Euler steps."""
    noise, text, pooled = tiny_cond
    student = ARDStudent(tiny_shapes.transformer, SIGMAS, 0).eval()
    assert torch.equal(student.sample(noise, text, pooled), teacher_euler(tiny_shapes, noise, text, pooled, SIGMAS))


def test_with_history_the_first_step_is_the_teachers_and_later_steps_see_the_history(tiny_shapes, tiny_cond):
    noise, text, pooled = tiny_cond
    student = ARDStudent(tiny_shapes.transformer, SIGMAS, 2).eval()
    _, states = student.sample(noise, text, pooled, return_states=True)
    assert torch.equal(states[:, 1], teacher_euler(tiny_shapes, noise, text, pooled, SIGMAS[:2]))
    assert not torch.equal(states[:, -1], teacher_euler(tiny_shapes, noise, text, pooled, SIGMAS))


@pytest.mark.parametrize("n,gate,convention", [(0, False, "state"), (1, False, "state"), (2, False, "state"),
                                               (2, True, "state"), (0, False, "x0"), (2, False, "x0")])
def test_kv_cached_passes_equal_the_teacher_forced_masked_pass(tiny_shapes, tiny_cond, n, gate, convention):
    """Fed its own predictions, the one-shot masked forward gives the velocities of the K cached passes.

    Not bitwise: the masked pass reduces attention over all groups' keys (masked entries add exact
    zeros, but SDPA's blocked reductions group the sums differently), so float32 rounding differs at
    ~1e-7 relative; 1e-5 absolute on unit-scale latents is far below any real difference (a wrong
    mask moves outputs by ~1e-2, the next test)."""
    noise, text, pooled = tiny_cond
    student = ARDStudent(tiny_shapes.transformer, SIGMAS, n, history_gate=gate, convention=convention).eval()
    if gate:  # gates spread over (0, 1)
        student.history_gates.data = torch.rand(student.history_gates.shape, generator=torch.Generator()) / 50
    final, states = student.sample(noise, text, pooled, return_states=True)
    with torch.no_grad():
        v = student(states[:, :-1], text, pooled)
    coef = student.step_sizes() if convention == "state" else -student.labels  # the Euler jump, or x0 = x - l v
    pred = states[:, :-1] + coef.view(1, -1, 1, 1, 1) * v
    torch.testing.assert_close(pred, states[:, 1:], atol=1e-5, rtol=0)


def test_gated_attention_mixes_the_own_group_and_the_history_softmax():
    q, k, v = (torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    seen, own = block_causal_mask(2, 2), block_causal_mask(2, 2, history=False)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    zero, one, half = (gated_attention(q, k, v, seen, own, torch.full((3,), g)) for g in (0.0, 1.0, 0.5))
    torch.testing.assert_close(zero, sdpa(q, k, v, attn_mask=own))
    torch.testing.assert_close(one, sdpa(q, k, v, attn_mask=seen))
    torch.testing.assert_close(half, (zero + one) / 2)
    torch.testing.assert_close(zero[:, :, :2], one[:, :, :2])  # group 0 has no history


def test_a_gated_student_starts_as_step_distillation_and_can_open_its_history(tiny_shapes, tiny_cond):
    """``history_gate``: all gates 0 (initialisation) is the N = 0 student, all 1 the paper's ARD; the loss
    reaches the gates at 0, so training can open them.

    Within 1e-5, not bitwise: the gated attention is an explicit softmax, the N = 0 student's diffusers'
    fused SDPA kernel, which sums in another order (~1e-7 relative); a gate at 0.5 moves outputs by > 1e-3."""
    noise, text, pooled = tiny_cond
    states = torch.randn(2, 4, *tiny_shapes.latent_shape, generator=torch.Generator().manual_seed(1))
    gated = ARDStudent(tiny_shapes.transformer, SIGMAS, 2, history_gate=True).eval()
    with torch.no_grad():
        zero = ARDStudent(tiny_shapes.transformer, SIGMAS, 0).eval()(states, text, pooled)
        paper = ARDStudent(tiny_shapes.transformer, SIGMAS, 2).eval()(states, text, pooled)
        torch.testing.assert_close(gated(states, text, pooled), zero, atol=1e-5, rtol=0)
        gated.history_gates.fill_(1.0)  # x GATE_GAIN, clamped to 1
        torch.testing.assert_close(gated(states, text, pooled), paper, atol=1e-5, rtol=0)
        gated.history_gates.fill_(0.01)  # g = 0.5
        assert (gated(states, text, pooled)[:, 1:] - zero[:, 1:]).abs().max() > 1e-3
    fresh = ARDStudent(tiny_shapes.transformer, SIGMAS, 2, history_gate=True)
    fresh.loss(torch.cat([noise[:, None], states], 1), text, pooled).backward()
    assert fresh.history_gates.grad.abs().min() > 0


def test_n0_groups_are_independent_and_history_is_causal(tiny_shapes, tiny_cond):
    noise, text, pooled = tiny_cond
    states = torch.randn(2, 4, *tiny_shapes.latent_shape, generator=torch.Generator().manual_seed(1))
    early = states.clone()
    early[:, 0] += 1.0  # perturb the first group
    late = states.clone()
    late[:, 3] += 1.0  # perturb the last group
    with torch.no_grad():
        zero = ARDStudent(tiny_shapes.transformer, SIGMAS, 0).eval()
        a, b = zero(states, text, pooled), zero(early, text, pooled)
        torch.testing.assert_close(a[:, 1:], b[:, 1:], atol=1e-6, rtol=0)  # N = 0: 4 independent passes
        assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3
        ard = ARDStudent(tiny_shapes.transformer, SIGMAS, 2).eval()
        a, b, c = ard(states, text, pooled), ard(early, text, pooled), ard(late, text, pooled)
        assert (a[:, 1:] - b[:, 1:]).abs().amax(dim=(0, 2, 3, 4)).min() > 1e-3  # later groups see group 0
        torch.testing.assert_close(a[:, :3], c[:, :3], atol=1e-6, rtol=0)  # earlier groups never see later


def test_the_student_runs_k_passes_of_the_blocks(tiny_shapes, tiny_cond):
    """It skips work: 4 passes of every block per image, against 25 guided steps of the teacher."""
    noise, text, pooled = tiny_cond
    student = ARDStudent(tiny_shapes.transformer, SIGMAS, 2).eval()
    with count_block_calls(student.transformer) as counts:
        student.sample(noise, text, pooled)
    assert counts == [4] * len(counts)
    with count_block_calls(tiny_shapes.transformer) as counts:
        tiny_shapes(PROMPTS, num_inference_steps=25, latents=noise, output_type="latent")
    assert counts == [25] * len(counts)  # each call batches both guidance branches


def test_flop_formula_matches_the_flop_counter(tiny_shapes, tiny_cond):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    noise, text, pooled = tiny_cond
    counted = {}
    for n, gate in ((0, False), (2, False), (2, True)):  # the gates' mixing adds no matrix product
        student = ARDStudent(tiny_shapes.transformer, SIGMAS, n, history_gate=gate).eval()
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            student.sample(noise, text, pooled)
        counted[n, gate] = fc.get_total_flops()
        want = ard_flops(student, text.shape[1], 16, 16)
        assert want["total"] * 2 == counted[n, gate], (n, gate)
    assert counted[2, True] == counted[2, False]
    assert counted[2, False] - counted[0, False] == 2 * ard_flops(student, text.shape[1], 16, 16)["extra"] > 0


def test_the_x0_loss_is_the_mse_of_the_clean_images_the_steps_imply(tiny_shapes, tiny_cond):
    data = trajectory_data(tiny_shapes, tiny_cond, copies=1)
    states, (_, text, pooled) = data["states"], tiny_cond
    student = ARDStudent(tiny_shapes.transformer, data["sigmas"].tolist(), 1).eval()
    with torch.no_grad():
        x, s = states[:, :-1], student.sigmas.view(1, -1, 1, 1, 1)
        v, dt = student(x, text, pooled), student.step_sizes().view(1, -1, 1, 1, 1)
        v_teacher = (states[:, 1:] - x) / dt  # the velocity that lands each step on the teacher's next state
        x0_mse = ((x - s[:, :-1] * v) - (x - s[:, :-1] * v_teacher)) ** 2
        want = x0_mse.mean(dim=(0, 2, 3, 4)).mean()
        got = student.loss(states, text, pooled, space="x0")
        state_loss = student.loss(states, text, pooled)
    assert torch.allclose(got, want, rtol=1e-4) and not torch.allclose(got, state_loss, rtol=0.1)
    with pytest.raises(HastenError, match="--loss-space must be state or x0"):
        student.loss(states, text, pooled, space="eps")


def test_training_lowers_the_loss_and_resumes_exactly(tiny_shapes, tiny_cond, tmp_path):
    data = trajectory_data(tiny_shapes, tiny_cond, copies=4)
    cfg = ARDConfig(steps=6, batch_size=4, lr=1e-3, warmup=1, layers_with_history=1, checkpoint_every=2,
                    log_every=1, bf16_autocast=False)
    straight = train_ard(tiny_shapes.transformer, data, tmp_path / "a", cfg, progress=False)
    curve = [c["loss"] for c in straight["loss_curve"]]
    assert curve[-1] < curve[0]
    train_ard(tiny_shapes.transformer, data, tmp_path / "b", cfg, progress=False, stop_after=3)
    resumed = train_ard(tiny_shapes.transformer, data, tmp_path / "b", cfg, progress=False)
    assert resumed["finished"] and [c["loss"] for c in resumed["loss_curve"]] == curve
    for p, q in zip(straight["student"].parameters(), resumed["student"].parameters()):
        assert torch.equal(p, q)
    with pytest.raises(HastenError, match="other settings"):
        train_ard(tiny_shapes.transformer, data, tmp_path / "b", ARDConfig(steps=7, layers_with_history=1),
                  progress=False)
    # --loss-space x0 trains on the x0 loss: every step weight is >= 1, so the first logged loss is higher
    x0_run = train_ard(tiny_shapes.transformer, data, tmp_path / "x0", replace(cfg, loss_space="x0"), progress=False,
                       stop_after=1)
    assert x0_run["loss_curve"][0]["loss"] > 1.5 * curve[0]
    with pytest.raises(HastenError, match="--loss-space must be state or x0"):
        train_ard(tiny_shapes.transformer, data, tmp_path / "bad", replace(cfg, loss_space="v"), progress=False)
    # the trajectory count is part of the recipe: a run on a grown (or cut) data set is not a resume
    counted = replace(cfg, trajectories=8)
    train_ard(tiny_shapes.transformer, data, tmp_path / "c", counted, progress=False, stop_after=2)
    more = {**data, **{k: torch.cat([data[k], data[k][:2]]) for k in ("states", "text", "pooled")}}
    with pytest.raises(HastenError, match="says 8 trajectories, the data holds 10"):
        train_ard(tiny_shapes.transformer, more, tmp_path / "c", counted, progress=False)
    with pytest.raises(HastenError, match="trajectories: 8 there, 10 now"):
        train_ard(tiny_shapes.transformer, more, tmp_path / "c", replace(cfg, trajectories=10), progress=False)


def test_trajectory_shards_round_trip_and_an_interrupted_run_resumes_without_gaps(tiny_shapes, tmp_path):
    args = dict(n=5, steps=5, keep=2, shard_size=2, batch_size=3, progress=False)
    generate_trajectories(tiny_shapes, tmp_path / "full", **args)
    generate_trajectories(tiny_shapes, tmp_path / "cut", stop_after_shards=1, **args)
    with pytest.raises(HastenError, match="incomplete"):
        load_trajectories(tmp_path / "cut")
    generate_trajectories(tiny_shapes, tmp_path / "cut", **args)  # re-run: continues at shard 1
    full, cut = load_trajectories(tmp_path / "full"), load_trajectories(tmp_path / "cut")
    assert full["seeds"].tolist() == cut["seeds"].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(full["states"], cut["states"]) and full["captions"] == cut["captions"]
    assert full["states"].shape == (5, 3, *tiny_shapes.latent_shape) and full["text"].shape[0] == 5
    # the stored states are the teacher's: noise first, its 5-step output last, the 2-step state between
    noise = torch.stack([torch.randn(tiny_shapes.latent_shape, generator=torch.Generator().manual_seed(i))
                         for i in (2, 3)])
    assert torch.equal(full["states"][2:4, 0], noise)
    final = tiny_shapes(full["captions"][2:4], num_inference_steps=5, latents=noise, output_type="latent").images
    assert torch.equal(full["states"][2:4, -1], final)  # shard 1 = samples 2, 3, run as one batch
    assert kept_indices(5, 2) == [0, 4, 5]
    assert full["sigmas"].tolist() == [1.0, tiny_shapes.scheduler.sigmas[4].item(), 0.0]
    with pytest.raises(HastenError, match="steps=5"):
        generate_trajectories(tiny_shapes, tmp_path / "full", n=5, steps=6, keep=2, shard_size=2, progress=False)
    # the first k samples: those of a run with --n k, cut from the shards that hold them
    first = load_trajectories(tmp_path / "full", first=3)
    assert first["seeds"].tolist() == [0, 1, 2] and first["captions"] == full["captions"][:3]
    assert all(torch.equal(first[k], full[k][:3]) for k in ("states", "text", "pooled"))
    for bad in (0, 6):
        with pytest.raises(HastenError, match=f"holds 5 trajectories: cannot use the first {bad}"):
            load_trajectories(tmp_path / "full", first=bad)
    generate_trajectories(tiny_shapes, tmp_path / "full", **{**args, "n": 6}, stop_after_shards=0)  # grown, not yet run
    with pytest.raises(HastenError, match="shard_00002.safetensors holds 1 of its 2 samples"):
        load_trajectories(tmp_path / "full")  # the manifest says 6; the last shard still holds sample 4 only
    assert load_trajectories(tmp_path / "full", first=4)["seeds"].tolist() == [0, 1, 2, 3]  # shards 0-1 only
    generate_trajectories(tiny_shapes, tmp_path / "full", **{**args, "n": 6})  # more samples: the last shard grows
    assert load_trajectories(tmp_path / "full")["seeds"].tolist() == list(range(6))


def test_a_saved_student_loads_as_a_pipeline_with_the_shapes_call_signature(tiny_shapes, tiny_cond, tmp_path, capsys):
    from hasten import load_pipeline
    from hasten.plans import weights_hash

    noise, text, pooled = tiny_cond
    tiny_shapes.save_pretrained(tmp_path / "teacher")
    student = ARDStudent(tiny_shapes.transformer, SIGMAS, 1, history_gate=True).eval()
    with torch.no_grad():
        for p in student.head_projs[2].parameters():
            p.add_(0.01)  # weights that differ from the teacher's
        student.history_gates.fill_(0.01)  # half-open gates: they must be saved and loaded
        for t in student.state_dict().values():
            t.copy_(t.half().float())  # weights and buffers are stored in float16: make the round trip exact
    save_ard(student, tmp_path / "ard", str(tmp_path / "teacher"), {"guidance_scale": 5.0, "base_vae":
                                                                    weights_hash(tiny_shapes.vae)})
    loaded = load_pipeline(tmp_path / "ard")
    out = loaded(PROMPTS, latents=noise, output_type="latent").images
    assert torch.equal(out, student.sample(noise, text, pooled))
    images = loaded(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=noise, output_type="pt").images
    assert images.shape == (2, 3, 64, 64)
    with pytest.raises(HastenError, match="ARD student samples in 4 steps, not 25"):
        loaded(PROMPTS, num_inference_steps=25)
    with pytest.raises(HastenError, match="guidance"):
        loaded(PROMPTS, guidance_scale=2.0)
    code, stdout, _ = run_cli(capsys, "generate", "--model", str(tmp_path / "ard"), "--prompt", "a red circle",
                              "--per-label", "1", "--out", str(tmp_path / "g.png"), "--json")
    assert code == 0 and json.loads(stdout)["steps"] == 4 and json.loads(stdout)["nfe"] == 4
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "ard"), "--prompt", "a red circle",
                           "--steps", "10", "--out", str(tmp_path / "g.png"))
    assert code == 2 and "samples in 4 steps, not 10" in err
    cfg = json.loads((tmp_path / "ard" / "ard_config.json").read_text())
    for bad, match in (({"sigmas": None}, "bad sigmas or layers_with_history"),
                       ({"layers_with_history": None}, "bad sigmas or layers_with_history"),
                       ({"sigmas": cfg["sigmas"][::-1]}, "must decrease within")):
        (tmp_path / "ard" / "ard_config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(HastenError, match=match):
            load_ard(tmp_path / "ard")
    (tmp_path / "ard" / "ard_config.json").write_text(json.dumps({**cfg, "base_vae": "0" * 16}))
    with pytest.raises(HastenError, match="latent space"):
        load_ard(tmp_path / "ard")


def test_distill_cli_rejects_bad_input(capsys, tmp_path):
    code, _, err = run_cli(capsys, "distill", "trajectories", "--n", "0", "--out", str(tmp_path / "t"))
    assert code == 2 and err.count("\n") == 1
    code, _, err = run_cli(capsys, "distill", "trajectories", "--n", "4", "--steps", "3", "--keep", "4",
                           "--out", str(tmp_path / "t"))
    assert code == 2 and "--keep" in err
    code, _, err = run_cli(capsys, "distill", "ard", "--data", str(tmp_path / "none"), "--layers-with-history", "2",
                           "--out", str(tmp_path / "o"))
    assert code == 2 and "no trajectories" in err
    code, _, err = run_cli(capsys, "distill", "ard", "--data", str(tmp_path / "none"), "--layers-with-history", "2",
                           "--out", str(tmp_path / "o"), "--steps", "10", "--warmup", "11")
    assert code == 2 and "--warmup must be in [0, --steps]" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "distill", "ard", "--data", str(tmp_path / "none"), "--layers-with-history", "2",
                           "--out", str(tmp_path / "o"), "--loss-space", "eps")
    assert code == 2 and "--loss-space must be state or x0" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "distill", "ard", "--data", str(tmp_path / "none"), "--layers-with-history", "2",
                           "--out", str(tmp_path / "o"), "--convention", "eps")
    assert code == 2 and "--convention must be state or x0" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "distill", "add-x0", "--data", str(tmp_path / "none"))
    assert code == 2 and "no trajectories" in err and err.count("\n") == 1


def test_a_student_joins_the_bench_as_a_hasten_configuration(tiny_shapes, tmp_path):
    from hasten import load_pipeline
    from hasten.eval.bench_harness import DenoiserTimer, WorkCounter
    from hasten.eval.bench_shapes import EvalSet, student_configs
    from hasten.plans import weights_hash

    tiny_shapes.save_pretrained(tmp_path / "teacher")
    save_ard(ARDStudent(tiny_shapes.transformer, SIGMAS, 1), tmp_path / "ard", str(tmp_path / "teacher"),
             {"guidance_scale": 5.0, "base_vae": weights_hash(tiny_shapes.vae)})
    student = load_pipeline(tmp_path / "ard")
    data = EvalSet(student, 3, seed=0)
    cfg, = student_configs(student, data)  # one step count
    assert cfg.family == "hasten" and cfg.params["steps"] == 4 and cfg.params["layers_with_history"] == 1
    assert cfg.params["convention"] == "state"
    prepared = cfg.setup()
    counter = WorkCounter(prepared.transformer)
    images = prepared.sample(torch.arange(3), None)
    assert images.shape == (3, 3, 64, 64) and counter.rows == 3 * 4  # 4 one-branch passes per image
    clock = DenoiserTimer(prepared.denoiser, time.perf_counter)
    prepared.sample(torch.arange(3), None)
    assert clock.seconds > 0  # the bench times the student's passes as its denoiser
    # image i of noise seed 0 starts from trajectory i's noise: a student trained on them is refused there (the
    # bench records it as the row's error) and runs at the shapes bench's default seed 1
    student.student_config = {**student.student_config, "trajectories": 3}
    with pytest.raises(HastenError, match="trained on"):
        student_configs(student, data)[0].setup()
    student_configs(student, EvalSet(student, 3, seed=1))[0].setup()


def test_own_history_inputs_are_the_students_own_states_without_gradient(tiny_shapes, tiny_cond):
    noise, text, pooled = tiny_cond
    states, sigmas = teacher_states(tiny_shapes, PROMPTS, noise, 5, kept_indices(5, 4))
    student = ARDStudent(tiny_shapes.transformer, sigmas.tolist(), 1)
    none = own_history_inputs(student, states, text, pooled, torch.tensor([False, False]))
    assert torch.equal(none, states[:, :-1])  # no row chosen: teacher forcing
    with count_block_calls(student.transformer) as counts:
        mixed = own_history_inputs(student, states, text, pooled, torch.tensor([False, True]))
    assert counts == [student.steps] * len(student.transformer.transformer_blocks)  # K cached passes, once
    _, own = student.sample(noise[1:], text[1:], pooled[1:], return_states=True)
    assert torch.equal(mixed[0], states[0, :-1]) and torch.equal(mixed[1], own[0, :-1])
    assert torch.equal(mixed[1, 0], noise[1]) and not mixed.requires_grad


def test_own_history_training_samples_the_student_and_init_starts_from_a_saved_student(tiny_shapes, tiny_cond,
                                                                                        tmp_path):
    from hasten.plans import weights_hash

    data = trajectory_data(tiny_shapes, tiny_cond, copies=2)
    base = dict(steps=2, batch_size=4, lr=1e-3, warmup=1, layers_with_history=1, checkpoint_every=2,
                log_every=1, bf16_autocast=False)
    sampled = []
    original = ARDStudent.sample
    ARDStudent.sample = lambda self, *a, **k: sampled.append(a[0].shape[0]) or original(self, *a, **k)
    try:
        forced = train_ard(tiny_shapes.transformer, data, tmp_path / "tf", ARDConfig(**base), progress=False)
        assert sampled == []  # own_history = 0: the paper's teacher forcing, no sampling
        own = train_ard(tiny_shapes.transformer, data, tmp_path / "own", ARDConfig(**base, own_history=1.0),
                        progress=False)
        assert sampled == [4, 4]  # every row of both steps on the student's own history
    finally:
        ARDStudent.sample = original
    assert forced["loss_curve"][1]["loss"] != own["loss_curve"][1]["loss"]
    vae = weights_hash(tiny_shapes.vae)
    save_ard(own["student"], tmp_path / "saved", "shapes", {"base_vae": vae})
    again = train_ard(tiny_shapes.transformer, data, tmp_path / "init", ARDConfig(**{**base, "lr": 1e-12},
                      init=str(tmp_path / "saved")), progress=False, vae_hash=vae)
    for p, q in zip(own["student"].parameters(), again["student"].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-3)  # float16 storage; lr ~ 0
    with pytest.raises(HastenError, match="history gate False"):
        train_ard(tiny_shapes.transformer, data, tmp_path / "gated", ARDConfig(**base, history_gate=True,
                  init=str(tmp_path / "saved")), progress=False, vae_hash=vae)
    with pytest.raises(HastenError, match="N = 1"):
        train_ard(tiny_shapes.transformer, data, tmp_path / "n2", ARDConfig(**{**base, "layers_with_history": 2},
                  init=str(tmp_path / "saved")), progress=False, vae_hash=vae)
    with pytest.raises(HastenError, match="not an ARD student of this teacher"):  # another latent space
        train_ard(tiny_shapes.transformer, data, tmp_path / "vae", ARDConfig(**base, init=str(tmp_path / "saved")),
                  progress=False, vae_hash="0" * 16)
    with pytest.raises(HastenError, match="must be in"):
        train_ard(tiny_shapes.transformer, data, tmp_path / "bad", ARDConfig(**base, own_history=1.5), progress=False)


def test_evaluation_noise_must_not_be_a_training_trajectorys():
    """Trajectory i starts from noise seed i, and evaluation image i from noise_seed * 1_000_003 + i: seed 0
    reuses the students' training noise and is refused; seed 1 is past any trajectory count below 1,000,003."""
    from types import SimpleNamespace

    from hasten.distill.trajectories import check_eval_noise

    students = [SimpleNamespace(student_config={"trajectories": 10000}), SimpleNamespace()]
    with pytest.raises(HastenError, match="trained on"):
        check_eval_noise(0, students)
    check_eval_noise(1, students)


def strip_x0(folder) -> None:
    """Rewrite a trajectory folder's shards without their x0-predictions (a folder from before they were stored)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for f in sorted(folder.glob("shard_*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors, meta = {k: h.get_tensor(k) for k in h.keys() if k != "x0"}, h.metadata()
        save_file(tensors, str(f), metadata=meta)


def test_stored_x0_predictions_are_the_teachers_and_add_x0_fills_an_old_folder(tiny_shapes, tmp_path):
    """Every step kept: each stored x0 = x - sigma v is the prediction the teacher's own next Euler step used
    (x_{k+1} = x_k + (sigma_{k+1} - sigma_k) (x_k - x0_k) / sigma_k, within float32 rounding); ``add-x0`` on a
    folder without them computes the same values (other batches: within 1e-5) and resumes by shard."""
    from hasten.distill.trajectories import add_x0_predictions

    args = dict(n=5, steps=4, keep=4, shard_size=2, batch_size=3, progress=False)
    generate_trajectories(tiny_shapes, tmp_path / "new", **args)
    new = load_trajectories(tmp_path / "new")
    st, x0, s = new["states"], new["x0"], new["sigmas"].view(1, -1, 1, 1, 1)
    assert x0.shape == (5, 4, *tiny_shapes.latent_shape)
    v = (st[:, :-1] - x0) / s[:, :-1]
    torch.testing.assert_close(st[:, :-1] + (s[:, 1:] - s[:, :-1]) * v, st[:, 1:], atol=1e-5, rtol=0)
    generate_trajectories(tiny_shapes, tmp_path / "old", **args)
    strip_x0(tmp_path / "old")
    assert "x0" not in load_trajectories(tmp_path / "old")
    assert add_x0_predictions(tiny_shapes, tmp_path / "old", batch_size=2, first=3, progress=False) == 2  # shards 0-1
    assert "x0" in load_trajectories(tmp_path / "old", first=4) and "x0" not in load_trajectories(tmp_path / "old")
    assert add_x0_predictions(tiny_shapes, tmp_path / "old", progress=False, stop_after_shards=0) == 0
    assert add_x0_predictions(tiny_shapes, tmp_path / "old", progress=False) == 1  # the one left
    old = load_trajectories(tmp_path / "old")
    torch.testing.assert_close(old["x0"], x0, atol=1e-5, rtol=0)
    assert torch.equal(old["states"], st) and old["captions"] == new["captions"]
    with pytest.raises(HastenError, match="cannot use the first 9"):
        add_x0_predictions(tiny_shapes, tmp_path / "old", first=9, progress=False)


def test_an_x0_convention_student_reads_x0_predictions_and_starts_from_the_teachers(tiny_shapes, tiny_cond, tmp_path):
    """The re-implementation's convention: inputs (noise, x0_1, x0_2, x0_3), targets (x0_1, x0_2, x0_3, final).
    Exactness: the fresh N = 0 student's first group is the teacher's conditional x0-prediction from the noise,
    bitwise; the later groups read their input at sigma_d / 8. A student is refused data without x0, another
    convention's weights, and the x0 loss weighting."""
    from hasten.distill.ard import X0_LABEL_SCALE

    noise, text, pooled = tiny_cond
    data = trajectory_data(tiny_shapes, tiny_cond, copies=2)
    data["x0"] = torch.randn(4, 4, *tiny_shapes.latent_shape, generator=torch.Generator().manual_seed(3))
    student = ARDStudent(tiny_shapes.transformer, SIGMAS, 0, convention="x0").eval()
    inputs, targets = student.teacher_forced(data["states"], data["x0"])
    assert torch.equal(inputs[:, 0], data["states"][:, 0]) and torch.equal(inputs[:, 1:], data["x0"][:, 1:])
    assert torch.equal(targets[:, :3], data["x0"][:, 1:]) and torch.equal(targets[:, 3], data["states"][:, -1])
    assert student.labels.tolist() == pytest.approx([1.0] + [s * X0_LABEL_SCALE for s in SIGMAS[1:-1]])
    _, outs = student.sample(noise, text, pooled, return_states=True)
    with torch.no_grad():
        v = tiny_shapes.transformer(hidden_states=noise, timestep=torch.full((2,), 1000.0), encoder_hidden_states=text,
                             pooled_projections=pooled, return_dict=False)[0]
    assert torch.equal(outs[:, 1], noise - v)
    with pytest.raises(HastenError, match="x0 loss space weights a state-convention"):
        student.loss(data["states"], data["text"], data["pooled"], space="x0", x0=data["x0"])
    with pytest.raises(HastenError, match="pass x0"):
        student.loss(data["states"], data["text"], data["pooled"])
    cfg = ARDConfig(steps=2, batch_size=2, lr=1e-3, warmup=1, layers_with_history=1, checkpoint_every=2,
                    log_every=1, bf16_autocast=False, convention="x0")
    run = train_ard(tiny_shapes.transformer, data, tmp_path / "x0", cfg, progress=False)
    assert run["finished"] and run["student"].convention == "x0"
    no_x0 = {k: v for k, v in data.items() if k != "x0"}
    with pytest.raises(HastenError, match="hold none"):
        train_ard(tiny_shapes.transformer, no_x0, tmp_path / "y", cfg, progress=False)
    with pytest.raises(HastenError, match="--convention must be state or x0"):
        ARDStudent(tiny_shapes.transformer, SIGMAS, 0, convention="eps")


def test_an_x0_student_saves_loads_and_refuses_to_start_from_a_state_student(tiny_shapes, tiny_cond, tmp_path):
    from hasten import load_pipeline
    from hasten.distill.ard import start_from
    from hasten.plans import weights_hash

    noise, text, pooled = tiny_cond
    tiny_shapes.save_pretrained(tmp_path / "teacher")
    vae = weights_hash(tiny_shapes.vae)
    student = ARDStudent(tiny_shapes.transformer, SIGMAS, 1, convention="x0").eval()
    with torch.no_grad():
        for t in student.state_dict().values():
            t.copy_(t.half().float())  # stored in float16: make the round trip exact
    save_ard(student, tmp_path / "x0", str(tmp_path / "teacher"), {"guidance_scale": 5.0, "base_vae": vae})
    loaded = load_pipeline(tmp_path / "x0")
    assert loaded.student.convention == "x0"
    assert torch.equal(loaded(PROMPTS, latents=noise, output_type="latent").images,
                       student.sample(noise, text, pooled))
    save_ard(ARDStudent(tiny_shapes.transformer, SIGMAS, 1), tmp_path / "state", str(tmp_path / "teacher"),
             {"guidance_scale": 5.0, "base_vae": vae})
    with pytest.raises(HastenError, match="convention state there"):
        start_from(ARDStudent(tiny_shapes.transformer, SIGMAS, 1, convention="x0"), tmp_path / "state", vae)
