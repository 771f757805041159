"""Adaptive Guidance and LinearAG on hasten's pipeline: exactness, per-sample NFE, least squares, plans."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from hasten.api import accelerate, calibrate
from hasten.errors import HastenError
from hasten.methods.guidance import (
    REGRESSORS,
    AdaptiveGuidance,
    LinearAG,
    NormalEquations,
    ag_switch,
    cosine_per_sample,
    least_squares,
    linear_ag_design,
    load_linear_ag_plan,
    regress_uncond,
    regressed_calls,
)
from hasten.pipeline import HastenPipeline, cfg_combine, make_schedule, sample_euler
from hasten.plans import check_plan, new_plan, save_plan
from hasten.testing import run_cli

torch.set_num_threads(1)


def tiny_dit(seed: int = 0, layers: int = 2) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                 num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                 norm_type="ada_norm_zero").eval()


@pytest.fixture(scope="module")
def pipe() -> HastenPipeline:
    return HastenPipeline(tiny_dit(), num_classes=10, guidance_scale=3.0)


LABELS = [1, 2, 3, 4]


def sample(pipe: HastenPipeline, steps: int = 8, seed: int = 0, labels=LABELS, **kw):
    return pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kw)


# --------------------------------------------------------------------------- exactness


def test_threshold_above_one_is_bitwise_cfg(pipe):
    ref = sample(pipe)
    with accelerate(pipe, AdaptiveGuidance(threshold=1.5)) as h:
        out = sample(pipe)
        rep = h.report()
    assert torch.equal(out.images, ref.images)
    assert rep["nfe"] == 16.0  # 2 rows per sample on all 8 calls
    assert rep["methods"]["adaptive-guidance"]["uncond_rows_skipped"] == 0
    assert torch.equal(sample(pipe).images, ref.images)  # disabled: back to CFG


def test_threshold_minus_one_is_conditional_only_after_first_step(pipe):
    steps, labels = 8, torch.tensor(LABELS)
    x0 = pipe.initial_noise(len(labels), torch.Generator().manual_seed(0))
    ts = make_schedule("linear", steps)
    counter = {"calls": 0, "rows": 0}
    # reference: one CFG Euler step, then conditional-only Euler steps
    x = sample_euler(pipe.velocity_fn(labels, 3.0, counter), x0, ts[:2])
    x = sample_euler(pipe.velocity_fn(labels, 1.0, counter), x, ts[1:])
    ref = ((x.clamp(-1, 1) + 1) / 2).float()
    assert counter["rows"] == 2 * 4 + 7 * 4
    with accelerate(pipe, AdaptiveGuidance(threshold=-1)) as h:
        out = pipe(LABELS, num_inference_steps=steps, latents=x0)
        rep = h.report()
    assert torch.equal(out.images, ref)
    assert rep["rows_sent"] == counter["rows"]
    assert rep["nfe"] == 2 * 1 + (steps - 1)
    assert rep["methods"]["adaptive-guidance"]["guided_calls_per_sample"] == [1, 1, 1, 1]
    assert rep["methods"]["adaptive-guidance"]["ag_switch_call"] == [1, 1, 1, 1]


def test_cfg_combine_of_switched_slot_is_bitwise_conditional():
    c = torch.randn(64, dtype=torch.float32)
    for s in (1.5, 3.0, 7.5):
        assert torch.equal(cfg_combine(c.clone(), c, s), c)
    c16 = c.half()
    assert torch.equal(cfg_combine(c16.clone(), c16, 4.0), c16)


# --------------------------------------------------------------------------- per-sample NFE, proven by rows


class Cfg(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ScriptedDenoiser(nn.Module):
    """A stand-in transformer with a prescribed gamma per sample: pixel 0 of the latent carries the sample
    id (its velocity is always 0, so it never changes); the conditional output is e1 and the unconditional
    one is at angle 1 rad from it until flow time ``switch_t[id]``, then equal to it (gamma 0.54 -> 1)."""

    def __init__(self, switch_t: list[float], null: int = 10):
        super().__init__()
        self.config = Cfg(in_channels=1, sample_size=4, num_embeds_ada_norm=null, patch_size=2)
        self.switch_t, self.null = switch_t, null
        self.rows_seen: list[list[tuple[int, bool]]] = []

    def forward(self, hidden_states, timestep=None, class_labels=None, return_dict=True):
        ids = hidden_states[:, 0, 0, 0].round().long()
        uncond = class_labels == self.null
        self.rows_seen.append([(int(i), bool(u)) for i, u in zip(ids, uncond, strict=True)])
        out = torch.zeros_like(hidden_states)
        out[:, 0, 0, 1] = 1.0
        t = timestep / 1000.0
        before = t < torch.tensor([self.switch_t[i] for i in ids.tolist()])
        angle = torch.where(uncond & before, 1.0, 0.0)
        out[:, 0, 0, 1] = torch.cos(angle)
        out[:, 0, 0, 2] = torch.sin(angle)
        return Transformer2DModelOutput(sample=out)


def test_nfe_per_sample_with_samples_switching_at_different_steps():
    steps = 10
    # flow times t_j = j / 10: sample s is measured at gamma >= 0.9 first at call j_s, so guided calls
    # k_s = j_s + 1 (the measuring call keeps its guided output): 1, 4, 7 and never (10).
    den = ScriptedDenoiser([0.0, 0.25, 0.55, 2.0])
    pipe = HastenPipeline(den, num_classes=10, guidance_scale=2.0)
    latents = torch.zeros(4, 1, 4, 4)
    latents[:, 0, 0, 0] = torch.arange(4.0)
    with accelerate(pipe, AdaptiveGuidance(threshold=0.9)) as h:
        pipe([0, 1, 2, 3], num_inference_steps=steps, latents=latents)
        rep = h.report()
    ag = rep["methods"]["adaptive-guidance"]
    k = [1, 4, 7, 10]
    assert ag["guided_calls_per_sample"] == k
    assert ag["nfe_per_sample"] == [2 * ki + (steps - ki) for ki in k]
    # what the transformer actually received: one conditional row per sample per call, and an
    # unconditional row exactly on the sample's first k calls
    assert len(den.rows_seen) == steps
    for s, ks in enumerate(k):
        unc = [j for j, rows in enumerate(den.rows_seen) if (s, True) in rows]
        con = [j for j, rows in enumerate(den.rows_seen) if (s, False) in rows]
        assert unc == list(range(ks)) and con == list(range(steps))
    assert rep["rows_sent"] == sum(len(r) for r in den.rows_seen) == sum(ag["nfe_per_sample"])
    assert rep["nfe"] == pytest.approx(sum(ag["nfe_per_sample"]) / 4)


def test_switch_is_sticky_and_per_sample():
    switched = torch.tensor([False, False, True, False])
    measured = ~switched
    gamma = torch.tensor([0.995, 0.5, float("nan"), 0.991], dtype=torch.float64)
    new = ag_switch(switched, measured, gamma, 0.991)
    assert new.tolist() == [True, False, True, True]
    again = ag_switch(new, ~new, torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64), 0.991)
    assert again.tolist() == [True, False, True, True]


def test_cosine_per_sample_matches_definition():
    a, b = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    g = cosine_per_sample(a, b)
    want = torch.stack([torch.dot(a[i].flatten().double(), b[i].flatten().double())
                        / (a[i].double().norm() * b[i].double().norm()) for i in range(3)])
    assert torch.allclose(g, want, atol=1e-12)
    assert float(cosine_per_sample(a, a).min()) == pytest.approx(1.0, abs=1e-12)


def test_bad_threshold_is_a_clear_error():
    with pytest.raises(HastenError, match="threshold"):
        AdaptiveGuidance(threshold="high")
    with pytest.raises(HastenError, match="threshold"):
        AdaptiveGuidance(threshold=float("nan"))


# --------------------------------------------------------------------------- least squares


def test_least_squares_recovers_coefficients_on_linear_data():
    g = torch.Generator().manual_seed(0)
    c, cp, up = (torch.randn(50, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    beta = torch.tensor([0.7, -0.2, 0.45, 0.03], dtype=torch.float64)
    y = beta[0] * c + beta[1] * cp + beta[2] * up + beta[3]
    got = least_squares(linear_ag_design(c, cp, up), y)
    assert torch.allclose(got, beta, atol=1e-10, rtol=0)
    assert torch.allclose(regress_uncond(got.tolist(), c, cp, up), y, atol=1e-10)
    # streaming accumulation over chunks gives the same fit, and R^2 = 1 on exact data
    eq = NormalEquations(len(REGRESSORS))
    for i in range(0, 50, 7):
        eq.add(linear_ag_design(c[i:i + 7], cp[i:i + 7], up[i:i + 7]), y[i:i + 7])
    sol = eq.solve()
    assert torch.allclose(sol, beta, atol=1e-10, rtol=0)
    assert eq.r2(sol) == pytest.approx(1.0, abs=1e-9)


def test_regressed_calls_alternate_in_the_first_half():
    assert regressed_calls(50) == list(range(1, 25, 2))
    assert regressed_calls(10) == [1, 3]
    assert regressed_calls(1) == []


# --------------------------------------------------------------------------- LinearAG


def make_plan(pipe, steps: int, beta, threshold: float = 2.0) -> dict:
    ts = [t * 1000.0 for t in make_schedule("linear", steps)[:-1]]
    coefs = {str(j): list(beta) for j in regressed_calls(steps)}
    return new_plan("linear-ag", pipe.transformer, solver="euler", steps=steps, time_schedule="linear",
                    guidance_scale=3.0, timesteps=ts, regressors=list(REGRESSORS), coefficients=coefs,
                    r2={}, threshold=threshold, trajectories=200)


def test_linear_ag_regressed_calls_send_one_row_and_use_the_regression(pipe):
    steps, labels = 10, torch.tensor(LABELS)
    x0 = pipe.initial_noise(4, torch.Generator().manual_seed(1))
    ts = make_schedule("linear", steps)
    # with beta = (1, 0, 0, 0) the regressed unconditional prediction is the conditional one, so a
    # regressed call is exactly a conditional-only call: CFG on calls 0, 2, 4..9; conditional on 1 and 3
    x = x0
    for j in range(steps):
        scale = 1.0 if j in (1, 3) else 3.0
        x = sample_euler(pipe.velocity_fn(labels, scale, {"calls": 0, "rows": 0}), x, ts[j:j + 2])
    ref = ((x.clamp(-1, 1) + 1) / 2).float()
    with accelerate(pipe, LinearAG(plan=make_plan(pipe, steps, (1.0, 0.0, 0.0, 0.0)))) as h:
        out = pipe(LABELS, num_inference_steps=steps, latents=x0)
        rep = h.report()
    assert torch.equal(out.images, ref)
    assert rep["nfe"] == 2 * steps - 2
    lag = rep["methods"]["linear-ag"]
    assert lag["regressed_calls"] == 2 and lag["guided_calls_per_sample"] == [steps - 2] * 4
    assert lag["ag_switch_call"] == [None] * 4 and lag["nfe_per_sample"] == [2 * steps - 2] * 4


def test_linear_ag_uses_past_estimates(pipe):
    """beta = (0, 0, 1, 0): the regressed unconditional prediction is the previous call's one."""
    steps = 6
    seen = []

    with accelerate(pipe, LinearAG(plan=make_plan(pipe, steps, (0.0, 0.0, 1.0, 0.0)))) as h:
        orig = pipe.transformer.forward

        def spy(*a, **k):
            out = orig(*a, **k)
            seen.append(out.sample.clone())
            return out

        h.set_attr(pipe.transformer, "forward", spy)
        pipe(LABELS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    # the spy sees what the pipeline receives: call 1's unconditional rows equal call 0's
    assert torch.equal(seen[1][:4], seen[0][:4])
    assert not torch.equal(seen[1][4:], seen[0][4:])


def test_calibrate_linear_ag_writes_a_valid_plan(pipe, tmp_path):
    plan = calibrate(pipe, LinearAG(threshold=0.99), labels=list(range(10)) * 10, seeds=[0, 1, 2], steps=6)
    assert plan["method"] == "linear-ag" and plan["trajectories"] == 200 and plan["calls"] == 6
    assert plan["held_out_seeds"] == [2] and plan["seeds"] == [0, 1] and plan["threshold"] == 0.99
    assert set(plan["coefficients"]) == {"1"}
    held = plan["held_out"]["1"]  # the regression's error on trajectories it was not fitted on
    assert 0 < held["rel_err"] < held["rel_err_cond_only"]
    assert all(math.isfinite(v) for v in plan["coefficients"]["1"])
    assert plan["r2"]["1"] > 0.5
    path = save_plan(tmp_path / "lag.json", plan)
    loaded = load_linear_ag_plan(path)
    check_plan(loaded, pipe.transformer, steps=6, solver="euler")
    with accelerate(pipe, LinearAG(plan=path)) as h:
        sample(pipe, steps=6)
        assert h.report()["nfe"] <= 11


def test_calibrate_needs_200_trajectories(pipe):
    with pytest.raises(HastenError, match="200 fitting trajectories"):
        calibrate(pipe, LinearAG(), labels=list(range(10)), seeds=[0, 1], steps=4)
    with pytest.raises(HastenError, match="200 fitting trajectories"):  # 20 seeds: 4 are held out
        calibrate(pipe, LinearAG(), labels=list(range(10)), seeds=list(range(20)), steps=4)


# --------------------------------------------------------------------------- plan errors


def test_plan_for_another_model_is_rejected(pipe):
    plan = make_plan(pipe, 6, (1.0, 0, 0, 0))
    other = HastenPipeline(tiny_dit(layers=3), num_classes=10)
    with pytest.raises(HastenError, match="another model"):
        accelerate(other, LinearAG(plan=plan))


def test_plan_for_other_steps_is_rejected(pipe, tmp_path):
    plan = make_plan(pipe, 6, (1.0, 0, 0, 0))
    with pytest.raises(HastenError, match="6 steps, not 8"):
        check_plan(plan, pipe.transformer, steps=8)
    from hasten.specs import accelerate_from_specs

    path = save_plan(tmp_path / "p.json", plan)
    with pytest.raises(HastenError, match="6 steps, not 8"):
        accelerate_from_specs(pipe, [f"linear-ag:plan={path}"], steps=8)
    # through the Python API the run itself fails at the first call whose timestep differs
    with accelerate(pipe, LinearAG(plan=plan)):
        with pytest.raises(HastenError, match="timestep"):
            sample(pipe, steps=8)


def test_corrupt_plans_give_clear_errors(pipe, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HastenError, match="not valid JSON"):
        accelerate(pipe, LinearAG(plan=bad))
    with pytest.raises(HastenError, match="not found"):
        accelerate(pipe, LinearAG(plan=tmp_path / "missing.json"))
    plan = make_plan(pipe, 6, (1.0, 0, 0, 0))
    plan["coefficients"]["1"] = [1.0, "x", 0, 0]
    p = save_plan(tmp_path / "c.json", plan)
    with pytest.raises(HastenError, match="corrupt"):
        accelerate(pipe, LinearAG(plan=p))
    plan = make_plan(pipe, 6, (1.0, 0, 0, 0))
    plan["method"] = "block-cache"
    p.write_text(json.dumps(plan))
    with pytest.raises(HastenError, match="not a 'linear-ag' plan"):
        accelerate(pipe, LinearAG(plan=p))
    with pytest.raises(HastenError, match="needs a plan"):
        accelerate(pipe, LinearAG())


def test_specs(pipe, tmp_path):
    from hasten.specs import accelerate_from_specs

    h = accelerate_from_specs(pipe, ["ag:threshold=0.5"], steps=4)
    assert h.methods[0].threshold == 0.5
    h.disable()
    with pytest.raises(HastenError, match="unknown option"):
        accelerate_from_specs(pipe, ["ag:thresh=0.5"], steps=4)
    with pytest.raises(HastenError, match="needs plan"):
        accelerate_from_specs(pipe, ["linear-ag"], steps=4)


# --------------------------------------------------------------------------- CLI




def test_cli_generate_with_ag_reports_the_real_nfe(pipe, tmp_path, capsys):
    model = pipe.save_pretrained(tmp_path / "tiny")
    args = ["generate", "--model", str(model), "--labels", "0-3", "--per-label", "1", "--steps", "5",
            "--out", str(tmp_path / "g.png"), "--json"]
    code, out, _ = run_cli(capsys, *args, "--accel", "ag:threshold=-1")
    assert code == 0
    payload = json.loads(out)
    assert payload["nfe"] == 2 + 4
    assert payload["report"]["methods"]["adaptive-guidance"]["nfe_per_sample"] == [6] * 4
    code, _, err = run_cli(capsys, *args, "--accel", "ag:threshold=abc")
    assert code == 2 and err.count("\n") == 1 and "threshold" in err
    code, _, err = run_cli(capsys, *args, "--accel", f"linear-ag:plan={tmp_path / 'none.json'}")
    assert code == 2 and err.count("\n") == 1 and "not found" in err


def test_cli_calibrate_linear_ag(pipe, tmp_path, capsys):
    model = pipe.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "lag.json"
    seeds = ",".join(str(s) for s in range(24))
    code, stdout, _ = run_cli(capsys, "calibrate", "--model", str(model), "--method", "linear-ag", "--steps", "4",
                              "--seeds", seeds, "--min-psnr", "30", "--out", str(out), "--json")
    assert code == 0, stdout
    plan = load_linear_ag_plan(out)
    assert plan["trajectories"] == 200 and plan["steps"] == 4 and set(plan["coefficients"]) == {"1"}
    cal = plan["calibration"]  # the second half's AG threshold was searched for the target
    assert cal["min_psnr_db"] == 30 and cal["met"] and cal["psnr_db"] >= 30
    assert any(e["threshold"] == plan["threshold"] for e in cal["search"])
    code, stdout, _ = run_cli(capsys, "calibrate", "--model", str(model), "--method", "linear-ag", "--steps", "4",
                              "--seeds", seeds, "--threshold", "0.97", "--out", str(out))
    assert code == 0, stdout
    assert load_linear_ag_plan(out)["threshold"] == 0.97
    for bad in (("--method", "linear-ag", "--threshold", "nan"), ("--method", "block-cache", "--threshold", "0.9")):
        code, _, err = run_cli(capsys, "calibrate", "--model", str(model), *bad, "--steps", "4", "--seeds", seeds,
                               "--out", str(tmp_path / "y.json"))
        assert code == 2 and err.count("\n") == 1 and "threshold" in err
        assert not (tmp_path / "y.json").exists()
    code, _, err = run_cli(capsys, "calibrate", "--model", str(model), "--method", "linear-ag", "--steps", "4",
                           "--out", str(tmp_path / "x.json"))
    assert code == 2 and err.count("\n") == 1 and "200 fitting trajectories" in err
    assert not (tmp_path / "x.json").exists()


# --------------------------------------------------------------------------- calibrated AG threshold


def test_calibrated_ag_threshold_meets_its_target_and_is_reproducible(pipe):
    from hasten.methods.guidance import pooled_psnr

    plan = calibrate(pipe, AdaptiveGuidance(min_psnr=30), seeds=[5, 6], steps=6)
    cal = plan["calibration"]
    assert plan["method"] == "ag" and plan["guidance_scale"] == 3.0 and cal["met"]
    assert cal["psnr_db"] >= 30 and cal["nfe"] < 12  # it switches some samples, and keeps the target
    again = calibrate(pipe, AdaptiveGuidance(min_psnr=30), seeds=[5, 6], steps=6)
    assert again["threshold"] == plan["threshold"] and again["calibration"]["search"] == cal["search"]
    # the plan's threshold reproduces the calibration figure on the calibration seeds
    labels = list(range(10))
    ref = torch.cat([sample(pipe, steps=6, seed=s, labels=labels).images for s in (5, 6)])
    with accelerate(pipe, AdaptiveGuidance(plan=plan)) as h:
        imgs = torch.cat([sample(pipe, steps=6, seed=s, labels=labels).images for s in (5, 6)])
        rep = h.report(log=False)
    assert pooled_psnr(imgs, ref) == pytest.approx(cal["psnr_db"], abs=1e-3)
    assert rep["nfe"] == pytest.approx(cal["nfe"], abs=1e-3)
    assert rep["methods"]["adaptive-guidance"]["threshold"] == plan["threshold"]
    # a stricter target switches later (more NFE); an unreachable-by-switching target never switches
    strict = calibrate(pipe, AdaptiveGuidance(min_psnr=60), seeds=[5, 6], steps=6)
    assert strict["calibration"]["nfe"] >= cal["nfe"] and strict["calibration"]["psnr_db"] >= 60


def test_ag_plan_refuses_another_guidance_scale_or_model(pipe, tmp_path):
    plan = calibrate(pipe, AdaptiveGuidance(min_psnr=30), seeds=[5, 6], steps=4)
    path = save_plan(tmp_path / "ag.json", plan)
    with accelerate(pipe, AdaptiveGuidance(plan=path)):
        with pytest.raises(HastenError, match="guidance scale 3, not 2"):
            sample(pipe, steps=4, guidance_scale=2.0)
    other = HastenPipeline(tiny_dit(layers=3), num_classes=10, guidance_scale=3.0)
    with pytest.raises(HastenError, match="another model"):
        accelerate(other, AdaptiveGuidance(plan=path))
    retrained = HastenPipeline(tiny_dit(seed=1), num_classes=10, guidance_scale=3.0)  # same config
    with pytest.raises(HastenError, match="other weights"):
        accelerate(retrained, AdaptiveGuidance(plan=path))
    with pytest.raises(HastenError, match="not both"):
        AdaptiveGuidance(threshold=0.9, plan=path)
    with pytest.raises(HastenError, match="min_psnr"):
        AdaptiveGuidance(min_psnr=-3)


def test_default_ag_uses_the_plan_shipped_with_the_model(pipe, tmp_path):
    from hasten.pipeline import load_pipeline

    folder = pipe.save_pretrained(tmp_path / "m")
    loaded = load_pipeline(folder)
    plan = calibrate(loaded, AdaptiveGuidance(min_psnr=30), seeds=[5, 6], steps=4)
    (folder / "plans").mkdir()
    save_plan(folder / "plans" / "ag-cfg3.json", plan)
    with accelerate(loaded, AdaptiveGuidance()) as h:
        sample(loaded, steps=4)
        rep = h.report(log=False)["methods"]["adaptive-guidance"]
    assert rep["threshold"] == plan["threshold"] and rep["threshold_source"].endswith("ag-cfg3.json")
    with accelerate(loaded, AdaptiveGuidance()):
        with pytest.raises(HastenError, match="no calibrated threshold for this model at guidance 2"):
            sample(loaded, steps=4, guidance_scale=2.0)
    save_plan(folder / "plans" / "ag-unknown.json", {**plan, "guidance_scale": None})  # a run of unknown scale
    with accelerate(loaded, AdaptiveGuidance()):
        with pytest.raises(HastenError, match=r"guidance 2 \(shipped: 3\)"):  # skipped, not a TypeError
            sample(loaded, steps=4, guidance_scale=2.0)


def test_shipped_digits_plans_match_the_shipped_model():
    from hasten.pipeline import load_pipeline
    from hasten.plans import shipped_plans

    digits = load_pipeline("digits")
    ag = {p["guidance_scale"]: p for p in shipped_plans(digits, "ag", digits.transformer)}
    assert sorted(ag) == [digits.default_guidance_scale, 3.0]  # the model's default and strong guidance
    for p in ag.values():
        assert p["calibration"]["met"] and p["calibration"]["psnr_db"] >= 35 and p["calibration"]["nfe"] < 100
    for gs in ag:
        with accelerate(digits, AdaptiveGuidance()) as h:
            digits([0, 1], num_inference_steps=2, guidance_scale=gs, generator=torch.Generator().manual_seed(0))
            assert h.report(log=False)["methods"]["adaptive-guidance"]["threshold"] == ag[gs]["threshold"]
    lag = shipped_plans(digits, "linear-ag", digits.transformer)
    assert len(lag) == 1 and lag[0]["calibration"]["psnr_db"] >= 35


def test_shipped_shapes_ag_plan_matches_the_shipped_model():
    """``AdaptiveGuidance()`` on ``shapes`` at its shipped guidance: the plan calibrated for these weights."""
    from hasten.pipeline import load_pipeline
    from hasten.plans import shipped_plans

    shapes = load_pipeline("shapes")
    ag = shipped_plans(shapes, "ag", shapes.transformer)
    assert [p["guidance_scale"] for p in ag] == [shapes.default_guidance_scale]
    assert ag[0]["calibration"]["met"] and ag[0]["calibration"]["psnr_db"] >= 35


def test_switch_decisions_are_logged_per_sample_and_call(pipe):
    with accelerate(pipe, AdaptiveGuidance(threshold=-1)) as h:
        sample(pipe, steps=3)
        log = h.report()["log"]
    first, second = log[0]["adaptive-guidance"], log[1]["adaptive-guidance"]
    assert len(first["gamma"]) == len(LABELS) and all(g is not None for g in first["gamma"])
    assert first["switched_after"] == [True] * len(LABELS)
    assert second["uncond_rows"] == 0 and "gamma" not in second  # nothing measured once all switched


def test_two_batch_shrinking_guidance_methods_are_refused(pipe):
    plan = make_plan(pipe, 6, (1.0, 0, 0, 0))
    with pytest.raises(HastenError, match="both shrink the guidance batch"):
        accelerate(pipe, AdaptiveGuidance(threshold=0.9), LinearAG(plan=plan))
