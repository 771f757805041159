"""The compact draft forward: logits equal to transformers' forward (prefill, one token, after a rollback),
used by speculative decoding for Llama drafts without changing the output, and a fallback for the rest."""

from __future__ import annotations

import pytest
import torch
from test_decoding_speculative import gpt2, hf_greedy, llama, prompt
from transformers import LlamaConfig, LlamaForCausalLM

from hasten.decoding import generate
from hasten.decoding.compact import CompactLlama, supports


def _llama(kv_heads: int, tie: bool, bias: bool = False, rope_scaling: dict | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=tie,
                      attention_bias=bias, initializer_range=0.3, rope_scaling=rope_scaling)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kv_heads,tie,bias,rope", [
    (4, True, False, None), (2, False, False, None), (1, True, True, None),
    (4, True, False, {"rope_type": "linear", "factor": 2.0})])
def test_logits_match_transformers_incrementally_and_after_rollback(kv_heads, tie, bias, rope):
    m = _llama(kv_heads, tie, bias, rope)
    c = CompactLlama(m, max_length=64)
    ids = torch.randint(0, 50, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids).logits[0]
    torch.testing.assert_close(c(ids[:, :10]), ref[9], atol=1e-5, rtol=1e-5)   # prefill of 10
    for i in range(10, 14):                                                     # one token at a time
        torch.testing.assert_close(c(ids[:, i:i + 1]), ref[i], atol=1e-5, rtol=1e-5)
    c.rollback(6)                                                               # forget 6.. and redo
    assert c.length == 6
    torch.testing.assert_close(c(ids[:, 6:20]), ref[19], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at most 64"):
        c(torch.zeros(1, 60, dtype=torch.long))


def test_unsupported_models_fall_back_to_transformers():
    assert supports(gpt2(0)) is not None
    assert "changes with length" in supports(_llama(4, True, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert supports(llama(0)) is None
    with pytest.raises(ValueError, match="cannot run"):
        CompactLlama(gpt2(0))
    target, draft = llama(0), gpt2(1)
    x = prompt(0)
    out = generate(target, draft, x, 20, num_draft_tokens=3)  # the GPT-2 draft runs through its own forward
    assert torch.equal(out.sequences, hf_greedy(target, x, 20))


def test_speculative_output_and_counts_do_not_depend_on_the_compact_draft():
    target, draft = llama(0), llama(3, layers=1, hidden=16)
    hook_calls = []
    draft.register_forward_hook(lambda *_: hook_calls.append(1))
    for s in range(3):
        x = prompt(s)
        hook_calls.clear()
        fast = generate(target, draft, x, 30, num_draft_tokens=4)
        assert hook_calls == []  # the draft ran compactly ...
        assert fast.stats.draft_forwards > 0  # ... and really drafted
        slow = generate(target, draft, x, 30, num_draft_tokens=4, compact_draft=False)
        assert len(hook_calls) == slow.stats.draft_forwards > 0
        assert torch.equal(fast.sequences, slow.sequences)
        assert torch.equal(fast.sequences, hf_greedy(target, x, 30))
        assert fast.stats.accepted_tokens == slow.stats.accepted_tokens  # same drafts (no near-ties here)
        g1, g2 = torch.Generator().manual_seed(s), torch.Generator().manual_seed(s)
        a = generate(target, draft, x, 30, num_draft_tokens=4, do_sample=True, generator=g1)
        b = generate(target, draft, x, 30, num_draft_tokens=4, do_sample=True, generator=g2, compact_draft=False)
        assert torch.equal(a.sequences, b.sequences)  # same draws from the same draft distributions
