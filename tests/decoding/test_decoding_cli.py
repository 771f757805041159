"""`hasten decode` / `hasten bench-decode` with the shipped models: JSON output and bad input (exit 2)."""

from __future__ import annotations

import json

import pytest

from hasten.testing import run_cli

PROMPT = "mia has 347 apples. she buys 285 more and then gives away 169. how many apples does she have now?"


def test_decode_json_speculative_and_judge(capsys):
    code, out, _ = run_cli(capsys, "decode", "--prompt", PROMPT, "--k", "4", "--json")
    assert code == 0
    spec = json.loads(out)
    assert spec["mode"] == "speculative" and spec["text"].endswith(" 463.") and spec["correct"] is True
    st = spec["stats"]
    assert st["target_forwards"] < st["new_tokens"] and st["mean_accepted_length"] == 1 + st["accepted_tokens"] / st[
        "drafts"]
    code, out, _ = run_cli(capsys, "decode", "--prompt", PROMPT, "--judge", "--json")
    assert code == 0 and json.loads(out)["mode"] == "judge"
    code, out, _ = run_cli(capsys, "decode", "--prompt", PROMPT, "--judge", "--delta", "0.5", "--json")
    assert code == 0 and json.loads(out)["stats"]["judge_accepted_tokens"] > 0  # a lenient judge keeps more
    code, out, _ = run_cli(capsys, "decode", "--prompt", PROMPT, "--judge", "--delta", "1", "--json")
    assert json.loads(out)["text"] == spec["text"]  # delta = 1 is standard speculative decoding


@pytest.mark.parametrize("args, msg", [
    (["decode", "--prompt", PROMPT, "--k", "0"], "--k must be >= 1"),
    (["decode", "--prompt", "What is 23*45?"], "words the shipped models do not know"),
    (["decode", "--prompt", PROMPT, "--delta", "2"], "--delta"),
    (["decode", "--prompt", PROMPT, "--models", "/nonexistent"], "missing"),
    (["bench-decode", "--out", "/tmp", "--problems", "0"], "--problems"),
])
def test_bad_input_one_line_exit_2(capsys, args, msg):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and msg in err and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_lm_training_resumes_and_refuses_a_changed_config(tmp_path):
    from dataclasses import replace

    from hasten import HastenError
    from hasten.decoding.train import DRAFT, train_lm

    cfg = replace(DRAFT, hidden_size=32, layers=1, heads=2, intermediate=64, steps=2, batch_size=2, warmup=1)
    first = train_lm(cfg, tmp_path / "out", progress=False, ckpt_every=1, ckpt_dir=tmp_path / "ckpt")
    again = train_lm(cfg, tmp_path / "out", progress=False, ckpt_every=1, ckpt_dir=tmp_path / "ckpt")
    assert first["steps_done"] == again["steps_done"] == 2 and again["loss_curve"] == first["loss_curve"]
    with pytest.raises(HastenError, match="another config"):  # one-line error, not SystemExit
        train_lm(replace(cfg, lr=5e-4), tmp_path / "out", progress=False, ckpt_dir=tmp_path / "ckpt")
