"""ARD's GAN fine-tune (hasten.distill.ard_gan): the discriminator on the frozen teacher's blocks, the adaptive
weight, exactness before the adversarial term starts, and resuming with the discriminator's state."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from hasten import HastenError
from hasten.distill.ard import ARDConfig, train_ard
from hasten.distill.ard_gan import TeacherDiscriminator, adaptive_weight
from hasten.distill.trajectories import kept_indices, teacher_states
from hasten.testing import TINY_PROMPTS, run_cli


@pytest.fixture(scope="module")
def data(tiny_shapes, tiny_cond):
    noise, text, pooled = tiny_cond
    states, sigmas = teacher_states(tiny_shapes, TINY_PROMPTS, noise, 5, kept_indices(5, 4))
    return {"states": states.repeat(2, 1, 1, 1, 1), "text": text.repeat(2, 1, 1), "pooled": pooled.repeat(2, 1),
            "sigmas": sigmas}


@pytest.fixture(scope="module")
def real(tiny_shapes, tiny_cond):
    """Stand-ins for rendered scenes: random latents, each with one of the two captions."""
    _, text, pooled = tiny_cond
    lat = torch.randn(6, *tiny_shapes.latent_shape, generator=torch.Generator().manual_seed(3))
    return {"latents": lat, "index": torch.tensor([0, 1, 0, 1, 0, 1]), "text": text, "pooled": pooled}


CFG = ARDConfig(steps=3, batch_size=4, lr=1e-3, warmup=1, layers_with_history=1, checkpoint_every=1, log_every=1,
                bf16_autocast=False)


def test_the_discriminator_reads_every_teacher_block_and_owns_only_its_heads(tiny_shapes, tiny_cond):
    noise, text, pooled = tiny_cond
    teacher = copy.deepcopy(tiny_shapes.transformer)
    disc = TeacherDiscriminator(teacher)
    blocks = len(teacher.transformer_blocks)
    assert len(disc.heads) == blocks
    assert {n.split(".")[0] for n, _ in disc.named_parameters()} == {"heads"}  # the teacher is not its parameter
    x = noise.clone().requires_grad_(True)
    logits = disc(x, text, pooled, torch.Generator().manual_seed(0))
    tokens = (noise.shape[-1] // teacher.config.patch_size) ** 2
    assert logits.shape == (2, blocks * tokens)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator's gradient reaches the fake
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen
    assert all(p.grad is not None for p in disc.parameters())


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    mse, adv = (w ** 2).sum(), 3 * w.sum()  # gradients (2, 4) and (3, 3)
    expected = torch.tensor([2.0, 4.0]).norm() / (torch.tensor([3.0, 3.0]).norm() + 1e-4)
    assert torch.allclose(adaptive_weight(mse, adv, w), expected)
    assert not adaptive_weight(mse, adv, w).requires_grad


def test_before_gan_start_the_student_is_plain_ard_bitwise_and_only_the_discriminator_trains(
        tiny_shapes, data, real, tmp_path):
    plain = train_ard(tiny_shapes.transformer, data, tmp_path / "plain", CFG, progress=False)
    late = train_ard(tiny_shapes.transformer, data, tmp_path / "late", replace(CFG, gan_weight=1.0, gan_start=10),
                     progress=False, real=real)
    for p, q in zip(plain["student"].parameters(), late["student"].parameters()):
        assert torch.equal(p, q)
    state = torch.load(tmp_path / "late" / "checkpoints" / "student.pt", weights_only=False)
    assert all(s["step"] == 3 for s in state["extra"]["gan"]["opt"]["state"].values())  # 3 discriminator updates


def test_the_adversarial_term_changes_the_student_through_the_frozen_teacher(tiny_shapes, data, real, tmp_path):
    teacher = copy.deepcopy(tiny_shapes.transformer)
    before = copy.deepcopy(teacher.state_dict())
    calls = []  # the modules called (the student's deep copies of the blocks carry the hook too)
    hooks = [b.register_forward_hook(lambda m, *_: calls.append(m)) for b in teacher.transformer_blocks]

    def teacher_calls() -> int:
        return sum(any(m is b for b in teacher.transformer_blocks) for m in calls)

    plain = train_ard(teacher, data, tmp_path / "plain", CFG, progress=False)
    n_plain = teacher_calls()
    gan = train_ard(teacher, data, tmp_path / "gan", replace(CFG, gan_weight=1.0), progress=False, real=real)
    for h in hooks:
        h.remove()
    # per step the teacher runs on the real batch, the detached fake and the fake again (the generator's term)
    assert n_plain == 0 and teacher_calls() == 3 * CFG.steps * len(teacher.transformer_blocks)
    assert any(not torch.equal(p, q) for p, q in zip(plain["student"].parameters(), gan["student"].parameters()))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_a_gan_run_resumes_to_the_same_student_and_bad_settings_are_refused(tiny_shapes, data, real, tmp_path,
                                                                           capsys):
    cfg = replace(CFG, steps=4, gan_weight=0.5)
    straight = train_ard(tiny_shapes.transformer, data, tmp_path / "a", cfg, progress=False, real=real)
    train_ard(tiny_shapes.transformer, data, tmp_path / "b", cfg, progress=False, real=real, stop_after=2)
    resumed = train_ard(tiny_shapes.transformer, data, tmp_path / "b", cfg, progress=False, real=real)
    assert [c["loss"] for c in resumed["loss_curve"]] == [c["loss"] for c in straight["loss_curve"]]
    assert resumed["gan_curve"] == straight["gan_curve"] and len(straight["gan_curve"]) == 4
    assert {"mse", "d_loss", "g_loss", "weight"} <= set(straight["gan_curve"][-1])
    assert [c["loss"] for c in straight["loss_curve"]] == pytest.approx(
        [c["mse"] + c["weight"] * c["g_loss"] for c in straight["gan_curve"]], rel=1e-4, abs=1e-6)
    for p, q in zip(straight["student"].parameters(), resumed["student"].parameters()):
        assert torch.equal(p, q)
    with pytest.raises(HastenError, match="needs real latents"):
        train_ard(tiny_shapes.transformer, data, tmp_path / "c", cfg, progress=False)
    with pytest.raises(HastenError, match="--gan-weight and --gan-start must be >= 0"):
        train_ard(tiny_shapes.transformer, data, tmp_path / "d", replace(cfg, gan_weight=-1.0), progress=False,
                  real=real)
    code, _, err = run_cli(capsys, "distill", "ard", "--data", str(tmp_path), "--layers-with-history", "1",
                           "--out", str(tmp_path / "e"), "--gan-weight", "-1")
    assert code == 2 and "--gan-weight" in err and err.count("\n") == 1


def test_the_cli_runs_a_gan_fine_tune_into_a_loadable_student(tiny_shapes, tmp_path, capsys):
    import json

    from hasten import load_pipeline

    teacher = str(tmp_path / "teacher")
    tiny_shapes.save_pretrained(teacher)
    code, _, err = run_cli(capsys, "distill", "trajectories", "--teacher", teacher, "--n", "4", "--steps", "5",
                           "--keep", "4", "--out", str(tmp_path / "traj"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "distill", "ard", "--teacher", teacher, "--data", str(tmp_path / "traj"),
                           "--layers-with-history", "1", "--out", str(tmp_path / "gan"), "--steps", "2",
                           "--batch-size", "2", "--warmup", "1", "--gan-weight", "0.5", "--gan-scenes", "4")
    assert code == 0, err
    log = json.loads((tmp_path / "gan" / "train_log.json").read_text())
    assert log["train_config"]["gan_weight"] == 0.5 and log["gan_curve"] == []  # log_every 25 > 2 steps
    config = json.loads((tmp_path / "gan" / "ard_config.json").read_text())
    assert config["gan_weight"] == 0.5 and config["gan_scenes"] == 4
    pipe = load_pipeline(str(tmp_path / "gan"))
    assert pipe(["a red circle"], output_type="latent").images.shape[0] == 1
