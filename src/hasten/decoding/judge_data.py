"""Judge training data and trainer, in the spirit of Judge Decoding's "TokenCourt" (arXiv 2501.19309).

The judge is only ever asked about a drafted token that standard verification rejected (the rule is
"standard accepts OR judge accepts"), so its data are exactly such tokens: candidates ``c`` at a point of a
correct answer where the target's greedy token is something else. Labelling (our choice; the paper has
annotators mark the first wrong token of draft answers): for each training problem we take one correct
worked answer, its slots' wordings drawn uniformly from all three (``task.UNIFORM_MIX``), and at every
position ``j`` of it (prefix = the answer's first ``j`` tokens, target's greedy token ``t_j``):

* label 1, "acceptable": every token ``c != t_j`` that continues the prefix into SOME correct answer
  (``task.AnswerChecker``: another wording of a slot), i.e. correct answers phrased unlike the target;
* label 0, "must be rejected", on the draft's own mistakes: the draft model's greedy token ``d_j`` when it is
  neither ``t_j`` nor acceptable (a mis-copied operand, a wrong column sum, a number cut short);
* label 0 on ``n_wrong`` synthetic mistakes per problem: a digit replaced by another digit
  (``digit_frac`` of them) or any token by another token, again only when not acceptable and not ``t_j``.

Features are the FROZEN target's last-layer hidden state at the candidate's own position after reading
``prefix + c``, exactly what ``JudgeHead`` sees while decoding. All candidates of one answer are scored in
ONE target pass: they are appended after the answer with the position of the slot they fill and a 4-D
attention mask that lets each see only its prefix and itself (tested equal to separate passes). The head
is trained by class-weighted binary cross-entropy (each class weighted by the inverse of its frequency, as
in the paper), full batch.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from . import task
from .judge import JudgeHead
from .task import EOS, VOCAB, encode

__all__ = ["judge_candidates", "build_judge_dataset", "train_judge", "judge_metrics", "train_judge_from_folder"]

_DIGITS = [VOCAB[d] for d in "0123456789"]
_SPACED_DIGITS = [VOCAB[" " + d] for d in "0123456789"]
_TOKENS = [i for t, i in VOCAB.items() if i > EOS and t != "\n"]
KINDS = ("alternative", "draft_error", "synthetic_error")


def judge_candidates(problem: task.Problem, answer: list[int], target_greedy: list[int],
                     draft_greedy: list[int] | None, rng: random.Random, n_wrong: int = 6,
                     digit_frac: float = 0.9) -> list[tuple[int, int, int, str]]:
    """Labelled candidates ``(j, token, label, kind)`` for one correct ``answer`` (token ids, ``<eos>`` last).

    ``target_greedy[j]`` / ``draft_greedy[j]``: the models' greedy tokens after the answer's first ``j``
    tokens. See the module docstring for the rules.
    """
    checker = task.AnswerChecker(problem)
    states, ok_sets = checker.start(), []
    for tok in answer:
        ok_sets.append(checker.acceptable_tokens(states))
        if tok != EOS:
            states = checker.step(states, task.decode([tok]))
    out: list[tuple[int, int, int, str]] = []
    seen: set[tuple[int, int]] = set()

    def add(j: int, c: int, kind: str) -> None:
        if c == target_greedy[j] or (j, c) in seen:
            return
        seen.add((j, c))
        ok = c in ok_sets[j]
        out.append((j, c, int(ok), "alternative" if ok else kind))

    for j in range(len(answer)):
        for c in sorted(ok_sets[j]):
            add(j, c, "alternative")
        if draft_greedy is not None:
            add(j, draft_greedy[j], "draft_error")
    digit_pos = [j for j, t in enumerate(answer) if t in _DIGITS or t in _SPACED_DIGITS]
    for _ in range(n_wrong):
        if digit_pos and rng.random() < digit_frac:
            j = rng.choice(digit_pos)
            same_kind = _DIGITS if answer[j] in _DIGITS else _SPACED_DIGITS
            c = rng.choice([d for d in same_kind if d != answer[j]])
        else:
            j = rng.randrange(len(answer) - 1)
            c = rng.choice([t for t in _TOKENS if t != answer[j]])
        add(j, c, "synthetic_error")
    return out


def _candidate_pass(model, seq: list[int], n_prompt: int, cands: list[tuple[int, int]]) -> torch.Tensor:
    """Last hidden states (m, hidden) of candidate tokens ``(j, c)`` appended after ``seq`` in one pass, each
    at position ``n_prompt + j`` and seeing only ``seq[:n_prompt + j]`` and itself (a 4-D attention mask)."""
    n, m = len(seq), len(cands)
    ids = torch.tensor([seq + [c for _, c in cands]])
    allow = torch.zeros(n + m, n + m, dtype=torch.bool)
    allow[:n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    pos = list(range(n))
    for i, (j, _) in enumerate(cands):
        allow[n + i, :n_prompt + j] = True
        allow[n + i, n + i] = True
        pos.append(n_prompt + j)
    mask = torch.zeros(1, 1, n + m, n + m).masked_fill(~allow, float("-inf"))
    out = model(input_ids=ids, attention_mask=mask, position_ids=torch.tensor([pos]), output_hidden_states=True,
                use_cache=False)
    return out.hidden_states[-1][0, n:]


@torch.no_grad()
def build_judge_dataset(target, problems: list, draft=None, seed: int = 0, n_wrong: int = 6,
                        digit_frac: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Hidden states (N, hidden) of the frozen target, 0/1 labels (N,) and each row's kind (``KINDS``)."""
    rng = random.Random(seed)
    feats, labels, kinds = [], [], []
    for p in problems:
        pr = encode(task.prompt_text(p))
        an = encode(task.answer_text(p, rng=rng, mix=task.UNIFORM_MIX)) + [EOS]
        seq, n0 = pr + an, len(pr)
        t_greedy = target(input_ids=torch.tensor([seq]), use_cache=False).logits[0, n0 - 1:-1].argmax(-1).tolist()
        d_greedy = None
        if draft is not None:
            d_greedy = draft(input_ids=torch.tensor([seq]), use_cache=False).logits[0, n0 - 1:-1].argmax(-1).tolist()
        cands = judge_candidates(p, an, t_greedy, d_greedy, rng, n_wrong=n_wrong, digit_frac=digit_frac)
        if not cands:
            continue
        feats.append(_candidate_pass(target, seq, n0, [(j, c) for j, c, _, _ in cands]))
        labels.append(torch.tensor([lab for _, _, lab, _ in cands], dtype=torch.float32))
        kinds += [k for *_, k in cands]
    return torch.cat(feats).float(), torch.cat(labels), kinds


def train_judge(feats: torch.Tensor, labels: torch.Tensor, steps: int = 500, seed: int = 0,
                threshold: float = 0.0, l2: float = 1e-4) -> tuple[JudgeHead, list[dict]]:
    """Class-weighted logistic regression -> (head, loss curve).

    Features are standardised (per-dimension mean and std of the training set) and the weights fitted
    by full-batch L-BFGS with a small L2 penalty; the standardisation is then folded into the head
    (``w' = w / std``, ``b' = b - mean . w'``), so the shipped head is still ``s = w' . h + b'``. (Adam on the
    raw hidden states stopped far from the optimum: it rejected 79% of wrong training tokens where
    this fit rejects 93% at the same threshold.)
    """
    torch.manual_seed(seed)
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    x = (feats - mu) / sd
    pos = labels.mean().clamp(1e-6, 1 - 1e-6)
    wt = torch.where(labels > 0.5, 0.5 / pos, 0.5 / (1 - pos))  # each class carries half the weight
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    curve: list[dict] = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, labels, weight=wt) + l2 * (w * w).sum()
        loss.backward()
        curve.append({"step": len(curve), "loss": round(loss.item(), 5)})
        return loss

    opt.step(closure)
    head = JudgeHead(feats.shape[1], threshold=threshold)
    with torch.no_grad():
        w_h = w / sd
        head.linear.weight.copy_(w_h[None])
        head.linear.bias.copy_(b - (mu * w_h).sum())
    return head.eval(), curve[::10] + curve[-1:]


@torch.inference_mode()
def judge_metrics(head: JudgeHead, feats: torch.Tensor, labels: torch.Tensor, kinds: list[str] | None = None) -> dict:
    """Accept rate on acceptable tokens (recall) and reject rate on wrong ones at the head's threshold,
    and the accept rate of each kind of candidate when ``kinds`` is given."""
    acc = head(feats) > head.threshold
    pos, neg = labels > 0.5, labels < 0.5
    out = {"tokens": int(labels.numel()), "wrong_tokens": int(neg.sum()),
           "accept_rate_on_correct": round(float(acc[pos].float().mean()), 4),
           "reject_rate_on_wrong": round(float((~acc[neg]).float().mean()), 4)}
    if kinds is not None:
        out["accept_rate_by_kind"] = {
            k: round(float(acc[torch.tensor([x == k for x in kinds])].float().mean()), 4)
            for k in KINDS if k in kinds}
        out["count_by_kind"] = {k: kinds.count(k) for k in KINDS}
    return out


def train_judge_from_folder(out: Path, n_problems: int = 600, seed: int = 0, n_val: int = 100, n_wrong: int = 6,
                            digit_frac: float = 0.9) -> dict:
    """Build data from the shipped target and draft in ``out`` (train split), train, report on val, save."""
    from ..io import write_json
    from .train import load_lm

    t0 = time.time()
    target, draft = load_lm(out / "target"), load_lm(out / "draft")
    sp = task.splits()
    train = task.train_problems(random.Random(10_000 + seed), n_problems, sp["held_out_keys"])
    ftr, ytr, ktr = build_judge_dataset(target, train, draft=draft, seed=seed, n_wrong=n_wrong, digit_frac=digit_frac)
    fva, yva, kva = build_judge_dataset(target, sp["val"][:n_val], draft=draft, seed=seed + 1, n_wrong=n_wrong,
                                        digit_frac=digit_frac)
    head, curve = train_judge(ftr, ytr, seed=seed)
    head.meta = {"target": "hasten/models/lm/target", "train_problems": n_problems, "seed": seed}
    head.save(out / "judge.safetensors")
    info = {"train_problems": n_problems, "val_problems": n_val, "n_wrong": n_wrong, "digit_frac": digit_frac,
            "train": {"tokens": int(ytr.numel()), "wrong_tokens": int((ytr < 0.5).sum())},
            "metrics": {"train": judge_metrics(head, ftr, ytr, ktr), "val": judge_metrics(head, fva, yva, kva)},
            "threshold_logit": head.threshold, "loss_curve": curve,
            "train_seconds": round(time.time() - t0, 1)}
    write_json(out / "judge_log.json", info)
    return info


def calibrate_threshold(target, draft, head: JudgeHead, problems: list, deltas: tuple[float, ...],
                        max_drop_points: float = 0.5, ks: tuple[int, ...] = (8,)) -> dict:
    """Pick the judge's threshold and drafted tokens per round ``k`` on VALIDATION problems (never test).

    For each ``k`` and each probability threshold ``delta`` (ascending) run Judge Decoding and compare its
    task accuracy with target-only greedy on the same problems; per ``k`` keep the smallest ``delta`` whose
    accuracy drop is at most ``max_drop_points`` (smaller delta = more tokens accepted = faster), then
    choose the ``k`` whose kept run took the least time in total (one thread, the user's cost).
    """
    from .judge import prob_to_logit
    from .speculative import autoregressive_generate, generate

    def run(fn) -> tuple[float, float, float]:
        ok, acc_tok, drafts, t0 = 0, 0, 0, time.perf_counter()
        for p in problems:
            x = torch.tensor([encode(task.prompt_text(p))])
            out = fn(x)
            ok += task.check(p, task.decode(out.new_tokens.tolist()))
            acc_tok += out.stats.accepted_tokens
            drafts += out.stats.drafts
        return ok / len(problems), (1 + acc_tok / drafts) if drafts else 1.0, time.perf_counter() - t0

    base_accuracy = run(lambda x: autoregressive_generate(target, x, task.MAX_NEW_TOKENS, eos_token_id=EOS))[0]
    rows, best = [], None
    for k in ks:
        for delta in sorted(deltas):
            thr = prob_to_logit(delta)
            acc, mal, secs = run(lambda x, t=thr, k=k: generate(target, draft, x, task.MAX_NEW_TOKENS,
                                                                num_draft_tokens=k, judge=head, threshold=t,
                                                                eos_token_id=EOS))
            drop = 100 * (base_accuracy - acc)
            row = {"k": k, "delta": delta, "threshold_logit": thr, "accuracy": acc, "drop_points": round(drop, 2),
                   "mean_accepted_length": round(mal, 3), "seconds": round(secs, 2)}
            rows.append(row)
            if drop <= max_drop_points:
                if best is None or secs < best["seconds"]:
                    best = row
                break  # larger thresholds only accept fewer tokens
    return {"problems": len(problems), "target_greedy_accuracy": base_accuracy, "max_drop_points": max_drop_points,
            "rows": rows, "chosen_delta": None if best is None else best["delta"],
            "chosen_k": None if best is None else best["k"]}
