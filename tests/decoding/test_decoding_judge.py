"""Judge Decoding: acceptance rule on hand-made logits and scores, +inf/-inf thresholds, monotonicity,
save/load, dataset builder, bad input."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_decoding_speculative import llama, prompt

from hasten.decoding import JudgeHead, generate, prob_to_logit, task, verify
from hasten.decoding.judge_data import build_judge_dataset, judge_metrics, train_judge
from hasten.errors import HastenError


def onehot_logits(argmaxes: list[int], vocab: int = 5) -> torch.Tensor:
    logits = torch.zeros(len(argmaxes), vocab)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return logits


def test_greedy_rule_on_hand_made_logits_and_scores():
    d = torch.tensor([1, 2, 3])
    logits = onehot_logits([1, 0, 3, 2])  # target agrees at slots 1 and 3, disagrees at slot 2
    assert verify(d, logits) == (1, 0, 0)  # standard: accept "1", replace "2" by the target's "0"
    # the judge rescues slot 2 (score 3 > 0); slot 3 agrees anyway; bonus token = argmax of slot 4
    assert verify(d, logits, judge_scores=torch.tensor([-5.0, 3.0, -1.0]), threshold=0.0) == (3, 2, 1)
    # judge score at slot 2 below the threshold: first token failing both is replaced by the target's
    assert verify(d, logits, judge_scores=torch.tensor([9.0, -0.5, 9.0]), threshold=0.0) == (1, 0, 0)
    # a high judge score on a token the target rejects, then a failure at slot 3
    d2 = torch.tensor([4, 4, 4])
    assert verify(d2, logits, judge_scores=torch.tensor([1.0, -2.0, 5.0]), threshold=0.5) == (1, 0, 1)
    # strict inequality: a score equal to the threshold does not clear it
    assert verify(d2, logits, judge_scores=torch.tensor([0.5, 0.5, 0.5]), threshold=0.5) == (0, 1, 0)
    # +inf is standard verification, -inf accepts everything drafted
    big = torch.tensor([1e30, 1e30, 1e30])
    assert verify(d2, logits, judge_scores=big, threshold=math.inf) == verify(d2, logits)
    assert verify(d2, logits, judge_scores=-big, threshold=-math.inf) == (3, 2, 3)


def test_sampling_rule_on_hand_made_probabilities():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.25, 0.75, 0.0], [0.6, 0.2, 0.2]])
    d = torch.tensor([1, 0])  # p/q = 0.5/0.75 = 2/3 at slot 1; 0.1/0.6 = 1/6 at slot 2
    g = torch.Generator().manual_seed(0)
    a, nxt, _ = verify(d, torch.log(p), draft_probs=q, target_probs=p, uniforms=torch.tensor([0.6, 0.1]),
                       generator=g)
    assert a == 2 and nxt in (0, 1, 2)  # 0.6 < 2/3 and 0.1 < 1/6: both accepted, bonus from p[2]
    a, nxt, _ = verify(d, torch.log(p), draft_probs=q, target_probs=p, uniforms=torch.tensor([0.7, 0.1]),
                       generator=g)
    assert (a, nxt) == (0, 0)  # rejected at slot 1; residual max(0, p - q) = (0.25, 0, 0) -> token 0
    a, nxt, _ = verify(d, torch.log(p), draft_probs=q, target_probs=p, uniforms=torch.tensor([0.1, 0.5]),
                       generator=g)
    assert (a, nxt) == (1, 2)  # rejected at slot 2; residual = (0, 0, 0.6) -> token 2
    a, nxt, j = verify(d, torch.log(p), draft_probs=q, target_probs=p, uniforms=torch.tensor([0.7, 0.5]),
                       judge_scores=torch.tensor([2.0, -2.0]), threshold=0.0, generator=g)
    assert (a, nxt, j) == (1, 2, 1)  # judge rescues slot 1, slot 2 fails both -> residual sample


def test_judge_never_lowers_the_accepted_count_for_a_fixed_draft():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        k, vocab = 6, 7
        d = torch.randint(0, vocab, (k,), generator=g)
        logits = torch.randn(k + 1, vocab, generator=g)
        scores = torch.randn(k, generator=g)
        thr = float(torch.randn(1, generator=g))
        a_std = verify(d, logits)[0]
        a_j = verify(d, logits, judge_scores=scores, threshold=thr)[0]
        assert a_j >= a_std
        # sampling: the same uniforms with and without the judge
        p = torch.softmax(logits, -1)
        q = torch.softmax(torch.randn(k, vocab, generator=g), -1)
        u = torch.rand(k, generator=g)
        s_std = verify(d, logits, draft_probs=q, target_probs=p, uniforms=u, generator=g)[0]
        s_j = verify(d, logits, draft_probs=q, target_probs=p, uniforms=u, judge_scores=scores,
                     threshold=thr, generator=g)[0]
        assert s_j >= s_std


def random_head(hidden: int, threshold: float, seed: int = 0) -> JudgeHead:
    torch.manual_seed(seed)
    head = JudgeHead(hidden, threshold=threshold)
    torch.nn.init.normal_(head.linear.weight, std=1.0)
    return head.eval()


@pytest.mark.parametrize("do_sample", [False, True])
def test_threshold_plus_inf_is_standard_speculative_exactly(do_sample):
    target, draft = llama(0), llama(4, layers=1, hidden=16)
    head = random_head(32, math.inf)
    for s in range(3):
        x = prompt(30 + s)
        ref = generate(target, draft, x, 30, num_draft_tokens=4, do_sample=do_sample,
                       generator=torch.Generator().manual_seed(s))
        out = generate(target, draft, x, 30, num_draft_tokens=4, do_sample=do_sample, judge=head,
                       generator=torch.Generator().manual_seed(s))
        assert torch.equal(out.sequences, ref.sequences)
        for f in ("drafts", "drafted_tokens", "accepted_tokens", "target_forwards", "draft_forwards"):
            assert getattr(out.stats, f) == getattr(ref.stats, f)
        assert out.stats.judge_accepted_tokens == 0


@pytest.mark.parametrize("do_sample", [False, True])
def test_threshold_minus_inf_accepts_every_drafted_token(do_sample):
    target, draft = llama(0), llama(4, layers=1, hidden=16)
    head = random_head(32, -math.inf)
    x = prompt(5)
    out = generate(target, draft, x, 30, num_draft_tokens=4, do_sample=do_sample, judge=head,
                   generator=torch.Generator().manual_seed(0))
    st = out.stats
    assert st.accepted_tokens == st.drafted_tokens > 0
    # with -inf the output is the draft's own greedy continuation plus one target token per round
    std = generate(target, draft, x, 30, num_draft_tokens=4)
    assert st.target_forwards < std.stats.target_forwards


def test_judge_head_for_another_hidden_size_is_a_clear_error(tmp_path):
    target = llama(0)
    with pytest.raises(HastenError, match="hidden size 48.*hidden size 32"):
        generate(target, target, prompt(0), 5, judge=JudgeHead(48))
    with pytest.raises(HastenError, match="does not exist"):
        JudgeHead.load(tmp_path / "nope.safetensors")


def test_save_load_roundtrip(tmp_path):
    for thr in (0.25, math.inf, -math.inf):
        head = random_head(32, thr, seed=3)
        head.meta = {"note": "x"}
        head.save(tmp_path / "j.safetensors")
        back = JudgeHead.load(tmp_path / "j.safetensors")
        assert torch.equal(back.linear.weight, head.linear.weight)
        assert torch.equal(back.linear.bias, head.linear.bias)
        assert back.threshold == thr and back.meta == {"note": "x"} and back.hidden_size == 32
    assert prob_to_logit(1.0) == math.inf and prob_to_logit(0.5) == 0.0


def test_answer_checker_accepts_every_wording_and_nothing_wrong():
    rng = random.Random(0)
    for q in task.train_problems(rng, 100, set()):
        ch = task.AnswerChecker(q)
        ids = task.encode(task.answer_text(q, rng=rng, mix=task.UNIFORM_MIX)) + [task.EOS]
        st = ch.start()
        for i, t in enumerate(ids):
            assert ch.acceptable(st, t)
            assert ch.acceptable(st, task.EOS) == (i == len(ids) - 1)  # <eos> only after a complete answer
            if t in task.DIGIT_IDS:  # a digit is determined by the arithmetic: every other digit is wrong
                assert sum(ch.acceptable(st, d) for d in task.DIGIT_IDS) == 1
            if t != task.EOS:
                st = ch.step(st, task.decode([t]))
    p = task.Problem(template=0, name=0, item=0, a=347, b=285, c=169)
    ch = task.AnswerChecker(p)
    st = ch.step(ch.start(), "347 + 285: 7 + 5 = 12")
    ok = {task.decode([t]) for t in task.VOCAB.values() if ch.acceptable(st, t)}
    assert ok == {",", ";", " and"}  # the three separators; "so" or a digit here would be wrong
    st = ch.step(ch.start(), "347 + 285: 7 + 5 = 12, 4 + 8 + 1 = 13, 3 + 2 + 1 = 6")
    ok = {task.decode([t]) for t in task.VOCAB.values() if ch.acceptable(st, t)}
    assert ok == {",", ";"}  # ", so" / "; result" / ", giving": the words come next


def test_candidate_pass_equals_separate_passes():
    from hasten.decoding.judge_data import _candidate_pass

    target = llama(0, vocab=len(task.VOCAB))
    p = task.Problem(template=0, name=0, item=0, a=347, b=285, c=169)
    pr, an = task.encode(task.prompt_text(p)), task.encode(task.answer_text(p, choice={s: 0 for s in task.SLOTS}))
    cands = [(0, 5), (7, 9), (7, 11), (len(an) - 1, 4)]
    with torch.no_grad():
        h = _candidate_pass(target, pr + an, len(pr), cands)
        for i, (j, c) in enumerate(cands):
            ref = target(input_ids=torch.tensor([pr + an[:j] + [c]]), output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(h[i], ref[0, -1], atol=1e-5, rtol=1e-4)


def test_dataset_builder_labels_and_trainer():
    from hasten.decoding.train import DRAFT, make_model

    target = make_model(DRAFT).eval()  # any models with the task vocabulary
    draft = llama(3, vocab=len(task.VOCAB), layers=1, hidden=16).eval()
    probs = task.train_problems(random.Random(0), 6, task.splits()["held_out_keys"])
    feats, labels, kinds = build_judge_dataset(target, probs, draft=draft, n_wrong=3)
    assert feats.shape == (labels.numel(), DRAFT.hidden_size) and len(kinds) == labels.numel()
    assert set(kinds) <= {"alternative", "draft_error", "synthetic_error"}
    assert all((lab == 1) == (k == "alternative") for lab, k in zip(labels.tolist(), kinds, strict=True))
    assert kinds.count("alternative") >= 6 * 4  # every answer has slots with other wordings
    assert 0 < kinds.count("synthetic_error") <= 3 * len(probs)
    head, curve = train_judge(feats, labels, steps=30)
    assert curve[-1]["loss"] < curve[0]["loss"]
    m = judge_metrics(head, feats, labels)
    assert 0 <= m["accept_rate_on_correct"] <= 1


def test_candidates_skip_the_targets_own_token_and_label_by_the_checker():
    from hasten.decoding.judge_data import judge_candidates

    p = task.Problem(template=0, name=0, item=0, a=347, b=285, c=169)
    an = task.encode(task.answer_text(p, choice={s: 0 for s in task.SLOTS})) + [task.EOS]
    cands = judge_candidates(p, an, target_greedy=an, draft_greedy=None, rng=random.Random(0), n_wrong=5)
    assert all(c != an[j] for j, c, _, _ in cands)  # the target's greedy token needs no judge
    sep = an.index(task.VOCAB[","])  # "7 + 5 = 12, ...": the first separator
    alts = {task.decode([c]) for j, c, lab, k in cands if j == sep}
    assert alts == {";", " and"}
    wrong_digit = task.VOCAB[" 9"]
    five = an.index(task.VOCAB[" 5"])  # "7 + 5": a wrong operand
    cands = judge_candidates(p, an, target_greedy=an, draft_greedy=[wrong_digit] * len(an), rng=random.Random(0),
                             n_wrong=0)
    assert (five, wrong_digit, 0, "draft_error") in cands


def test_task_wordings_check_and_tokenizer():
    from hasten.decoding.task import decode, encode

    p = task.Problem(template=0, name=0, item=0, a=347, b=285, c=169)
    assert task.prompt_text(p) == ("mia has 347 apples. she buys 285 more and then gives away 169. "
                                   "how many apples does she have now?\n")
    canonical = task.answer_text(p, choice={s: 0 for s in task.SLOTS})
    assert canonical == ("347 + 285: 7 + 5 = 12, 4 + 8 + 1 = 13, 3 + 2 + 1 = 6, so 632. "
                         "632 - 169: 2 - 9 = 3 borrow, 3 - 6 - 1 = 6 borrow, 6 - 1 - 1 = 4, so 463. answer 463.")
    texts = {task.answer_text(p, choice={s: i for s in task.SLOTS}) for i in range(3)}
    assert len(texts) == 3 and all(task.check(p, t) for t in texts)
    assert not task.check(p, canonical.replace("463", "473"))
    tok = task.build_tokenizer()
    rng = random.Random(0)
    for q in task.train_problems(rng, 200, set()):  # every answer is in the closed vocabulary
        s = task.prompt_text(q) + task.answer_text(q, rng=rng, mix=task.UNIFORM_MIX)
        assert tok(s)["input_ids"] == encode(s) and decode(encode(s)) == s and task.check(q, s)
        assert task.parse_prompt(task.prompt_text(q)) == q
    with pytest.raises(ValueError, match="vocabulary"):
        encode("what is 23*45?")
    sp = task.splits()
    assert len(sp["test"]) == 300 and not set(sp["test"]) & set(sp["val"])
    assert not any((q.template, q.a, q.b, q.c) in sp["held_out_keys"]
                   for q in task.train_problems(random.Random(1), 2000, sp["held_out_keys"]))


def test_saving_an_lm_checkpoint_leaves_the_training_weights_in_float32(tmp_path):
    """_save writes float16 weights without rounding the model being trained (it used to cast it to float16 and
    back at every checkpoint), and the saved folder loads as those weights rounded once."""
    import dataclasses

    import torch

    from hasten.decoding.train import DRAFT, _save, load_lm, make_model

    cfg = dataclasses.replace(DRAFT, name="tiny", hidden_size=24, heads=2, intermediate=48)
    model = make_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _save(model, cfg, tmp_path, [], 0.0, 0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    loaded = load_lm(tmp_path / "tiny").state_dict()
    assert all(torch.equal(loaded[k], v.half().float()) for k, v in before.items())
