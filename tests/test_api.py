"""The public door: accelerate / calibrate, --accel specs (hasten.specs), the report, the CLI calibrate command."""

from __future__ import annotations

import json

import pytest
import torch

import hasten
from hasten.plans import save_plan
from hasten.specs import accelerate_from_specs, parse_spec
from hasten.testing import run_cli, tiny_dit_pipe

STEPS = 6


def tiny_pipe(seed: int = 0) -> hasten.HastenPipeline:
    return tiny_dit_pipe(guidance_scale=2.0, seed=seed)


def sample(pipe, seed=0, labels=(0, 1, 2)):
    return pipe(list(labels), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed)).images


def test_report_counts_calls_rows_and_nfe():
    pipe = tiny_pipe()
    sched = [[True, False, True, False, True, False]] * 2
    with hasten.accelerate(pipe, hasten.BlockCache(schedule=sched)) as h:
        sample(pipe)
        sample(pipe, labels=(4, 5))
        rep = h.report()
    assert rep["runs"] == 2 and rep["calls"] == 2 * STEPS
    assert rep["nfe"] == 2 * STEPS  # CFG: 2 rows per sample per call, averaged over runs
    assert rep["rows_sent"] == STEPS * 2 * 3 + STEPS * 2 * 2
    assert rep["wall_s"] > 0 and rep["transformer_s"] > 0
    bc = rep["methods"]["block-cache"]
    assert bc["computed"] == [6, 6] and bc["reused"] == [6, 6] and bc["block_evals_skipped"] == 0.5
    assert bc["tokens_computed"] == 6 * 2 * (2 * 3 * 16 + 2 * 2 * 16) // 2  # rows x 16 tokens per computed eval
    assert [e["block_cache"] for e in rep["log"][:3]] == ["CC", "RR", "CC"]
    assert json.loads(json.dumps(rep)) == rep  # JSON-ready (hasten generate --json)


def test_no_methods_is_a_plain_counting_handle():
    pipe = tiny_pipe()
    ref = sample(pipe)
    with hasten.accelerate(pipe) as h:
        out = sample(pipe)
        assert h.report()["nfe"] == 2 * STEPS
    assert torch.equal(out, ref)


def test_diffusers_pipeline_target_uses_its_transformer_and_resets_on_set_timesteps():
    class FakeScheduler:
        def set_timesteps(self, n):
            self.timesteps = torch.linspace(999, 0, n)

    class FakePipeline:  # the two attributes hasten uses on a diffusers pipeline
        def __init__(self, transformer):
            self.transformer = transformer
            self.scheduler = FakeScheduler()

        def __call__(self, seed):
            self.scheduler.set_timesteps(4)
            x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
            for t in self.scheduler.timesteps:
                x = x - 0.25 * self.transformer(x, timestep=t.expand(2), class_labels=torch.tensor([1, 2])).sample
            return x

    pipe = tiny_pipe()
    fp = FakePipeline(pipe.transformer)
    ref = fp(0)
    with hasten.accelerate(fp, hasten.BlockCache(schedule=[[True, False, False, True]] * 2)) as h:
        assert h.kind == "diffusers" and h.transformer is pipe.transformer
        fp(0)
        fp(0)
        rep = h.report()
    assert rep["runs"] == 2 and [e["call"] for e in rep["log"]] == [0, 1, 2, 3] * 2
    assert "set_timesteps" not in fp.scheduler.__dict__
    assert torch.equal(fp(0), ref)


def test_parse_spec_and_unknown_specs():
    assert parse_spec("block-cache:delta=0.5,plan=p.json") == ("block-cache", {"delta": "0.5", "plan": "p.json"})
    assert parse_spec(" ag :threshold=0.99") == ("ag", {"threshold": "0.99"})
    with pytest.raises(hasten.HastenError, match="'threshold' twice"):
        parse_spec("ag:threshold=0.9,threshold=0.99")
    pipe = tiny_pipe()
    with pytest.raises(hasten.HastenError, match="unknown method"):
        accelerate_from_specs(pipe, ["warp-drive:x=1"], steps=STEPS)
    with pytest.raises(hasten.HastenError, match="key=value"):
        accelerate_from_specs(pipe, ["block-cache:delta"], steps=STEPS)
    with pytest.raises(hasten.HastenError, match="unknown block-cache option"):
        accelerate_from_specs(pipe, ["block-cache:speed=9"], steps=STEPS)
    with pytest.raises(hasten.HastenError, match="plan=PATH or delta"):
        accelerate_from_specs(pipe, ["block-cache"], steps=STEPS)
    with pytest.raises(hasten.HastenError, match="delta must be a number"):
        accelerate_from_specs(pipe, ["block-cache:delta=big"], steps=STEPS)
    with pytest.raises(hasten.HastenError, match="delta must be a finite number >= 0"):
        accelerate_from_specs(pipe, ["block-cache:delta=-1"], steps=STEPS)
    assert "forward" not in pipe.transformer.__dict__


def test_specs_plan_and_on_the_fly_calibration(tmp_path):
    pipe = tiny_pipe()
    plan = hasten.calibrate(pipe, hasten.BlockCache(delta=0.5), steps=STEPS, seeds=(1000, 1001))
    path = save_plan(tmp_path / "plan.json", plan)
    h1 = accelerate_from_specs(pipe, [f"block-cache:plan={path}"], steps=STEPS)
    a = sample(pipe)
    h1.disable()
    h2 = accelerate_from_specs(pipe, ["block-cache:delta=0.5"], steps=STEPS)  # same default calibration seeds
    b = sample(pipe)
    h2.disable()
    assert torch.equal(a, b)
    with pytest.raises(hasten.HastenError, match=f"calibrated for {STEPS} steps, not {STEPS + 1}"):
        accelerate_from_specs(pipe, [f"block-cache:plan={path}"], steps=STEPS + 1)
    with pytest.raises(hasten.HastenError, match="heun"):
        accelerate_from_specs(pipe, [f"block-cache:plan={path}"], steps=STEPS, solver="heun")


def test_plot_and_scale_shift_training(tmp_path):
    from safetensors.torch import load_file

    from hasten.methods.block_cache import plot
    from hasten.scale_shift import train_scale_shift

    pipe = tiny_pipe(3)
    plan = hasten.calibrate(pipe, hasten.BlockCache(delta=0.6), steps=STEPS, seeds=(1, 2))
    png = plot(plan, tmp_path / "change.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    state, info = train_scale_shift(pipe, plan, train_steps=12, lr=1e-3, method="lstsq")
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # only the scale-shift parameters train
    assert all(p.requires_grad for p in pipe.transformer.parameters())  # flags restored
    assert state and any(v.abs().sum() > 0 for v in state.values())  # moved away from the zero init
    assert info["val_loss_after"] < info["val_loss_before"] and info["kept"]
    with hasten.accelerate(pipe, hasten.BlockCache(plan=plan, scale_shift=False)) as h:
        plain = sample(pipe)
    zero = {k: torch.zeros_like(v) for k, v in state.items()}
    with hasten.accelerate(pipe, hasten.BlockCache(plan=plan, scale_shift=zero)) as h:
        assert torch.equal(sample(pipe), plain)  # zero init is the identity
        assert h.report()["methods"]["block-cache"]["scale_shift"]
    # saved beside the plan and found from it
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "plan.scale_shift.safetensors"))
    path = save_plan(tmp_path / "plan.json", dict(plan, scale_shift_file="plan.scale_shift.safetensors"))
    assert set(load_file(str(tmp_path / "plan.scale_shift.safetensors"))) == set(state)
    with hasten.accelerate(pipe, hasten.BlockCache(plan=str(path))) as h:
        aligned = sample(pipe)
        assert h.report()["methods"]["block-cache"]["scale_shift"]
    assert not torch.equal(aligned, plain)


def test_scale_shift_adam_distils_the_output_and_trains_only_its_parameters():
    """The default (paper) trainer: Adam on the velocity MSE against the uncached model."""
    from hasten.scale_shift import train_scale_shift

    pipe = tiny_pipe(3)
    plan = hasten.calibrate(pipe, hasten.BlockCache(delta=0.6), steps=STEPS, seeds=(1, 2))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    state, info = train_scale_shift(pipe, plan, train_steps=40, lr=1e-3)
    assert info["method"] == "adam" and info["trajectories"] >= 2
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    # the held-out velocity error against the uncached model falls (seeded: 0.0026 -> 0.0012 here)
    assert 0 < info["val_loss_after"] < 0.8 * info["val_loss_before"] and info["kept"]
    assert any(v.abs().sum() > 0 for v in state.values())


def _write_tiny_model(folder):
    pipe = tiny_pipe()
    pipe.save_pretrained(folder)
    return folder




def test_cli_calibrate_and_generate(tmp_path, capsys):
    model = _write_tiny_model(tmp_path / "m")
    out = tmp_path / "plan.json"
    code, stdout, err = run_cli(capsys, "calibrate", "--model", str(model), "--method", "block-cache", "--delta",
                                "0.5", "--steps", str(STEPS), "--out", str(out), "--plot", str(tmp_path / "c.png"),
                                "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["calls"] == STEPS and (tmp_path / "c.png").is_file()
    plan = json.loads(out.read_text())
    assert plan["method"] == "block-cache" and len(plan["schedule"]) == 2
    code, stdout, err = run_cli(capsys, "generate", "--model", str(model), "--steps", str(STEPS), "--labels",
                                "0-2", "--per-label", "1", "--accel", f"block-cache:plan={out}", "--out",
                                str(tmp_path / "g.png"), "--json")
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["report"]["methods"]["block-cache"]["computed"] == [sum(m) for m in plan["schedule"]]
    # bad input: one line, exit 2
    for args in (["calibrate", "--model", str(model), "--out", str(out), "--steps", str(STEPS)],  # no delta
                 ["calibrate", "--model", str(model), "--method", "nope", "--out", str(out)],
                 ["calibrate", "--model", str(model), "--delta", "0.5", "--out", str(tmp_path / "no" / "p.json")],
                 ["calibrate", "--model", str(model), "--delta", "0.5", "--seeds", "1", "--out", str(out)],
                 ["generate", "--model", str(model), "--steps", str(STEPS + 1), "--accel", f"block-cache:plan={out}",
                  "--out", str(tmp_path / "g.png")]):
        code, stdout, err = run_cli(capsys, *args)
        assert code == 2, (args, stdout, err)
        assert err.count("\n") == 1 and err.startswith("error:") and "Traceback" not in err


def test_log_is_bounded_and_handle_is_exported():
    pipe = tiny_pipe()
    h = hasten.hooks.attach(pipe, log_limit=4)
    try:
        sample(pipe)
        rep = h.report()
    finally:
        h.disable()
    assert rep["calls"] == STEPS and [e["call"] for e in rep["log"]] == [2, 3, 4, 5]  # the newest 4
    assert hasten.Handle is type(h) and "Handle" in hasten.__all__


def test_nfe_counts_rows_per_sample_for_batched_guidance_without_any_method():
    """A diffusers-style batched CFG call (identical halves) counts 2 per sample, with or without AG."""
    pipe = tiny_pipe()
    tr = pipe.transformer
    x = torch.randn(3, 1, 8, 8)
    with hasten.accelerate(tr) as h, torch.no_grad():
        for t in (900.0, 500.0):
            tr(torch.cat([x, x]), timestep=torch.full((6,), t), class_labels=torch.tensor([10] * 3 + [1, 2, 3]))
        assert h.report()["nfe"] == 4
    with hasten.accelerate(tr) as h, torch.no_grad():
        for t in (900.0, 500.0):  # three different samples: one row each
            tr(torch.randn(3, 1, 8, 8), timestep=torch.full((3,), t), class_labels=torch.tensor([1, 2, 3]))
        assert h.report()["nfe"] == 2


def test_two_guidance_methods_together_are_refused(tmp_path):
    pipe = tiny_pipe()
    with pytest.raises(hasten.HastenError, match="both shrink the guidance batch"):
        hasten.accelerate(pipe, hasten.AdaptiveGuidance(threshold=0.9), hasten.LinearAG(plan={"x": 1}))
    assert "_diffusers_hook" not in pipe.transformer.__dict__  # nothing was installed
