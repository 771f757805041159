"""Foundation: schedules, solvers, CFG, save/load, bad input."""

import json
import math

import pytest
import torch
from diffusers import DiTTransformer2DModel

from hasten import HastenError, HastenPipeline, load_pipeline
from hasten.pipeline import (
    cfg_combine,
    linear_quadratic_schedule,
    linear_schedule,
    make_schedule,
    sample_euler,
    sample_heun,
)
from hasten.testing import tiny_dit_pipe


def tiny_pipe(seed: int = 0) -> HastenPipeline:
    pipe = tiny_dit_pipe(head_dim=8, guidance_scale=2.0, seed=seed, norm_num_groups=16)
    pipe.name = "tiny"
    return pipe


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("steps", [2, 3, 10, 25, 50, 51])
def test_linear_quadratic_schedule_shape_and_linear_half(steps):
    ts = linear_quadratic_schedule(steps)
    n = 5 * steps
    assert len(ts) == steps + 1
    assert ts[0] == 0.0 and ts[-1] == 1.0
    assert all(b > a for a, b in zip(ts[:-1], ts[1:])), "schedule must be strictly increasing"
    for i in range(steps // 2 + 1):  # first half: the N-step linear schedule exactly
        assert ts[i] == i / n
    # the step size is continuous where the quadratic part starts (Mochi/Movie Gen construction)
    half = steps // 2
    if steps - half >= 2:
        assert math.isclose(ts[half + 1] - ts[half], 1 / n + (ts[half + 2] - 2 * ts[half + 1] + ts[half]) / 2,
                            rel_tol=1e-9)


def test_linear_quadratic_matches_diffusers_mochi():
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule as mochi

    steps, n = 50, 250
    sigmas = mochi(steps, threshold_noise=(steps // 2) / n)  # sigma = 1 - t, without the final 0
    ours = linear_quadratic_schedule(steps, n)
    for s, t in zip(sigmas, ours[:-1]):
        assert math.isclose(1 - s, t, abs_tol=1e-12)


def test_linear_quadratic_emulating_s_steps_is_linear():
    assert linear_quadratic_schedule(10, 10) == pytest.approx(linear_schedule(10), abs=1e-12)


def test_schedule_errors():
    with pytest.raises(HastenError, match="steps"):
        make_schedule("linear", 0)
    with pytest.raises(HastenError, match="unknown schedule"):
        make_schedule("cosine", 10)
    with pytest.raises(HastenError, match="emulated"):
        linear_quadratic_schedule(10, 5)


# ----------------------------------------------------------------------------- solvers
def test_euler_is_exact_on_constant_velocity():
    v = torch.tensor([0.5, -2.0, 3.0])
    x0 = torch.tensor([1.0, 2.0, 3.0])
    x1 = sample_euler(lambda x, t: v, x0, linear_quadratic_schedule(7))
    assert torch.allclose(x1, x0 + v, atol=1e-6)


def test_euler_is_exact_for_straight_flow_matching_paths():
    # The optimal velocity for a single data point X1: v(x, t) = (X1 - x) / (1 - t) (sigma_min = 0);
    # Euler follows the straight line exactly on any grid.
    target = torch.tensor([0.3, -0.7])
    x = torch.tensor([1.5, 2.0])
    ts = linear_schedule(5)
    out = sample_euler(lambda x, t: (target - x) / (1 - t), x, ts)
    assert torch.allclose(out, target, atol=1e-6)


def test_heun_is_second_order():
    # dx/dt = -x * cos(t): exact x(1) = x0 * exp(-sin(1)).
    f = lambda x, t: -x * math.cos(t)  # noqa: E731
    x0 = torch.tensor([1.0], dtype=torch.float64)
    exact = math.exp(-math.sin(1.0))
    errs = {}
    for solver in (sample_euler, sample_heun):
        e1 = abs(solver(f, x0, linear_schedule(20)).item() - exact)
        e2 = abs(solver(f, x0, linear_schedule(40)).item() - exact)
        errs[solver.__name__] = e1 / e2
    assert 1.8 < errs["sample_euler"] < 2.2  # first order: halving h halves the error
    assert 3.6 < errs["sample_heun"] < 4.4  # second order: halving h quarters it


def test_cfg_scale_one_is_conditional():
    u, c = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    assert torch.equal(cfg_combine(u, c, 1.0), c)
    assert torch.allclose(cfg_combine(u, c, 3.0), u + 3 * (c - u))


def test_pipeline_scale_one_equals_conditional_prediction():
    pipe = tiny_pipe()
    labels = torch.tensor([1, 2, 3])
    x = torch.randn(3, 1, 8, 8)
    counter = {"calls": 0, "rows": 0}
    v = pipe.velocity_fn(labels, 1.0, counter)(x, 0.3)
    direct = pipe.transformer(x, timestep=torch.full((3,), 300.0), class_labels=labels).sample
    assert torch.equal(v, direct)
    assert counter == {"calls": 1, "rows": 3}


# ----------------------------------------------------------------------------- pipeline
def test_pipeline_cfg_batches_both_branches_in_one_call():
    pipe = tiny_pipe()
    out = pipe([0, 1, 2, 3], num_inference_steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (4, 1, 8, 8)
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.transformer_calls == 5 and out.nfe == 10
    heun = pipe([0, 1], num_inference_steps=5, solver="heun", generator=torch.Generator().manual_seed(0))
    assert heun.transformer_calls == 10 and heun.nfe == 20


def test_pipeline_is_deterministic_given_seed():
    pipe = tiny_pipe()
    a = pipe([3, 4], num_inference_steps=4, generator=torch.Generator().manual_seed(7)).images
    b = pipe([3, 4], num_inference_steps=4, generator=torch.Generator().manual_seed(7)).images
    assert torch.equal(a, b)


def test_save_load_roundtrip_is_bitwise(tmp_path):
    pipe = tiny_pipe()
    pipe.save_pretrained(tmp_path / "m")
    loaded = load_pipeline(tmp_path / "m")
    for (ka, a), (kb, b) in zip(pipe.transformer.state_dict().items(), loaded.transformer.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    kw = dict(num_inference_steps=3, schedule="linear-quadratic")
    a = pipe([5, 6], generator=torch.Generator().manual_seed(1), **kw).images
    b = loaded([5, 6], generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.equal(a, b)
    assert loaded.default_guidance_scale == 2.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(class_labels=[10]), "out of range"),
    (dict(class_labels=[-1]), "out of range"),
    (dict(class_labels=[1], num_inference_steps=0), "steps"),
    (dict(class_labels=[1], guidance_scale=-1.0), "guidance"),
    (dict(class_labels=[1], solver="rk4"), "solver"),
    (dict(class_labels=[1], schedule="cosine"), "schedule"),
    (dict(class_labels=[1], guidance_scale=float("inf")), "finite"),
    (dict(class_labels=[1, 2], latents=torch.zeros(3, 1, 16, 16)), "latents must have shape"),
])
def test_pipeline_bad_input(kwargs, match):
    with pytest.raises(HastenError, match=match):
        tiny_pipe()(**kwargs)


def test_load_errors(tmp_path):
    with pytest.raises(HastenError, match="unknown model.*digits"):
        load_pipeline("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HastenError, match="not a hasten model folder"):
        load_pipeline(tmp_path / "empty")
    pipe = tiny_pipe()
    pipe.save_pretrained(tmp_path / "bad")
    weights = next((tmp_path / "bad" / "transformer").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(HastenError, match="cannot load"):
        load_pipeline(tmp_path / "bad")
    pipe.save_pretrained(tmp_path / "mismatch")
    meta = json.loads((tmp_path / "mismatch" / "hasten_pipeline.json").read_text())
    meta["num_classes"] = 7
    (tmp_path / "mismatch" / "hasten_pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(HastenError, match="classes"):
        load_pipeline(tmp_path / "mismatch")


def test_embedded_default_model_loads():
    pipe = load_pipeline("digits")
    assert pipe.num_classes == 10 and pipe.image_shape == (1, 16, 16)
    assert isinstance(pipe.transformer, DiTTransformer2DModel)


def test_loading_shapes_does_not_print_diffusers_empty_float32_warning(caplog):
    import logging

    import hasten

    with caplog.at_level(logging.WARNING):
        hasten.load_pipeline("shapes")
    assert "should be kept in float32: []" not in caplog.text
    record = logging.LogRecord("diffusers.models.modeling_utils", logging.WARNING, "", 0,
                               "modules that should be kept in float32: ['norm']", None, None)
    assert logging.getLogger("diffusers.models.modeling_utils").filter(record)  # a real one still shows
