"""Speculative decoding: greedy equality with target-only greedy, EOS, rollback, counters, bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hasten.decoding import autoregressive_generate, generate
from hasten.errors import HastenError

V = 40


def llama(seed: int, layers: int = 2, hidden: int = 32, vocab: int = V) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, initializer_range=0.3, eos_token_id=None,
                      bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def gpt2(seed: int, layers: int = 2, hidden: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                     initializer_range=0.3, eos_token_id=None, bos_token_id=None)
    return GPT2LMHeadModel(cfg).eval()


def hf_greedy(model, x, n, eos=None):
    out = model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0,
                         attention_mask=torch.ones_like(x))
    return out


def prompt(seed: int, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (1, n), generator=g)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_equal_with_draft_that_always_agrees(k):
    target = llama(0)
    for s in range(3):
        x = prompt(s)
        ref = hf_greedy(target, x, 25)
        out = generate(target, target, x, 25, num_draft_tokens=k)
        assert torch.equal(out.sequences, ref)
        st = out.stats
        assert st.accepted_tokens == st.drafted_tokens  # every drafted token accepted
        # each target pass yields k+1 tokens, so ceil(25 / (k+1)) passes
        assert st.target_forwards == -(-25 // (k + 1))
        assert st.mean_accepted_length > 1


def test_greedy_equal_with_draft_that_never_agrees():
    target = llama(0)
    draft = llama(1, layers=1, hidden=16)
    with torch.no_grad():
        draft.lm_head.weight.zero_()  # all-equal logits: the draft always proposes token 0
    x = prompt(3)
    ref = hf_greedy(target, x, 30)
    assert 0 not in ref[0, x.shape[1]:].tolist()  # precondition: the target never emits token 0
    for k in (1, 4):
        out = generate(target, draft, x, 30, num_draft_tokens=k)
        assert torch.equal(out.sequences, ref)
        assert out.stats.accepted_tokens == 0
        assert out.stats.target_forwards == 30  # one target pass per token, as without a draft
        assert out.stats.mean_accepted_length == 1.0


def test_greedy_equal_with_unrelated_draft_and_gpt2():
    for target, draft in [(llama(0), llama(7, layers=1, hidden=16)), (gpt2(0), gpt2(5, layers=1))]:
        for s in range(3):
            x = prompt(10 + s)
            ref = hf_greedy(target, x, 40)
            for k in (2, 5):
                out = generate(target, draft, x, 40, num_draft_tokens=k)
                assert torch.equal(out.sequences, ref)


def test_partially_agreeing_draft_matches_and_counts():
    """A draft that agrees sometimes exercises rollback of both caches mid-draft."""
    target = llama(0)
    draft = llama(0, layers=2)
    with torch.no_grad():  # perturb the copy so that it agrees often but not always
        for p in draft.parameters():
            p.add_(0.15 * torch.randn_like(p))
    total_acc = total_rej = 0
    for s in range(4):
        x = prompt(20 + s)
        ref = hf_greedy(target, x, 40)
        out = generate(target, draft, x, 40, num_draft_tokens=4)
        assert torch.equal(out.sequences, ref)
        st = out.stats
        total_acc += st.accepted_tokens
        total_rej += st.drafted_tokens - st.accepted_tokens
        assert st.new_tokens == 40
        # one target pass per draft, plus at most one plain step when a single token was left
        assert st.drafts <= st.target_forwards <= st.drafts + 1
    assert total_acc > 0 and total_rej > 0  # both paths were exercised


def test_eos_inside_a_draft():
    target = llama(0)
    x = prompt(4)
    free = hf_greedy(target, x, 30)[0, x.shape[1]:].tolist()
    # EOS := the first token that appears for the first time at index >= 3 of the free-running output
    idx = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    eos = free[idx]
    ref = hf_greedy(target, x, 30, eos=eos)
    assert ref.shape[1] == x.shape[1] + idx + 1
    for k in (2, 4, 8):
        out = generate(target, target, x, 30, num_draft_tokens=k, eos_token_id=eos)
        assert torch.equal(out.sequences, ref)
        assert out.sequences[0, -1].item() == eos
    base = autoregressive_generate(target, x, 30, eos_token_id=eos)
    assert torch.equal(base.sequences, ref)


def test_max_new_tokens_respected_and_zero():
    target = llama(0)
    x = prompt(2)
    for n in (1, 2, 7):
        out = generate(target, target, x, n, num_draft_tokens=4)
        assert out.stats.new_tokens == n
        assert torch.equal(out.sequences, hf_greedy(target, x, n))
    out = generate(target, target, x, 0)
    assert torch.equal(out.sequences, x) and out.stats.target_forwards == 0


def test_matches_transformers_assisted_generation():
    target, draft = llama(0), llama(3, layers=1, hidden=16)
    x = prompt(8)
    hf = target.generate(x, assistant_model=draft, max_new_tokens=20, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones_like(x))
    ours = generate(target, draft, x, 20, num_draft_tokens=3)
    assert torch.equal(ours.sequences, hf)


def test_bad_input_errors():
    target = llama(0)
    other_vocab = llama(1, vocab=V + 3)
    x = prompt(0)
    with pytest.raises(HastenError, match="vocabulary"):
        generate(target, other_vocab, x, 5)
    with pytest.raises(HastenError, match="k\\) must be >= 1"):
        generate(target, target, x, 5, num_draft_tokens=0)
    with pytest.raises(HastenError, match="shape"):
        generate(target, target, torch.ones(2, 3, dtype=torch.long), 5)
    with pytest.raises(HastenError, match="temperature"):
        generate(target, target, x, 5, do_sample=True, temperature=0)


def test_draft_stop_keeps_greedy_output_and_skips_doomed_drafts():
    from hasten.decoding import DraftStop

    target, draft = llama(0), llama(1, layers=1, hidden=16)
    stop = DraftStop(min_rate=0.5, min_seen=2)
    skipped = 0
    for s in range(6):
        x = prompt(s)
        plain = generate(target, draft, x, 30, num_draft_tokens=4)
        fast = generate(target, draft, x, 30, num_draft_tokens=4, draft_stop=stop)
        assert torch.equal(fast.sequences, plain.sequences)
        assert torch.equal(fast.sequences, hf_greedy(target, x, 30))
        skipped += plain.stats.drafted_tokens - fast.stats.drafted_tokens
        assert fast.stats.draft_stops <= fast.stats.target_forwards
        assert fast.stats.drafts >= fast.stats.target_forwards - 1  # stopped rounds still count as drafts
    assert skipped > 0 and sum(stop.stopped.values()) > 0  # it learnt which tokens the target rejects
    assert sum(stop.seen.values()) > 0


def test_draft_stop_table_and_bad_settings():
    from hasten.decoding import DraftStop

    st = DraftStop(min_rate=0.3, min_seen=4, explore_every=3)
    st.update([5, 6, 7], accepted=1)  # 5 accepted, 6 rejected, 7 never verified
    assert st.seen == {5: 1, 6: 1} and st.accepted == {5: 1, 6: 0}
    for _ in range(3):
        st.update([6], accepted=0)
    assert st.seen[6] == 4 and not st.stop(5)
    assert [st.stop(6) for _ in range(6)] == [True, True, False, True, True, False]  # every 3rd goes through
    for bad in ({"min_rate": 0.0}, {"min_rate": 1.0}, {"min_seen": 0}, {"explore_every": 1}):
        with pytest.raises(HastenError):
            DraftStop(**bad)


def test_a_compact_draft_runs_past_its_configured_positions():
    """CompactLlama builds its rotary tables for the positions a call needs, past max_position_embeddings as
    transformers' forward does: a long answer gives the same tokens with and without it (it used to raise)."""
    target = llama(0)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=32, initializer_range=0.3, eos_token_id=None,
                      bos_token_id=None, pad_token_id=None)
    draft = LlamaForCausalLM(cfg).eval()
    x = prompt(0)
    fast = generate(target, draft, x, 40, num_draft_tokens=3)
    plain = generate(target, draft, x, 40, num_draft_tokens=3, compact_draft=False)
    assert fast.sequences.shape[1] == x.shape[1] + 40 and torch.equal(fast.sequences, plain.sequences)


def test_custom_generate_refuses_stopping_criteria_it_would_ignore():
    from transformers import StoppingCriteria, StoppingCriteriaList

    from hasten.decoding import custom_generate

    class AfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 9, dtype=torch.bool)

    target, x = llama(0), prompt(0)
    with pytest.raises(HastenError, match="AfterThree"):
        target.generate(x, custom_generate=custom_generate, draft_model=llama(1, layers=1, hidden=16),
                        max_new_tokens=20, stopping_criteria=StoppingCriteriaList([AfterThree()]),
                        attention_mask=torch.ones_like(x), pad_token_id=0)
