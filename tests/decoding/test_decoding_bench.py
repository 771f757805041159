"""The decoding benchmark harness, with fake methods and a fake clock (no models)."""

from __future__ import annotations

import pytest
import torch

from hasten.decoding import task
from hasten.decoding.bench import Method, run_interleaved, summarize
from hasten.decoding.speculative import DecodingStats


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_latency_per_answer_is_measured_per_call_interleaved_and_summarized():
    clock, order = FakeClock(), []
    problems = task.splits()["test"][:5]
    right = [torch.tensor(task.encode(task.answer_text(p, choice={s: 0 for s in task.SLOTS}))) for p in problems]
    wrong = torch.tensor(task.encode("answer 1."))

    def method(name: str, seconds: list[float], correct: bool, stats: bool = False):
        def run(x, i):
            order.append((i, name))
            clock.t += seconds[i]  # the call "takes" this long
            s = DecodingStats(drafts=2, accepted_tokens=3) if stats else None
            return (right[i] if correct else wrong), s
        return Method(name, name, run)

    slow = [1.0, 2.0, 3.0, 4.0, 10.0]
    fast = [0.5, 0.5, 0.5, 0.5, 0.5]
    methods = [method("target_hf", slow, True), method("fast", fast, True, stats=True),
               method("wrong", fast, False)]
    inputs = [torch.tensor([task.encode(task.prompt_text(p))]) for p in problems]
    recs = run_interleaved(inputs, methods, clock=clock)
    # every method once per problem, order rotated by the problem index
    assert [n for i, n in order if i == 0] == ["target_hf", "fast", "wrong"]
    assert [n for i, n in order if i == 1] == ["fast", "wrong", "target_hf"]
    assert [r["latency_s"] for r in recs["target_hf"]] == slow
    res = summarize(recs, problems)
    assert res["target_hf"]["latency_median_s"] == 3.0
    assert res["target_hf"]["latency_p90_s"] == pytest.approx(4.0 + 0.6 * 6.0)  # linear interpolation
    assert res["target_hf"]["latency_mean_s"] == 4.0
    assert res["fast"]["latency_median_s"] == 0.5
    assert res["target_hf"]["accuracy"] == 1.0 and res["wrong"]["accuracy"] == 0.0
    assert res["fast"]["outputs_equal_to_target_greedy"] == 5 and res["wrong"]["outputs_equal_to_target_greedy"] == 0
    assert res["fast"]["mean_accepted_length"] == pytest.approx(1 + 15 / 10)
    n_tok = sum(int(t.numel()) for t in right)
    assert res["target_hf"]["tokens_per_s"] == pytest.approx(n_tok / sum(slow), abs=0.01)
