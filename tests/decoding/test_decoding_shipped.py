"""The shipped target/draft pair and judge: lossless greedy equality, judge off = speculative, cost ratio."""

from __future__ import annotations

import math

import pytest
import torch

from hasten.decoding import autoregressive_generate, generate, task
from hasten.decoding.assets import load_shipped


@pytest.fixture(scope="module")
def shipped():
    threads = torch.get_num_threads()
    m = load_shipped(threads=1)
    yield m
    torch.set_num_threads(threads)


def test_shipped_pair_greedy_equals_target_only_and_judge_at_inf_equals_speculative(shipped):
    t, d = shipped.target, shipped.draft
    for p in task.splits()["test"][:3]:
        x = torch.tensor([task.encode(task.prompt_text(p))])
        ref = autoregressive_generate(t, x, task.MAX_NEW_TOKENS, eos_token_id=task.EOS)
        spec = generate(t, d, x, task.MAX_NEW_TOKENS, num_draft_tokens=6, eos_token_id=task.EOS)
        off = generate(t, d, x, task.MAX_NEW_TOKENS, num_draft_tokens=6, judge=shipped.judge, threshold=math.inf,
                       eos_token_id=task.EOS)
        assert torch.equal(spec.sequences, ref.sequences) and torch.equal(off.sequences, spec.sequences)
        assert spec.stats.accepted_tokens > 0 and spec.stats.target_forwards < ref.stats.target_forwards
        judged = generate(t, d, x, task.MAX_NEW_TOKENS, num_draft_tokens=6, judge=shipped.judge, threshold=0.0,
                          eos_token_id=task.EOS)
        assert judged.stats.judge_accepted_tokens > 0  # at delta 0.5 the judge keeps tokens the target would not


def test_shipped_pair_tokenizer_and_sizes(shipped):
    assert shipped.tokenizer.get_vocab() == task.VOCAB
    n_t = sum(p.numel() for p in shipped.target.parameters())
    n_d = sum(p.numel() for p in shipped.draft.parameters())
    assert n_t > 20 * n_d  # the cost ratio itself is measured by the benchmark (cost_ratio), not here


def test_shipped_judge_at_its_own_setting_is_right_in_fewer_target_passes(shipped):
    """The shipped head at its calibrated threshold and k: correct answers, far fewer target passes than
    lossless speculative decoding (with a DraftStop, whose output is still the target's greedy one)."""
    from hasten.decoding import DraftStop

    t, d, head = shipped.target, shipped.draft, shipped.judge
    stop = DraftStop()
    for p in task.splits()["test"][3:6]:
        x = torch.tensor([task.encode(task.prompt_text(p))])
        spec = generate(t, d, x, task.MAX_NEW_TOKENS, num_draft_tokens=8, eos_token_id=task.EOS, draft_stop=stop)
        ref = autoregressive_generate(t, x, task.MAX_NEW_TOKENS, eos_token_id=task.EOS)
        assert torch.equal(spec.sequences, ref.sequences)
        judged = generate(t, d, x, task.MAX_NEW_TOKENS, num_draft_tokens=int(head.meta["k"]), judge=head,
                          eos_token_id=task.EOS)
        assert task.check(p, task.decode(judged.new_tokens.tolist()))
        assert judged.stats.target_forwards < spec.stats.target_forwards
