"""`hasten decode` / `hasten bench-decode` with the shipped models: JSON output and bad input (exit 2)."""

from __future__ import annotations

import json

import pytest

from hasten.testing import run_cli


def test_decode_json_speculative_and_judge(capsys):
    code, out, _ = run_cli(capsys, "decode", "--prompt", "23+45", "--k", "4", "--json")
    assert code == 0
    spec = json.loads(out)
    assert spec["mode"] == "speculative" and spec["text"].endswith("68.") and spec["correct"] is True
    st = spec["stats"]
    assert st["target_forwards"] < st["new_tokens"] and st["mean_accepted_length"] == 1 + st["accepted_tokens"] / st[
        "drafts"]
    code, out, _ = run_cli(capsys, "decode", "--prompt", "23+45", "--judge", "--json")
    judge = json.loads(out)
    assert code == 0 and judge["mode"] == "judge"
    assert judge["stats"]["judge_accepted_tokens"] > 0
    code, out, _ = run_cli(capsys, "decode", "--prompt", "23+45", "--judge", "--delta", "1", "--json")
    assert json.loads(out)["text"] == spec["text"]  # delta = 1 is standard speculative decoding


@pytest.mark.parametrize("args, msg", [
    (["decode", "--prompt", "23+45", "--k", "0"], "--k must be >= 1"),
    (["decode", "--prompt", "23*45"], "characters"),
    (["decode", "--prompt", "1+2", "--delta", "2"], "--delta"),
    (["decode", "--prompt", "1+2", "--models", "/nonexistent"], "missing"),
    (["bench-decode", "--out", "/tmp", "--reps", "0"], "--reps"),
])
def test_bad_input_one_line_exit_2(capsys, args, msg):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and msg in err and err.startswith("error:") and len(err.strip().splitlines()) == 1
