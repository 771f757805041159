"""hasten tune: the confirmed plan meets its budget on held-out prompts, resumes, refuses the unreachable,
and applies through hasten.accelerate(pipe, plan=...) and hasten generate --plan (tiny models only)."""

from __future__ import annotations

import json

import pytest

from hasten.errors import HastenError
from hasten.eval.bench_shapes import copy_shapes
from hasten.eval.metrics import psnr
from hasten.testing import run_cli, tiny_shapes_pipeline
from hasten.tune import Candidate, PromptSet, QualityBudget, Tuner, file_sets, meets, run_images, tune

PROMPTS = ["a red circle", "a blue square and a blue triangle", "two green discs", "a cyan tile above a red disc",
           "a yellow triangle", "a purple circle left of a green square"]
SMALL = dict(solvers=("euler", "unipc-bh2"), step_grid=(2, 4, 8), quality_solver=("unipc-bh2", 24))


@pytest.fixture(scope="module")
def tiny_pipe():
    return tiny_shapes_pipeline()


def test_budget_gates():
    ref = {"psnr": 100.0, "adherence": 0.80, "fd_shapes": 10.0}
    b = QualityBudget(35.0)
    assert meets({"psnr": 36.0, "adherence": 0.795, "fd_shapes": 10.4}, ref, b)
    assert not meets({"psnr": 34.9, "adherence": 0.80, "fd_shapes": 10.0}, ref, b)
    assert not meets({"psnr": 40.0, "adherence": 0.78, "fd_shapes": 10.0}, ref, b)  # 2 points of adherence
    assert not meets({"psnr": 40.0, "adherence": 0.80, "fd_shapes": 10.6}, ref, b)  # FD 6% above
    assert meets({"psnr": 35.0}, {"psnr": 100.0}, b)  # no evaluator: PSNR alone


def test_tune_confirms_on_held_out_prompts_and_resumes(tiny_pipe, tmp_path):
    out = tmp_path / "plan.json"
    plan = tune(tiny_pipe, 36.0, out, prompts=PROMPTS, progress=False, budget_minutes=30, **SMALL)
    on_disk = json.loads(out.read_text())
    assert on_disk["candidate"] == plan["candidate"] and on_disk["schema"] == "hasten-tune/1"
    conf = plan["confirmed"]
    assert conf["meets"] and conf["quality"]["psnr"] >= 36.0 and conf["samples"] == 3
    assert plan["tuning"]["candidates_measured"] >= 3

    # the figure is real: apply the plan file as a user would and measure the held-out prompts again
    import hasten

    _, confirm = file_sets(PROMPTS)
    ref, _ = run_images(copy_shapes(tiny_pipe, "unipc-bh2"), confirm, 24)
    own = copy_shapes(tiny_pipe, None)
    with hasten.accelerate(own, plan=str(out)) as h:
        assert type(own.scheduler).__name__ == plan["scheduler"]["class"] and h.tuned_plan["steps"] == plan["steps"]
        assert "set_timesteps" in vars(own.scheduler)  # the swapped-in scheduler starts the runs
        images, _ = run_images(own, confirm, h.tuned_plan["steps"])
        assert h.guidance_scale == own.default_guidance_scale  # read at its set_timesteps
    assert type(own.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # disable() restored it
    assert "set_timesteps" not in vars(own.scheduler) and h.tuned_plan is None
    assert psnr(images, ref) == pytest.approx(conf["quality"]["psnr"], abs=1e-3)

    # resuming: the same command measures nothing again and writes the same plan
    tune_set, confirm_set = file_sets(PROMPTS)
    again = Tuner(tiny_pipe, tune_set, confirm_set, QualityBudget(36.0), out, 30, progress=False, **SMALL)
    assert again.run()["candidate"] == plan["candidate"] and again.measured_now == 0


def test_the_search_stops_at_the_first_step_count_that_meets_the_budget(tiny_pipe, tmp_path):
    tune_set, confirm_set = file_sets(PROMPTS)
    t = Tuner(tiny_pipe, tune_set, confirm_set, QualityBudget(36.0), tmp_path / "p.json", 30, progress=False, **SMALL)
    t.references()
    t.search()
    measured = t.state["measured"]
    for solver in SMALL["solvers"]:
        plain = [measured[f"{solver} @{s}"] for s in SMALL["step_grid"] if f"{solver} @{s}" in measured]
        # a prefix of the grid: every one but the last misses the budget, the last meets it
        assert [r["steps"] for r in plain] == list(SMALL["step_grid"][:len(plain)])
        assert [r["meets"] for r in plain] == [False] * (len(plain) - 1) + [True]
    assert any(not r["meets"] for r in measured.values())  # 36 dB is not free on this model
    winners = {r["solver"]: r["steps"] for r in measured.values() if r["ag"] is None and r["bc"] is None
               and r["meets"]}
    for solver, steps in winners.items():  # methods on top at that step count
        assert f"{solver} @{steps} + block-cache:delta=0.1" in measured
        assert f"{solver} @{steps} + ag:threshold=0.99" in measured


def test_an_unreachable_budget_is_a_clear_message(tiny_pipe, tmp_path):
    with pytest.raises(HastenError, match="no configuration reached the budget .*the closest: "):
        tune(tiny_pipe, 99.0, tmp_path / "p.json", prompts=PROMPTS, progress=False, **SMALL)


def test_bad_arguments_and_plans(tiny_pipe, tmp_path):
    import hasten

    with pytest.raises(HastenError, match="min-psnr"):
        tune(tiny_pipe, -1.0, tmp_path / "p.json", prompts=PROMPTS)
    with pytest.raises(HastenError, match="at least 2 prompts"):
        file_sets(["one"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hasten_plan": 1}))
    with pytest.raises(HastenError, match="not a hasten tune plan"):
        hasten.accelerate(tiny_pipe, plan=str(bad))
    assert Candidate("euler", 8, ag=0.99, bc=0.1).name == "euler @8 + ag:threshold=0.99 + block-cache:delta=0.1"
    assert PromptSet(PROMPTS, 5, batch_size=4).batches()[1] == (PROMPTS[4:], 6)


def test_cli_tune_and_generate_plan_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "tune", "--model", "digits", "--min-psnr", "35", "--out", str(tmp_path / "p.json"))
    assert code == 2 and "no diffusers scheduler" in err
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"schema": "hasten-tune/1", "scheduler": {}, "steps": 8, "methods": []}))
    code, _, err = run_cli(capsys, "generate", "--model", "digits", "--plan", str(plan), "--accel", "ag",
                           "--out", str(tmp_path / "g.png"))
    assert code == 2 and "--plan or --accel" in err
    code, _, err = run_cli(capsys, "generate", "--model", "digits", "--plan", str(plan), "--steps", "20",
                           "--out", str(tmp_path / "g.png"))
    assert code == 2 and "tuned for 8 steps" in err


def test_tune_searches_flexidit_on_a_flexified_model_and_its_plan_applies(tiny_pipe, tmp_path):
    import hasten

    pipe = tiny_shapes_pipeline()
    hasten.flexify(pipe.transformer, (2, 4))
    tune_set, confirm_set = file_sets(PROMPTS)
    t = Tuner(pipe, tune_set, confirm_set, QualityBudget(10.0), tmp_path / "p.json", 30, progress=False, **SMALL)
    t.references()
    t.search()
    measured = t.state["measured"]
    flexi = [n for n in measured if "flexidit:compute=" in n]
    assert "euler @2 + flexidit:compute=0.6" in flexi and "euler @4 + flexidit:compute=0.8" in flexi
    assert "euler @2 + ag:threshold=0.99 + block-cache:delta=0.1 + flexidit:compute=0.6" in flexi
    assert all(measured[n]["error"] is None for n in flexi)
    plan = t.write(measured["euler @4 + flexidit:compute=0.6"], {"meets": True}, [])
    assert plan["methods"] == [{"method": "FlexiDiT", "compute": 0.6}]
    own = copy_shapes(pipe, None)
    with hasten.accelerate(own, plan=str(tmp_path / "p.json")) as h:
        run_images(own, confirm_set, plan["steps"])
        rep = h.report()["methods"]["flexidit"]
    assert rep["weak_calls"] > 0 and rep["compute_share"] <= 0.6
    with pytest.raises(HastenError, match="flexified"):  # the plan needs the flexified model
        hasten.accelerate(copy_shapes(tiny_pipe, None), plan=str(tmp_path / "p.json"))


def test_a_block_caching_candidate_that_skips_nothing_is_never_picked(tiny_pipe, tmp_path):
    tune_set, confirm_set = file_sets(PROMPTS)
    t = Tuner(tiny_pipe, tune_set, confirm_set, QualityBudget(10.0), tmp_path / "p.json", 30, progress=False, **SMALL)
    t.state["plans"] = {"euler @4": {"l1rel": [[None, 0.5, 0.5, 0.5], [None, 0.3, 0.2, 0.6]]}}
    rec = {"solver": "euler", "steps": 4, "ag": None, "bc": 0.1, "flexi": None}
    assert t.skips_nothing(rec)  # every change exceeds 0.1: every block computes at every call
    assert not t.skips_nothing({**rec, "bc": 0.55})  # 0.5 + 0.5 > 0.55 but 0.5 alone is not: reuses
    assert not t.skips_nothing({**rec, "bc": None})


def test_the_resume_key_covers_guidance_scheduler_and_speed_reference(tiny_pipe, tmp_path):
    """A tuning state (and its reference images) from a run at another guidance scale, scheduler shift or speed
    reference is not reused: every one of them changes what a measurement means."""
    import copy

    tune_set, confirm_set = file_sets(PROMPTS)

    def key(pipe, **kw):
        return Tuner(pipe, tune_set, confirm_set, QualityBudget(36.0), tmp_path / "p.json", 30, progress=False,
                     **{**SMALL, **kw}).key

    base = key(tiny_pipe)
    other = copy_shapes(tiny_pipe, None)
    other.default_guidance_scale = tiny_pipe.default_guidance_scale + 2.0
    shifted = copy_shapes(tiny_pipe, None)
    shifted.scheduler = type(shifted.scheduler).from_config(shifted.scheduler.config, shift=3.0)
    assert len({base, key(other), key(shifted), key(tiny_pipe, reference_steps=28)}) == 4
    assert key(copy.deepcopy(tiny_pipe)) == base


def test_run_confirms_the_fastest_passing_candidates_in_turn_and_says_when_all_miss(tiny_pipe, tmp_path, monkeypatch):
    """run(): candidates that met the budget on the tuning prompts are confirmed fastest first; one that misses
    on the held-out prompts is passed over for the next, and when every confirmation misses the error names the
    best held-out one. Failing candidates are never confirmed."""
    tune_set, confirm_set = file_sets(PROMPTS)
    t = Tuner(tiny_pipe, tune_set, confirm_set, QualityBudget(36.0), tmp_path / "p.json", 30, progress=False,
              **SMALL)
    q = {"psnr": 40.0, "adherence": 0.5, "fd_shapes": 10.0}
    recs = [{"solver": "euler", "steps": s, "ag": None, "bc": None, "flexi": None, "meets": ok, "speedup": sp,
             "quality": q} for s, ok, sp in ((2, True, 5.0), (3, False, 9.0), (4, True, 3.0), (6, True, 2.0))]
    monkeypatch.setattr(t, "references", lambda: None)
    monkeypatch.setattr(t, "search", lambda: recs)
    confirmed, held_out_ok = [], {2: False, 4: True, 6: True}

    def confirm_one(rec):
        confirmed.append(rec["steps"])
        return {"candidate": f"euler @{rec['steps']}", "meets": held_out_ok[rec["steps"]],
                "quality": {**q, "psnr": 30.0 + rec["steps"]}, "reference_quality": q}

    monkeypatch.setattr(t, "confirm_one", confirm_one)
    monkeypatch.setattr(t, "write", lambda rec, conf, tried: {"picked": rec["steps"], "tried": len(tried)})
    assert t.run() == {"picked": 4, "tried": 2} and confirmed == [2, 4]  # 3 steps failed on the tuning prompts
    held_out_ok.update({4: False, 6: False})
    confirmed.clear()
    with pytest.raises(HastenError, match=r"the 3 fastest .*best held-out: euler @6, PSNR 36.0 dB"):
        t.run()
    assert confirmed == [2, 4, 6]
