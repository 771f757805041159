"""Imagine Flash (backward distillation, Shifted Reconstruction Loss, noise correction): the formulas, the
student's exactness, what the teacher sees during training, resumable training and loading, on a tiny
text-to-image stack."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch

from hasten import HastenError
from hasten.data.shapes import sample_scene
from hasten.distill.flash import (
    FlashConfig,
    FlashStudent,
    eps_from_v,
    flash_batch,
    flash_loss,
    flow_ddim_step,
    load_flash,
    renoise,
    sample_ddim_eps,
    save_flash,
    srl_gamma,
    student_sigmas,
    teacher_denoise,
    teacher_velocity,
    teacher_x0,
    train_flash,
)
from hasten.pipelines.shapes import encode_text
from hasten.testing import TINY_PROMPTS as PROMPTS
from hasten.testing import run_cli, teacher_euler
from hasten.testing_pipelines import count_block_calls


@pytest.fixture(scope="module")
def empty(tiny_shapes):
    return encode_text(tiny_shapes.text_encoder, tiny_shapes.tokenizer, [""], warn=False)


def capture_inputs(transformer):
    """Record (hidden_states, grad enabled) of every call of ``transformer``; returns (calls, hook handle)."""
    calls = []

    def hook(_module, _args, kwargs):
        calls.append((kwargs["hidden_states"].detach().clone(), torch.is_grad_enabled()))

    return calls, transformer.register_forward_pre_hook(hook, with_kwargs=True)


# --------------------------------------------------------------------------- formulas
def test_schedules_are_uniform_in_sigma_and_only_one_to_three_steps():
    assert student_sigmas(1) == [1.0, 0.0]
    assert student_sigmas(2) == [1.0, 0.5, 0.0]
    assert student_sigmas(3) == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    for bad in (0, 4):
        with pytest.raises(HastenError):
            student_sigmas(bad)


def test_the_srl_shift_is_monotone_below_the_input_level_and_never_pure_noise():
    s = torch.linspace(0, 1, 101)
    tau = srl_gamma(s)
    assert torch.all(tau[1:] > tau[:-1])  # monotone: structure at high sigma, details at low sigma
    assert torch.all(tau <= s)  # the teacher never sees more noise than the student's input had
    assert srl_gamma(1.0) == pytest.approx(0.8) and srl_gamma(1.0) < 1.0  # keeps some of the student's x0
    assert srl_gamma(0.0) == 0.0
    assert srl_gamma(0.5, 0.1, 0.7) == pytest.approx(0.4)  # tau_min + (tau_max - tau_min) sigma
    for lo, hi in ((0.0, 1.0), (0.5, 0.4), (-0.1, 0.5)):
        with pytest.raises(HastenError):
            srl_gamma(0.5, lo, hi)


# --------------------------------------------------------------------------- noise correction
def gaussian_toy(alpha_T: float = 0.3, dim: int = 4096):
    """Data x0 ~ N(mu, s^2 I) under x_t = alpha_t x0 + sigma_t eps (variance preserving): the posterior means
    E[eps | x_t] and E[x0 | x_t] are linear in x_t, so a perfect epsilon predictor is a formula."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    s = 0.7
    alphas = [alpha_T, 0.6, 0.9, 1.0]  # K = 3 steps, ending at the data
    sigmas = [math.sqrt(1 - a * a) for a in alphas]

    def var(i):
        return alphas[i] ** 2 * s ** 2 + sigmas[i] ** 2

    def eps_star(x, i):  # E[eps | x_t]
        return sigmas[i] * (x - alphas[i] * mu) / var(i)

    def x0_star(x, i):  # E[x0 | x_t], computed directly (not through eps)
        return mu + alphas[i] * s ** 2 * (x - alphas[i] * mu) / var(i)

    x_T = torch.randn(dim, generator=g, dtype=torch.float64)  # inference starts from pure noise
    return alphas, sigmas, eps_star, x0_star, x_T


def test_on_a_gaussian_the_corrected_first_step_is_exact_for_a_perfect_predictor():
    """With the analytic eps-prediction, the noise-corrected first step is exactly the DDIM transition of the
    trajectory whose noise is the known x_T: alpha_1 E[x0 | x_T] + sigma_1 x_T. The uncorrected step is off by
    the bias sigma_1 (E[eps | x_T] - x_T), given in closed form; it vanishes as alpha_T -> 0 (zero terminal
    SNR, where eps is x_T itself: the flow-matching case below)."""
    alphas, sigmas, eps_star, x0_star, x_T = gaussian_toy()
    corrected = sample_ddim_eps(eps_star, x_T, alphas, sigmas, noise_correction=True)
    plain = sample_ddim_eps(eps_star, x_T, alphas, sigmas, noise_correction=False)
    exact = alphas[1] * x0_star(x_T, 0) + sigmas[1] * x_T
    torch.testing.assert_close(corrected[1], exact, rtol=1e-12, atol=1e-12)
    bias = sigmas[1] * (eps_star(x_T, 0) - x_T)
    torch.testing.assert_close(plain[1] - exact, bias, rtol=1e-9, atol=1e-12)
    assert bias.norm() > 0.1 * x_T.norm()  # a real difference at alpha_T = 0.3
    sizes = []
    for a_T in (0.3, 0.1, 0.01, 0.0):
        al, sg, eps, _, x = gaussian_toy(a_T)
        sizes.append(float((sg[1] * (eps(x, 0) - x)).norm()))
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 0.0


def test_noise_correction_changes_only_the_first_step():
    """Corrected and plain DDIM differ at step 1; from the corrected state the plain sampler continues
    exactly as the corrected one did (an imperfect predictor, so nothing cancels)."""
    alphas, sigmas, eps_star, _, x_T = gaussian_toy()

    def eps_fn(x, i):
        return eps_star(x, i) * 0.9 + 0.05 * torch.sin(x)

    corrected = sample_ddim_eps(eps_fn, x_T, alphas, sigmas, noise_correction=True)
    plain = sample_ddim_eps(eps_fn, x_T, alphas, sigmas, noise_correction=False)
    assert torch.equal(corrected[0], plain[0]) and not torch.allclose(corrected[1], plain[1])
    resumed = sample_ddim_eps(lambda x, i: eps_fn(x, i + 1), corrected[1], alphas[1:], sigmas[1:],
                              noise_correction=False)
    for a, b in zip(corrected[1:], resumed):
        assert torch.equal(a, b)


def test_for_the_velocity_model_noise_correction_is_the_identity(tiny_shapes, tiny_cond):
    """Flow matching at sigma = 1: the implied noise x + (1 - sigma) v is x_T for ANY v, so replacing it by the
    known noise changes nothing (bitwise); the DDIM step is Euler's up to rounding."""
    noise, text, pooled = tiny_cond
    for v in (torch.randn(noise.shape, generator=torch.Generator().manual_seed(5)) * 100,
              tiny_shapes.transformer(hidden_states=noise, timestep=torch.full((2,), 1000.0),
                                      encoder_hidden_states=text, pooled_projections=pooled,
                                      return_dict=False)[0].detach()):
        assert torch.equal(eps_from_v(noise, v, 1.0), noise)
        for s_next in (0.0, 0.5, 2 / 3):
            corrected = flow_ddim_step(noise, v, 1.0, s_next, noise=noise)
            assert torch.equal(corrected, flow_ddim_step(noise, v, 1.0, s_next))
            torch.testing.assert_close(corrected, noise + (s_next - 1.0) * v, rtol=1e-6, atol=1e-4)
    # away from sigma = 1 the substitution would matter: it is defined for the first step only
    assert not torch.equal(eps_from_v(noise, v, 0.5), noise)


# --------------------------------------------------------------------------- the student
@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_fresh_student_is_the_teachers_conditional_branch_taking_k_euler_steps_bitwise(tiny_shapes, tiny_cond, k):
    noise, text, pooled = tiny_cond
    student = FlashStudent(tiny_shapes.transformer).eval()
    assert torch.equal(student.sample(noise, text, pooled, steps=k),
                       teacher_euler(tiny_shapes, noise, text, pooled, student_sigmas(k)))


def test_the_student_runs_k_passes_of_the_blocks(tiny_shapes, tiny_cond):
    noise, text, pooled = tiny_cond
    student = FlashStudent(tiny_shapes.transformer).eval()
    for k in (1, 2, 3):
        with count_block_calls(student.transformer) as counts:
            student.sample(noise, text, pooled, steps=k)
        assert counts == [k] * len(counts)
    with count_block_calls(tiny_shapes.transformer) as counts:
        tiny_shapes(PROMPTS, num_inference_steps=25, latents=noise, output_type="latent")
    assert counts == [25] * len(counts)  # the teacher: 25 guided calls (both branches per call)


# --------------------------------------------------------------------------- the losses
def small_batch(tiny_shapes, cfg, ks, ds):
    batch = flash_batch(tiny_shapes, 0, cfg, torch.Generator().manual_seed(1))
    batch["ks"], batch["ds"] = torch.tensor(ks), torch.tensor(ds)
    return batch


def test_backward_inputs_are_the_students_own_states_without_gradient_and_the_teacher_sees_them(tiny_shapes, empty):
    cfg = FlashConfig(batch_size=3, srl=False, bf16_autocast=False)
    student = FlashStudent(tiny_shapes.transformer).train().requires_grad_(True)
    batch = small_batch(tiny_shapes, cfg, [3, 3, 3], [2, 2, 2])
    t_calls, th = capture_inputs(tiny_shapes.transformer)
    s_calls, sh = capture_inputs(student.transformer)
    try:
        loss, parts = flash_loss(student, tiny_shapes.transformer, batch, cfg, empty, 5.0)
    finally:
        th.remove()
        sh.remove()
    x = parts["inputs"]
    assert not x.requires_grad and x.grad_fn is None and parts["x0"].requires_grad
    assert [g for _, g in s_calls] == [False, False, True]  # two backward steps without gradient, then the loss
    _, states = student.sample(batch["noise"], batch["text"], batch["pooled"], steps=3, return_states=True)
    assert torch.equal(x, states[:, 2])  # the state after 2 of the student's own 3 steps from pure noise
    assert torch.equal(parts["sigma"], torch.full((3,), 1 / 3))
    assert torch.equal(s_calls[-1][0], x)  # the student is trained on it ...
    (seen, grad), = t_calls
    assert not grad and torch.equal(seen[:3], x) and torch.equal(seen[3:], x)  # ... and the teacher (both branches)
    loss.backward()
    assert all(p.grad is None for p in tiny_shapes.transformer.parameters())


def test_mixed_rows_each_follow_their_own_schedule(tiny_shapes, empty):
    cfg = FlashConfig(batch_size=4, srl=False, bf16_autocast=False)
    student = FlashStudent(tiny_shapes.transformer).eval()
    batch = small_batch(tiny_shapes, cfg, [1, 2, 3, 3], [0, 1, 1, 2])
    with torch.no_grad():
        _, parts = flash_loss(student, tiny_shapes.transformer, batch, cfg, empty, 5.0)
    assert torch.equal(parts["inputs"][0], batch["noise"][0])  # d = 0: pure noise
    torch.testing.assert_close(parts["sigma"], torch.tensor([1.0, 0.5, 2 / 3, 1 / 3]))
    for i, (k, d) in enumerate([(2, 1), (3, 1), (3, 2)], start=1):
        _, states = student.sample(batch["noise"][i:i + 1], batch["text"][i:i + 1], batch["pooled"][i:i + 1],
                                   steps=k, return_states=True)
        torch.testing.assert_close(parts["inputs"][i], states[0, d], rtol=0, atol=1e-5)


@pytest.mark.parametrize("srl_noise", ["trajectory", "fresh"])
def test_the_srl_target_is_the_teachers_denoising_of_the_renoised_prediction_under_stop_gradient(
        tiny_shapes, empty, srl_noise):
    cfg = FlashConfig(batch_size=3, bf16_autocast=False, srl_noise=srl_noise)
    student = FlashStudent(tiny_shapes.transformer).train().requires_grad_(True)
    batch = small_batch(tiny_shapes, cfg, [1, 2, 3], [0, 1, 2])
    t_calls, th = capture_inputs(tiny_shapes.transformer)
    try:
        loss, parts = flash_loss(student, tiny_shapes.transformer, batch, cfg, empty, 5.0)
    finally:
        th.remove()
    torch.testing.assert_close(parts["tau"], srl_gamma(parts["sigma"]))
    (seen, grad), = t_calls
    eps = batch["noise"] if srl_noise == "trajectory" else batch["srl_noise"]  # the sample's own start noise
    want = renoise(parts["x0"].detach(), eps, parts["tau"])
    assert not grad and torch.equal(seen[:3], want) and torch.equal(seen[3:], want)
    target = parts["target"]
    assert not target.requires_grad and target.grad_fn is None
    (g,) = torch.autograd.grad(loss, parts["x0"], retain_graph=True)
    torch.testing.assert_close(g, 2 * (parts["x0"] - target).detach() / target.numel())  # target held fixed
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_the_teachers_denoising_in_one_step_is_its_x0_and_in_m_steps_its_guided_euler_solve(tiny_shapes, empty):
    cfg = FlashConfig(batch_size=3, bf16_autocast=False)
    batch = small_batch(tiny_shapes, cfg, [1, 2, 3], [0, 1, 2])
    x, sigma = batch["noise"], torch.tensor([0.8, 0.4, 0.2])
    args = (batch["text"], batch["pooled"], empty, 5.0)
    one = teacher_denoise(tiny_shapes.transformer, x, sigma, 1, *args)
    assert torch.equal(one, teacher_x0(tiny_shapes.transformer, x, sigma, *args))
    calls, h = capture_inputs(tiny_shapes.transformer)
    try:
        got = teacher_denoise(tiny_shapes.transformer, x, sigma, 3, *args)
    finally:
        h.remove()
    assert len(calls) == 3  # one guided (two-branch) call per step
    want = x.clone()
    for i in range(3):  # row by row, scalar levels: Euler on sigma_i = sigma (1 - i / 3)
        for r in range(3):
            s0, s1 = float(sigma[r]) * (1 - i / 3), float(sigma[r]) * (1 - (i + 1) / 3)
            v = teacher_velocity(tiny_shapes.transformer, want[r:r + 1], torch.tensor([s0]), batch["text"][r:r + 1],
                                 batch["pooled"][r:r + 1], empty, 5.0)
            want[r:r + 1] = want[r:r + 1] + (s1 - s0) * v
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    cfg3 = FlashConfig(batch_size=3, bf16_autocast=False, teacher_steps=3)
    student = FlashStudent(tiny_shapes.transformer).eval()
    with torch.no_grad():
        _, parts = flash_loss(student, tiny_shapes.transformer, batch, cfg3, empty, 5.0)
        x_tau = renoise(parts["x0"], batch["noise"], parts["tau"])
        assert torch.equal(parts["target"], teacher_denoise(tiny_shapes.transformer, x_tau, parts["tau"], 3, *args))
    for bad in (dict(teacher_steps=0), dict(srl_noise="other")):
        with pytest.raises(HastenError):
            FlashConfig(**bad).check()


def test_a_guidance_interval_guides_the_rows_inside_it_and_gives_the_conditional_velocity_outside(tiny_shapes, empty):
    """--cfg-interval lo,hi: per row, CFG where lo < sigma <= hi (GuidanceInterval's rule), v_c elsewhere;
    (0, 1] is plain CFG bitwise."""
    cfg = FlashConfig(batch_size=3, bf16_autocast=False)
    batch = small_batch(tiny_shapes, cfg, [1, 2, 3], [0, 1, 2])
    x, sigma = batch["noise"], torch.tensor([0.9, 0.5, 0.2])
    args = (batch["text"], batch["pooled"], empty)
    guided = teacher_velocity(tiny_shapes.transformer, x, sigma, *args, 5.0)
    plain = teacher_velocity(tiny_shapes.transformer, x, sigma, *args, 1.0)
    assert torch.equal(teacher_velocity(tiny_shapes.transformer, x, sigma, *args, 5.0, (0.0, 1.0)), guided)
    got = teacher_velocity(tiny_shapes.transformer, x, sigma, *args, 5.0, (0.2, 0.84))
    assert torch.equal(got[1], guided[1])  # 0.2 < 0.5 <= 0.84: guided
    torch.testing.assert_close(got[[0, 2]], plain[[0, 2]], rtol=0, atol=1e-5)  # 0.9 above, 0.2 not above lo
    assert not torch.allclose(guided[0], plain[0], atol=1e-3)  # the rows outside really changed
    one = teacher_denoise(tiny_shapes.transformer, x, sigma, 1, *args, 5.0, (0.2, 0.84))
    assert torch.equal(one, teacher_x0(tiny_shapes.transformer, x, sigma, *args, 5.0, (0.2, 0.84)))
    cfg_i = FlashConfig(batch_size=3, bf16_autocast=False, teacher_steps=2, guidance_interval=(0.2, 0.84))
    student = FlashStudent(tiny_shapes.transformer).eval()
    with torch.no_grad():
        _, parts = flash_loss(student, tiny_shapes.transformer, batch, cfg_i, empty, 5.0)
        x_tau = renoise(parts["x0"], batch["noise"], parts["tau"])
        assert torch.equal(parts["target"], teacher_denoise(tiny_shapes.transformer, x_tau, parts["tau"], 2, *args, 5.0,
                                                            (0.2, 0.84)))
    for bad in ((0.5, 0.5), (-0.1, 0.8), (0.2, 1.1)):
        with pytest.raises(HastenError, match="--cfg-interval"):
            FlashConfig(guidance_interval=bad).check()


def test_the_forward_ablation_noises_the_captions_data_latents(tiny_shapes, empty):
    cfg = FlashConfig(batch_size=2, backward=False, srl=False, bf16_autocast=False)
    student = FlashStudent(tiny_shapes.transformer).eval()
    batch = small_batch(tiny_shapes, cfg, [3, 2], [2, 1])
    assert batch["x0"].shape == (2, *tiny_shapes.latent_shape)
    with torch.no_grad():
        _, parts = flash_loss(student, tiny_shapes.transformer, batch, cfg, empty, 5.0)
    torch.testing.assert_close(parts["inputs"], renoise(batch["x0"], batch["noise"], torch.tensor([1 / 3, 0.5])))


# --------------------------------------------------------------------------- training, saving, loading
def test_training_lowers_the_loss_and_resumes_exactly(tiny_shapes, empty, tmp_path):
    """The loss on a fixed batch of unseen captions (held-out for this run: step 10_000's) drops after a few
    steps, with SRL (whose fresh-noise target keeps a floor) and without; a resumed run is the same run."""
    held = flash_batch(tiny_shapes, 10_000, FlashConfig(batch_size=16), torch.Generator().manual_seed(7))

    def held_loss(student, cfg):
        with torch.no_grad():
            return flash_loss(student, tiny_shapes.transformer, held, cfg, empty, 5.0)[0].item()

    cfg = FlashConfig(steps=6, batch_size=4, lr=1e-3, warmup=1, checkpoint_every=2, log_every=1,
                      bf16_autocast=False)
    straight = train_flash(tiny_shapes, tmp_path / "a", cfg, progress=False)
    curve = [c["loss"] for c in straight["loss_curve"]]
    assert len(curve) == 6 and straight["finished"]
    assert held_loss(straight["student"], cfg) < 0.98 * held_loss(FlashStudent(tiny_shapes.transformer), cfg)
    plain = dataclasses.replace(cfg, srl=False)
    trained = train_flash(tiny_shapes, tmp_path / "c", plain, progress=False)["student"]
    assert held_loss(trained, plain) < 0.7 * held_loss(FlashStudent(tiny_shapes.transformer), plain)
    train_flash(tiny_shapes, tmp_path / "b", cfg, progress=False, stop_after=3)
    resumed = train_flash(tiny_shapes, tmp_path / "b", cfg, progress=False)
    assert resumed["finished"] and [c["loss"] for c in resumed["loss_curve"]] == curve
    for p, q in zip(straight["student"].parameters(), resumed["student"].parameters()):
        assert torch.equal(p, q)
    with pytest.raises(HastenError, match="other settings"):
        train_flash(tiny_shapes, tmp_path / "b", FlashConfig(steps=7), progress=False)


def test_a_saved_student_loads_as_a_pipeline_with_the_shapes_call_signature(tiny_shapes, tiny_cond, tmp_path, capsys):
    from hasten import load_pipeline
    from hasten.distill.flash import ShapesFlashPipeline
    from hasten.plans import weights_hash

    noise, text, pooled = tiny_cond
    tiny_shapes.save_pretrained(tmp_path / "teacher")
    student = FlashStudent(tiny_shapes.transformer).eval()
    with torch.no_grad():
        for p in student.transformer.proj_out.parameters():
            p.add_(0.01)  # weights that differ from the teacher's
        for t in student.state_dict().values():
            t.copy_(t.half().float())  # stored in float16: make the round trip exact
    save_flash(student, tmp_path / "flash", str(tmp_path / "teacher"),
               {"guidance_scale": 5.0, "base_vae": weights_hash(tiny_shapes.vae)})
    loaded = load_pipeline(tmp_path / "flash")
    assert isinstance(loaded, ShapesFlashPipeline) and loaded.num_steps == 3
    assert torch.equal(loaded(PROMPTS, latents=noise, output_type="latent").images,
                       student.sample(noise, text, pooled, steps=3))
    for k in (1, 2):
        out = loaded(PROMPTS, num_inference_steps=k, guidance_scale=5.0, latents=noise, output_type="latent").images
        assert torch.equal(out, student.sample(noise, text, pooled, steps=k))
    assert loaded(PROMPTS, latents=noise, output_type="pt").images.shape == (2, 3, 64, 64)
    for bad in (4, 0, 25):
        with pytest.raises(HastenError, match="1, 2 or 3 steps"):
            loaded(PROMPTS, num_inference_steps=bad)
    with pytest.raises(HastenError, match="guidance"):
        loaded(PROMPTS, guidance_scale=2.0)
    code, stdout, _ = run_cli(capsys, "generate", "--model", str(tmp_path / "flash"), "--prompt", "a red circle",
                              "--steps", "1", "--out", str(tmp_path / "g.png"), "--json")
    assert code == 0 and json.loads(stdout)["steps"] == 1 and json.loads(stdout)["nfe"] == 1
    cfg = json.loads((tmp_path / "flash" / "flash_config.json").read_text())
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float16 for t in load_file(str(tmp_path / "flash" / "student.safetensors")).values())
    assert cfg["step_counts"] == [1, 2, 3] and cfg["sigmas"]["2"] == [1.0, 0.5, 0.0]
    (tmp_path / "flash" / "flash_config.json").write_text(json.dumps({**cfg, "base_vae": "0" * 16}))
    with pytest.raises(HastenError, match="latent space"):
        load_flash(tmp_path / "flash")


def test_step_draw_picks_counts_or_every_step_equally_often(tiny_shapes):
    """'count': K uniform, then d uniform in [0, K) (the last step of 3 gets 1/9 of the rows); 'step': every
    (K, d) pair 1/6 of the rows, so each step of the 3-step schedule trains as often as the 1-step one."""
    n = 6000
    for draw, want in (("count", {(1, 0): 1 / 3, (2, 1): 1 / 6, (3, 2): 1 / 9}),
                       ("step", {(1, 0): 1 / 6, (2, 1): 1 / 6, (3, 2): 1 / 6})):
        cfg = FlashConfig(batch_size=n, step_draw=draw)
        gen = torch.Generator().manual_seed(0)
        counts = torch.tensor([1, 2, 3])
        # only the draw of (K, d), without encoding 6000 captions: the same code path on a stub pipeline
        batch = flash_batch(_NoText(tiny_shapes), 0, cfg, gen)
        ks, ds = batch["ks"], batch["ds"]
        assert torch.isin(ks, counts).all() and (ds >= 0).all() and (ds < ks).all()
        for (k, d), p in want.items():
            share = ((ks == k) & (ds == d)).float().mean().item()
            assert abs(share - p) < 0.02, (draw, k, d, share)
    with pytest.raises(HastenError, match="--step-draw"):
        FlashConfig(step_draw="other").check()


def test_caption_offset_moves_a_stage_onto_captions_no_earlier_stage_saw(tiny_shapes):
    """Step s of a run with ``caption_offset=k`` trains on the captions of step s + k / batch of a run
    without it (and only its captions move: the step's other randomness is the same)."""
    from hasten.distill.flash import CAPTION_SEED0

    b = 4
    plain = flash_batch(_NoText(tiny_shapes), 3, FlashConfig(batch_size=b), torch.Generator().manual_seed(0))
    moved = flash_batch(_NoText(tiny_shapes), 1, FlashConfig(batch_size=b, caption_offset=2 * b),
                        torch.Generator().manual_seed(0))
    assert moved["captions"] == plain["captions"]
    assert moved["captions"] == [sample_scene(CAPTION_SEED0 + 2 * b + b + i).caption for i in range(b)]
    again = flash_batch(_NoText(tiny_shapes), 1, FlashConfig(batch_size=b), torch.Generator().manual_seed(0))
    assert again["captions"] != moved["captions"] and torch.equal(again["noise"], moved["noise"])
    for bad in (-1, 10_000_000):
        with pytest.raises(HastenError, match="caption-offset"):
            FlashConfig(batch_size=b, caption_offset=bad).check()


class _NoText:
    """A pipeline stand-in for :func:`flash_batch` whose text encoder returns zeros (shape only)."""

    def __init__(self, tiny_shapes):
        self.latent_shape = tiny_shapes.latent_shape

    def encode_prompt(self, prompts, dtype):
        return torch.zeros(len(prompts), 1, 1, dtype=dtype), torch.zeros(len(prompts), 1, dtype=dtype)


def test_init_starts_from_a_saved_students_weights_and_refuses_others(tiny_shapes, tmp_path):
    from hasten.distill.flash import init_weights
    from hasten.plans import weights_hash

    tiny_shapes.save_pretrained(tmp_path / "teacher")
    first = FlashStudent(tiny_shapes.transformer).eval()
    with torch.no_grad():
        for t in first.state_dict().values():
            t.add_(0.01).copy_(t.half().float())  # weights that differ from the teacher's, exact in float16
    save_flash(first, tmp_path / "first", str(tmp_path / "teacher"),
               {"guidance_scale": 5.0, "base_vae": weights_hash(tiny_shapes.vae)})
    cfg = FlashConfig(steps=1, batch_size=2, lr=1e-12, warmup=1, ema_decay=0.0, bf16_autocast=False,
                      init=str(tmp_path / "first"))
    second = train_flash(tiny_shapes, tmp_path / "second", cfg, progress=False)["student"]
    for p, q in zip(first.parameters(), second.parameters()):  # one step at lr 1e-12 moves nothing visible
        torch.testing.assert_close(p, q, rtol=0, atol=1e-8)
    fresh = FlashStudent(tiny_shapes.transformer)
    with pytest.raises(HastenError, match="not an Imagine Flash student of this teacher"):
        init_weights(fresh, tmp_path / "first", "0" * 16)
    with pytest.raises(HastenError, match="not an Imagine Flash student folder"):
        init_weights(fresh, tmp_path / "teacher", weights_hash(tiny_shapes.vae))
    with pytest.raises(HastenError, match="not an Imagine Flash student of this teacher"):
        init_weights(fresh, "shapes-flash", weights_hash(tiny_shapes.vae))  # the embedded name resolves: other VAE


def test_a_flash_student_joins_the_bench_at_each_of_its_step_counts(tiny_shapes, tmp_path):
    from hasten import load_pipeline
    from hasten.eval.bench_harness import DenoiserTimer, WorkCounter
    from hasten.eval.bench_shapes import EvalSet, student_configs
    from hasten.plans import weights_hash

    tiny_shapes.save_pretrained(tmp_path / "teacher")
    save_flash(FlashStudent(tiny_shapes.transformer, (1, 3)), tmp_path / "flash", str(tmp_path / "teacher"),
               {"guidance_scale": 5.0, "base_vae": weights_hash(tiny_shapes.vae)})
    student = load_pipeline(tmp_path / "flash")
    data = EvalSet(student, 2, seed=0)
    cfgs = student_configs(student, data)
    assert [c.params["steps"] for c in cfgs] == [1, 3] and all(c.family == "hasten" for c in cfgs)
    prepared = cfgs[1].setup()
    counter = WorkCounter(prepared.transformer)
    clock = DenoiserTimer(prepared.denoiser, time.perf_counter)
    images = prepared.sample(torch.arange(2), None)
    assert images.shape == (2, 3, 64, 64) and counter.rows == 2 * 3  # 3 one-branch passes per image
    assert clock.seconds > 0  # the bench times the student's transformer passes as its denoiser


def test_imagine_flash_cli_rejects_bad_input(capsys, tmp_path):
    for args, why in ((["--steps", "4"], "--steps"), (["--steps", "0"], "--steps"),
                      (["--train-steps", "0"], "--train-steps"), (["--lr", "0"], "--lr"),
                      (["--teacher-steps", "0"], "--teacher-steps"), (["--srl-noise", "x"], "--srl-noise"),
                      (["--tau-max", "1"], "--tau-max"), (["--step-draw", "x"], "--step-draw"),
                      (["--tau-min", "0.9"], "--tau-min"), (["--cfg", "0.5"], "--cfg"),
                      (["--caption-offset", "-1"], "--caption-offset"), (["--cfg-interval", "0.8"], "--cfg-interval"),
                      (["--cfg-interval", "0.9,0.2"], "--cfg-interval")):
        code, _, err = run_cli(capsys, "distill", "imagine-flash", *args, "--out", str(tmp_path / "o"))
        assert code == 2 and err.count("\n") == 1 and why in err
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(capsys, "distill", "imagine-flash", "--out", str(tmp_path / "file"))
    assert code == 2 and "not a folder" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "distill", "imagine-flash", "--teacher", str(tmp_path / "none"),
                           "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown model" in err and err.count("\n") == 1


def test_the_cli_trains_a_loadable_resumable_student(tiny_shapes, tiny_cond, tmp_path, capsys):
    from hasten import load_pipeline

    noise = tiny_cond[0]
    tiny_shapes.save_pretrained(tmp_path / "teacher")
    args = ("distill", "imagine-flash", "--teacher", str(tmp_path / "teacher"), "--steps", "2", "--train-steps", "2",
            "--batch-size", "2", "--forward", "--no-srl", "--teacher-steps", "2", "--srl-noise", "fresh",
            "--tau-max", "0.6", "--step-draw", "step", "--out", str(tmp_path / "flash"), "--json")
    code, stdout, _ = run_cli(capsys, *args)
    log = json.loads(stdout)
    assert code == 0 and log["finished"] and log["train_config"]["step_counts"] == [1, 2]
    tc = log["train_config"]
    assert not tc["backward"] and not tc["srl"] and tc["teacher_steps"] == 2 and tc["srl_noise"] == "fresh"
    assert tc["tau_max"] == 0.6
    saved = json.loads((tmp_path / "flash" / "flash_config.json").read_text())
    assert (saved["teacher_steps"], saved["srl_noise"], saved["tau_max"], saved["step_draw"]) == (2, "fresh", 0.6,
                                                                                                   "step")
    loaded = load_pipeline(tmp_path / "flash")
    assert loaded.num_steps == 2 and loaded.student.step_counts == (1, 2)
    assert loaded(PROMPTS, latents=noise, output_type="latent").images.shape == noise.shape
    with pytest.raises(HastenError, match="1 or 2 steps"):
        loaded(PROMPTS, num_inference_steps=3)
    code, stdout, _ = run_cli(capsys, *args)  # re-running finds the finished checkpoint: nothing to redo
    assert code == 0 and json.loads(stdout)["loss_curve"] == log["loss_curve"]
