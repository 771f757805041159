"""hasten bench: paired speedups from interleaved runs, error capture, counters, schema round-trip, CLI.

Everything here uses fake configurations or a 2-block random DiT; nothing downloads or loads weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel

from hasten.errors import HastenError
from hasten.eval.bench import baseline_config, diffusers_peer_config, run_bench
from hasten.eval.bench_harness import (
    BenchConfig,
    Prepared,
    Unavailable,
    make_batches,
    paired_speedup,
    run_interleaved,
)
from hasten.eval.bench_report import pareto_front
from hasten.eval.bench_results import load_results, new_record, quality_levels, validate_results
from hasten.pipeline import HastenPipeline
from hasten.testing import run_cli
from hasten.train import digits_transformer_config


class FakeClock:
    """A clock that only moves when a fake configuration 'samples'."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_config(name: str, family: str, clock: FakeClock, durations: list[float], fail_at: int | None = None,
                setup_error: Exception | None = None, nan: bool = False) -> BenchConfig:
    """A configuration whose k-th run takes ``durations[k]`` fake seconds and returns images = its index."""
    calls = {"n": 0}

    def setup() -> Prepared:
        if setup_error is not None:
            raise setup_error

        def sample(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            k = calls["n"]
            calls["n"] += 1
            if fail_at is not None and k == fail_at:
                raise RuntimeError(f"boom in run {k}\nsecond line")
            clock.now += durations[k]
            images = torch.rand((len(labels), 1, 16, 16), generator=gen)
            return images.index_fill(0, torch.tensor([0]), float("nan")) if nan else images

        return Prepared(sample=sample)

    return BenchConfig(name, family, {"fake": True}, setup)


class FakeScorer:
    def psnr(self, a, b):
        return 100.0 if torch.equal(a, b) else 20.0

    def ssim(self, a, b):
        return 1.0 if torch.equal(a, b) else 0.5

    def fd_digits(self, images):
        return float(images.mean())

    def class_accuracy(self, images, labels):
        return 1.0


def test_speedup_is_the_median_of_interleaved_pairs():
    clock = FakeClock()
    # the machine slows down in batch 1 for everyone: pairs cancel it, independent medians would not
    base = fake_config("base", "baseline", clock, [1.0, 4.0, 1.0])
    fast = fake_config("fast", "hasten", clock, [0.5, 2.0, 0.5])
    batches = make_batches(6, 2, 0, 10)
    measured = run_interleaved([base, fast], batches, warmup=None, timer=clock)
    assert measured["base"].times == [1.0, 4.0, 1.0] and measured["fast"].times == [0.5, 2.0, 0.5]
    assert paired_speedup(measured["base"].times, measured["fast"].times) == pytest.approx(2.0)
    # pairs, not medians: median(base)/median(other) would be 2.0 / 1.0 = 2.0 but the paired ratios are
    # 1/3, 4/1, 1/3, so the median pair says "3x slower"
    assert paired_speedup([1.0, 4.0, 1.0], [3.0, 1.0, 3.0]) == pytest.approx(1 / 3)
    assert paired_speedup([1.0, 2.0], []) is None


def test_setup_seconds_cover_setup_and_warmup_but_not_the_timed_batches():
    """``setup_s`` is what installing a configuration cost a user (calibration, a warm-up batch); it is
    measured on its own and never enters the timed batches."""
    import time as _time

    clock = FakeClock()
    slow = fake_config("slow", "baseline", clock, [1.0, 1.0])
    inner = slow.setup

    def slow_setup():
        _time.sleep(0.05)  # stands in for a calibration
        return inner()

    slow.setup = slow_setup
    measured = run_interleaved([slow], make_batches(4, 2, 0, 10), warmup=None, timer=clock)
    m = measured["slow"]
    assert m.setup_s is not None and m.setup_s >= 0.05
    assert m.times == [1.0, 1.0]  # the fake clock's batches, untouched by the setup's sleep
    broken = fake_config("broken", "baseline", clock, [1.0], setup_error=RuntimeError("boom"))
    failed = run_interleaved([broken], make_batches(2, 2, 0, 10), timer=clock)["broken"]
    assert failed.error == "RuntimeError: boom" and failed.setup_s is not None  # what the failure cost


def test_interleaving_order_is_a_b_c_per_batch():
    clock, order = FakeClock(), []

    def cfg(name):
        def setup():
            return Prepared(sample=lambda labels, gen: order.append(name) or torch.zeros(len(labels), 1, 4))
        return BenchConfig(name, "baseline", {}, setup)

    run_interleaved([cfg("A"), cfg("B"), cfg("C")], make_batches(4, 2, 0, 10),
                    warmup=make_batches(2, 2, 99, 10)[0], timer=clock)
    assert order == ["A", "B", "C", "A", "B", "C", "A", "B", "C"]  # warm-up row, then batch 0, batch 1
    order.clear()
    run_interleaved([cfg("A"), cfg("B")], make_batches(6, 2, 0, 10), timer=clock, order="abba")
    assert order == ["A", "B", "B", "A", "A", "B"]  # the order flips on odd batches


def test_failing_configurations_are_recorded_and_the_run_goes_on(tmp_path):
    clock = FakeClock()
    # run 0 of each configuration is the warm-up
    configs = [fake_config("ref", "baseline", clock, [1.0] * 4),
               fake_config("broken-setup", "peer", clock, [1.0] * 4, setup_error=ValueError("no such hook")),
               fake_config("missing", "hasten", clock, [1.0] * 4, setup_error=Unavailable("X not in build")),
               fake_config("dies", "peer", clock, [0.5] * 4, fail_at=2),
               fake_config("ok", "hasten", clock, [0.25] * 4),
               fake_config("diverges", "baseline", clock, [0.5] * 4, nan=True)]  # a solver returning NaN
    res = run_bench("tiny", tmp_path / "out", configs=configs, scorer=FakeScorer(), pipe=tiny_pipeline(),
                    samples=30, batch_size=10, realistic=False, timer=clock)
    recs = {r["name"]: r for r in res["records"]}
    assert len(recs) == 6
    nan = recs["diverges"]  # timed, counted, not scored, and the file stays valid JSON
    assert nan["error"] == "non-finite output: 3 of 30 images hold NaN/inf" and nan["psnr"] is None
    assert nan["speedup"] == pytest.approx(2.0)
    assert recs["broken-setup"]["error"] == "ValueError: no such hook"
    assert recs["missing"]["error"] == "not available: X not in build"
    assert recs["dies"]["error"] == "RuntimeError: boom in run 2"  # first line only
    for name in ("broken-setup", "missing", "dies"):
        assert recs[name]["speedup"] is None and recs[name]["psnr"] is None
    assert recs["ok"]["error"] is None and recs["ok"]["speedup"] == pytest.approx(4.0)
    assert recs["ref"]["speedup"] == pytest.approx(1.0) and recs["ref"]["psnr"] == 100.0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "RuntimeError: boom in run 2" in md and "not available: X not in build" in md
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 1000


def test_results_json_round_trip_and_schema_errors(tmp_path):
    clock = FakeClock()
    configs = [fake_config("ref", "baseline", clock, [1.0] * 3), fake_config("h", "hasten", clock, [0.5] * 3)]
    res = run_bench("tiny", tmp_path, configs=configs, scorer=FakeScorer(), pipe=tiny_pipeline(), samples=20,
                    batch_size=10, realistic=False, timer=clock)
    loaded = load_results(tmp_path / "results.json")
    assert loaded == json.loads(json.dumps(res))
    rec = loaded["records"][1]
    assert set(rec) == {"name", "family", "params", "wall_s_median", "speedup", "nfe", "block_evals",
                        "peak_rss_mb", "psnr", "ssim", "fd_digits", "class_accuracy", "fd_shapes", "adherence",
                        "denoiser_s_median", "denoiser_share", "denoiser_speedup", "transformer_flops_share",
                        "setup_s", "error"}
    assert rec["transformer_flops_share"] is None  # FlexiDiT records only
    assert {"cpu", "cores", "torch"} <= set(loaded["machine"]) and loaded["date"]
    bad = json.loads(json.dumps(res))
    bad["records"][0]["family"] = "rival"
    with pytest.raises(HastenError, match="family must be one of"):
        validate_results(bad)
    bad = json.loads(json.dumps(res))
    del bad["records"][1]["speedup"]
    with pytest.raises(HastenError, match="lacks field 'speedup'"):
        validate_results(bad)
    bad = json.loads(json.dumps(res))
    bad["records"][1]["psnr"] = "high"
    with pytest.raises(HastenError, match="psnr must be a finite number"):
        validate_results(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(HastenError, match="not valid JSON"):
        load_results(tmp_path / "broken.json")


def test_quality_levels_pick_the_fastest_per_family():
    recs = [new_record("ref", "baseline", {}, speedup=1.0, psnr=100.0, fd_digits=1.0),
            new_record("s25", "baseline", {}, speedup=2.0, psnr=38.0, fd_digits=1.02),
            new_record("s10", "baseline", {}, speedup=5.0, psnr=31.0, fd_digits=1.3),
            new_record("h1", "hasten", {}, speedup=3.0, psnr=41.0, fd_digits=1.01),
            new_record("h2", "hasten", {}, speedup=4.0, psnr=33.0, fd_digits=1.2),
            new_record("p1", "peer", {}, speedup=2.5, psnr=40.5, fd_digits=1.0),
            new_record("p-err", "peer", {}, error="RuntimeError: x")]
    rows = {r["level"].split(" ")[0]: r for r in quality_levels(recs, "ref")}
    assert rows["psnr>=40"]["hasten"]["name"] == "h1" and rows["psnr>=40"]["hasten_fastest"] is True
    assert rows["psnr>=40"]["hasten_vs_peer"] == pytest.approx(3.0 / 2.5)
    assert rows["psnr>=30"]["fewer_steps"]["name"] == "s10" and rows["psnr>=30"]["hasten_fastest"] is False
    assert rows["fd<=1.05"]["hasten"]["name"] == "h1" and rows["fd<=1.05"]["fewer_steps"]["name"] == "s25"


def test_pareto_front():
    pts = [(1.0, 1.0), (2.0, 3.0), (1.5, 0.5), (3.0, 2.0), (2.0, 3.0)]
    assert pareto_front(pts, higher_x_better=False) == [(1.0, 1.0), (2.0, 3.0)]  # low x, high y
    assert pareto_front(pts, higher_x_better=True) == [(2.0, 3.0), (3.0, 2.0)]


# --------------------------------------------------------------------------- real (tiny) models
def tiny_pipeline() -> HastenPipeline:
    torch.manual_seed(0)
    tr = DiTTransformer2DModel(**digits_transformer_config(num_layers=2, num_attention_heads=2,
                                                           attention_head_dim=16))
    return HastenPipeline(tr, guidance_scale=3.0)


def test_counters_count_rows_and_blocks_and_peers_install_exactly():
    pipe = tiny_pipeline()
    steps = 4
    batches = make_batches(4, 4, 0, 10)
    configs = [baseline_config(pipe, steps),
               diffusers_peer_config(pipe, "first-block-cache", {"threshold": 0.0}, steps),
               diffusers_peer_config(pipe, "first-block-cache", {"threshold": 1e9}, steps)]
    measured = run_interleaved(configs, batches, warmup=None)
    base, fbc0, fbc_all = (measured[c.name] for c in configs)
    assert all(m.error is None for m in (base, fbc0, fbc_all))
    assert base.nfe == 2 * steps and base.block_evals == 2 * steps * 2  # CFG rows x steps x blocks
    # threshold 0 never reuses: bitwise the baseline, same work
    assert torch.equal(torch.cat(fbc0.images), torch.cat(base.images))
    assert fbc0.block_evals == base.block_evals
    # a huge threshold reuses the tail block after the first step: fewer block evaluations, still 1 NFE/step
    assert fbc_all.nfe == base.nfe and fbc_all.block_evals < base.block_evals
    # the original pipeline is untouched (every configuration installs on its own copy)
    assert not hasattr(pipe.transformer, "_diffusers_hook")




def test_configurations_sharing_a_module_count_only_their_own_calls():
    """A student at several step counts is one module under several configurations: each configuration's NFE
    and block evaluations come from its own timed runs, not from every call the shared module saw."""
    shared = tiny_pipeline().transformer
    size, channels = shared.config.sample_size, shared.config.in_channels

    def config(name: str, calls: int) -> BenchConfig:
        def sample(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            x = torch.randn(len(labels), channels, size, size, generator=gen)
            with torch.no_grad():
                for _ in range(calls):
                    x = shared(x, timestep=torch.full((len(labels),), 500), class_labels=labels).sample[:, :channels]
            return x

        return BenchConfig(name, "hasten", {}, lambda: Prepared(sample=sample, transformer=shared))

    batches = make_batches(4, 2, 0, 10)
    measured = run_interleaved([config("one", 1), config("three", 3)], batches, warmup=batches[0])
    one, three = measured["one"], measured["three"]
    assert one.error is None and three.error is None
    assert (one.nfe, three.nfe) == (1, 3)
    assert (one.block_evals, three.block_evals) == (2, 6)  # 2 blocks per call


@pytest.mark.parametrize("args, message", [
    (["--samples", "3"], "--samples must be >= 10"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
])
def test_bad_arguments_give_one_line_errors(tmp_path, capsys, args, message):
    code, _, err = run_cli(capsys, "bench", "--out", str(tmp_path / "o"), *args)
    assert code == 2
    assert err.strip().startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file.json"
    f.write_text("{}")
    code, _, err = run_cli(capsys, "bench", "--out", str(f))
    assert code == 2 and "is not a folder" in err
    code, _, err = run_cli(capsys, "bench", "--out", str(tmp_path / "missing" / "deeper"))
    assert code == 2 and "does not exist" in err


def test_shared_installs_are_removed_exactly():
    """The realistic-size path installs on one model in turn: after each uninstall the model is intact."""
    from hasten.eval.bench import _sampler, realistic_configs, run_shared
    from hasten.eval.bench_harness import Prepared, run_one

    pipe = tiny_pipeline()
    steps = 4
    batch = make_batches(2, 2, 0, 10)[0]
    before = run_one(Prepared(sample=_sampler(pipe, steps)), batch)
    configs = [c for c in realistic_configs(steps, num_blocks=2) if not c.name.startswith("cache-dit")]
    records = run_shared(pipe, configs, steps, batch)
    assert [r["name"] for r in records][1:] == [c.name for c in configs]
    assert all(r["error"] is None for r in records), [r["error"] for r in records]
    assert records[0]["nfe"] == 2 * steps and records[0]["block_evals"] == 2 * steps * 2
    bc = next(r for r in records if r["name"].startswith("block-cache"))
    assert bc["block_evals"] < records[0]["block_evals"]
    assert all(r["peak_rss_mb"] > 0 for r in records)
    after = run_one(Prepared(sample=_sampler(pipe, steps)), batch)
    assert torch.equal(before, after)


def test_guidance_suite_calibrates_ag_and_linear_ag_at_the_requested_guidance(tmp_path):
    """``--suite guidance --cfg 3``: CFG, guidance off, AG and LinearAG (calibrated plans and the paper's
    0.991), every configuration at guidance 3 and each plan made for it."""
    pipe = tiny_pipeline()
    res = run_bench("tiny", tmp_path, pipe=pipe, scorer=FakeScorer(), samples=10, batch_size=10, realistic=False,
                    suite="guidance", guidance_scale=3.0)
    names = [r["name"] for r in res["records"]]
    assert names == ["cfg @50", "no-guidance @50", "ag @50", "linear-ag @50", "ag:threshold=0.991 @50",
                     "linear-ag:threshold=0.991 @50"]
    recs = {r["name"]: r for r in res["records"]}
    assert all(r["error"] is None for r in recs.values()), [r["error"] for r in recs.values()]
    assert recs["cfg @50"]["nfe"] == 100 and recs["no-guidance @50"]["nfe"] == 50
    assert recs["linear-ag @50"]["nfe"] < 100  # regressed calls run one row
    assert res["protocol"]["guidance_scale"] == 3.0 and res["protocol"]["suite"] == "guidance"
    for name in ("ag-50.json", "linear-ag-50.json"):
        plan = json.loads((tmp_path / "plans" / name).read_text())
        assert plan["guidance_scale"] == 3.0 and plan["calibration"]["min_psnr_db"] == 35.0
    with pytest.raises(HastenError, match="unknown suite"):
        run_bench("tiny", tmp_path, pipe=pipe, suite="fast")
    with pytest.raises(HastenError, match="overlap the calibration seeds"):  # scored on its own calibration
        run_bench("tiny", tmp_path, pipe=pipe, seed=999, samples=20, batch_size=10, suite="guidance")


def test_faster_cache_splits_the_batch_only_under_guidance():
    """FasterCache drops the unconditional half of a [uncond; cond] batch; without CFG the batch is all
    conditional rows, so the config must not split it (it computed half of the samples at --cfg 1). The model's
    own batched keywords join diffusers' list (digits: class labels; shapes: the pooled text)."""
    from hasten.eval.bench_peers import diffusers_hook_config

    guided = diffusers_hook_config("faster-cache", {}, lambda: 0.0, guided=True, split_kwargs=("class_labels",))
    plain = diffusers_hook_config("faster-cache", {}, lambda: 0.0, guided=False)
    assert guided.is_guidance_distilled is False and plain.is_guidance_distilled is True
    assert "class_labels" in guided._unconditional_conditional_input_kwargs_identifiers
    assert "class_labels" not in plain._unconditional_conditional_input_kwargs_identifiers


def test_interval_suite_runs_guidance_in_limited_intervals(tmp_path):
    """``--suite interval``: CFG, guidance off and the ``INTERVALS``; outside an interval a call is one row."""
    from hasten.eval.bench import INTERVALS

    pipe = tiny_pipeline()
    res = run_bench("tiny", tmp_path, pipe=pipe, scorer=FakeScorer(), samples=10, batch_size=10, realistic=False,
                    suite="interval", guidance_scale=3.0)
    recs = {r["name"]: r for r in res["records"]}
    names = [f"guidance-interval:lo={lo},hi={hi} @50" for lo, hi in INTERVALS]
    assert list(recs) == ["cfg @50", "no-guidance @50", *names]
    assert all(r["error"] is None for r in recs.values()), [r["error"] for r in recs.values()]
    for name in names:  # some calls guided, some not
        assert 50 < recs[name]["nfe"] < 100


def test_in_turn_pairs_each_configuration_with_its_own_baseline_run_and_warms_it_up():
    """run_in_turn: a failed baseline run is the error of the configuration it precedes (the others keep their
    own pairs), and each configuration's timed run follows an untimed warm-up run."""
    import torch

    from hasten.eval.bench_harness import Batch, Prepared, run_in_turn

    clock, calls = {"t": 0.0}, {"base": 0}

    def base_sample(labels, gen):
        calls["base"] += 1
        if calls["base"] == 3:  # the second timed baseline run (the first call is the warm-up)
            raise RuntimeError("transient")
        clock["t"] += calls["base"]
        return torch.zeros(1)

    def config(first: float, then: float):
        def install():
            runs = []

            def sample(labels, gen):
                runs.append(1)
                clock["t"] += first if len(runs) == 1 else then
                return torch.zeros(1)

            return Prepared(sample=sample), (lambda: None)

        return install

    base_m, out = run_in_turn(Prepared(sample=base_sample), [("A", config(9.0, 0.5)), ("B", config(9.0, 0.25)),
                                                             ("C", config(9.0, 2.0))], Batch(torch.arange(2), 0),
                              timer=lambda: clock["t"])
    assert out["A"].base_time == 2.0 and out["A"].times == [0.5]  # the cold first call is not timed
    assert out["B"].error.startswith("the baseline run before it failed") and not out["B"].times
    assert out["C"].base_time == 4.0 and out["C"].times == [2.0]
