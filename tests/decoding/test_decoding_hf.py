"""``target.generate(custom_generate=hasten.decoding.custom_generate, draft_model=...)``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_decoding_speculative import hf_greedy, llama, prompt

from hasten.decoding import JudgeHead, custom_generate, generate
from hasten.errors import HastenError


def _counted(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("agrees", [False, True])
def test_greedy_through_generate_equals_target_greedy_and_drafts(agrees):
    target = llama(0)
    draft = copy.deepcopy(target) if agrees else llama(3, layers=1, hidden=16)
    t_calls, d_calls = _counted(target), _counted(draft)
    for s in range(3):
        x = prompt(s)
        ref = hf_greedy(target, x, 24)
        t_calls.clear(), d_calls.clear()
        out = target.generate(x, custom_generate=custom_generate, draft_model=draft, num_draft_tokens=4,
                              max_new_tokens=24, do_sample=False, pad_token_id=0,
                              compact_draft=False)  # the draft's own forward, so the hook counts it
        assert torch.equal(out, ref)
        assert len(d_calls) > 0  # the draft really drafted ...
        if agrees:  # ... and a draft that always agrees saves target passes (24 tokens in 5 rounds)
            assert len(t_calls) == 5


def test_judge_and_stats_through_generate():
    target, draft = llama(0), llama(3, layers=1, hidden=16)
    head = JudgeHead(target.config.hidden_size, threshold=-math.inf)  # accepts every drafted token
    x = prompt(1)
    out = target.generate(x, custom_generate=custom_generate, draft_model=draft, judge=head,
                          num_draft_tokens=3, max_new_tokens=12, return_dict_in_generate=True, pad_token_id=0)
    ref = generate(target, draft, x, 12, num_draft_tokens=3, judge=head)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.hasten_stats.accepted_tokens == out.hasten_stats.drafted_tokens > 0


def test_sampling_through_generate_uses_the_generator():
    target, draft = llama(0), llama(3, layers=1, hidden=16)
    x = prompt(2)
    kw = dict(custom_generate=custom_generate, draft_model=draft, do_sample=True, temperature=0.7, top_k=0,
              max_new_tokens=10, pad_token_id=0)
    a = target.generate(x, generator=torch.Generator().manual_seed(5), **kw)
    b = target.generate(x, generator=torch.Generator().manual_seed(5), **kw)
    c = generate(target, draft, x, 10, do_sample=True, temperature=0.7,
                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a, c.sequences)


def test_unsupported_settings_are_clear_errors():
    target, draft = llama(0), llama(3, layers=1, hidden=16)
    x = prompt(0)
    with pytest.raises(HastenError, match="batch 1"):
        target.generate(torch.cat([x, x]), custom_generate=custom_generate, draft_model=draft, max_new_tokens=4,
                        pad_token_id=0)
    with pytest.raises(HastenError, match="draft_model"):
        target.generate(x, custom_generate=custom_generate, max_new_tokens=4, pad_token_id=0)
    with pytest.raises(HastenError, match="TopPLogitsWarper"):
        target.generate(x, custom_generate=custom_generate, draft_model=draft, do_sample=True, top_p=0.5,
                        max_new_tokens=4, pad_token_id=0)
