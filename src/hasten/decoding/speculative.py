"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023) with an optional Judge Decoding rule.

One *round* of the loop:

1. the draft model proposes ``k`` tokens ``d_1..d_k`` autoregressively from its own KV cache
   (``q_i`` = the draft's distribution at step ``i``);
2. the target model scores the uncached committed tokens plus all ``k`` drafts in ONE forward pass,
   giving ``p_1..p_{k+1}`` (``p_i`` predicts the slot of ``d_i``; ``p_{k+1}`` is the "bonus" slot);
3. verification accepts a prefix ``d_1..d_a`` and appends one token from the target
   (the correction at slot ``a+1``, or the bonus token when ``a = k``);
4. both KV caches are cropped back to the accepted prefix (rollback on rejection).

Verification (``verify``):

* greedy: ``d_i`` is accepted while ``d_i == argmax p_i``; the output equals target-only greedy.
* sampling (lossless speculative sampling): accept ``d_i`` when ``r_i < min(1, p_i(d_i) / q_i(d_i))``
  with ``r_i ~ U(0, 1)``; at the first rejection sample from the residual
  ``norm(max(0, p_i - q_i))``; if all are accepted sample the bonus from ``p_{k+1}``.
  The output is distributed exactly as sampling from the target alone.
* Judge Decoding (Bachmann et al. 2025, arXiv 2501.19309; rule as written in AutoJudge,
  arXiv 2504.20039): token ``d_i`` is accepted when the standard rule above accepts it OR the
  judge score ``s_i = w . h_i + b`` (``h_i`` = target's last hidden state at ``d_i``'s own position)
  clears the threshold, ``s_i > threshold``. The first token that fails both is replaced by the
  target's token (greedy: ``argmax p_i``; sampling: a draw from the residual). Scores and threshold
  are logits: the paper's probability threshold ``delta`` is ``threshold = log(delta / (1 - delta))``;
  ``threshold = +inf`` (``delta = 1``) is standard speculative decoding exactly, ``-inf`` accepts
  every drafted token. Judge Decoding is lossy on purpose.

Accounting choice: a round in which no token can be drafted (only one new token left before
``max_new_tokens``) is a plain target step; it counts a target forward pass but not a draft, so the
mean accepted length ``1 + accepted / drafts`` only averages over rounds that could draft. A round that a
``DraftStop`` ends before its first token does count, as a draft with nothing accepted.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import HastenError

__all__ = ["DecodingStats", "DraftStop", "SpeculativeOutput", "generate", "autoregressive_generate", "verify"]


@dataclass
class DecodingStats:
    """Counters of one decoding run. ``mean_accepted_length = 1 + accepted_tokens / drafts``."""

    new_tokens: int = 0
    drafts: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    judge_accepted_tokens: int = 0  # accepted only because the judge score cleared the threshold
    draft_stops: int = 0  # rounds ended early by a DraftStop
    target_forwards: int = 0
    draft_forwards: int = 0
    wall_s: float = 0.0

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def target_forwards_per_token(self) -> float:
        return self.target_forwards / self.new_tokens if self.new_tokens else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_accepted_length=self.mean_accepted_length, acceptance_rate=self.acceptance_rate,
                 target_forwards_per_token=self.target_forwards_per_token)
        return d


class DraftStop:
    """Stop drafting before a token the target keeps rejecting: a per-token acceptance table, learnt online.

    Every drafted token that verification reaches (the accepted ones and the first rejected one) updates
    the count of its token id. Before proposing a token whose estimated acceptance rate
    ``(accepted + 1) / (seen + 2)`` is below ``min_rate`` after at least ``min_seen`` verdicts, the round
    ends: the target verifies the drafts so far and supplies this position itself. A token it would
    reject anyway costs one round either way, so stopping only removes the doomed tokens (and all
    drafts after them) from the verification pass and from the draft's work.

    Lossless. Greedy: the output is the target's greedy tokens whatever is proposed. Sampling: a token
    is drawn from the draft's ``q`` as usual; with probability ``q(S)`` it falls in the stopped set ``S``
    and the target samples the position itself (from ``p``); otherwise the proposed token is distributed
    as ``q' = q 1[not S] / q(not S)``, and verification must use ``q'`` (``blocked`` gives ``S``), so the
    position is again distributed as ``p`` (the chi-square test covers it). Keep one object across
    calls to keep what it learnt.
    """

    def __init__(self, min_rate: float = 0.3, min_seen: int = 4, explore_every: int = 16):
        if not 0 < min_rate < 1:
            raise HastenError(f"DraftStop min_rate must be in (0, 1), got {min_rate}")
        if min_seen < 1 or explore_every < 2:
            raise HastenError(f"DraftStop needs min_seen >= 1 and explore_every >= 2, got {min_seen}, {explore_every}")
        self.min_rate, self.min_seen, self.explore_every = float(min_rate), int(min_seen), int(explore_every)
        self.seen: dict[int, int] = {}
        self.accepted: dict[int, int] = {}
        self.stopped: dict[int, int] = {}

    def _low(self, token: int) -> bool:
        n = self.seen.get(token, 0)
        return n >= self.min_seen and (self.accepted.get(token, 0) + 1) / (n + 2) < self.min_rate

    def _in_stop_set(self, token: int) -> bool:
        """Is ``token`` in ``S`` now: a low estimate, and not its turn to be proposed anyway (every
        ``explore_every``-th time, so that its estimate keeps being updated)?"""
        return self._low(token) and (self.stopped.get(token, 0) + 1) % self.explore_every != 0

    def blocked(self, vocab_size: int) -> torch.Tensor:
        """The set ``S`` that the next :meth:`stop` call stops on, as a bool mask (vocab_size,)."""
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        for t in self.seen:
            if t < vocab_size and self._in_stop_set(t):
                mask[t] = True
        return mask

    def stop(self, token: int) -> bool:
        """Should the round end before ``token`` (``token`` in ``S``)? Counts the turn of a low token."""
        stop = self._in_stop_set(token)
        if self._low(token):
            self.stopped[token] = self.stopped.get(token, 0) + 1
        return stop

    def update(self, drafts: list[int], accepted: int) -> None:
        """Record one round: ``drafts[:accepted]`` were accepted, ``drafts[accepted]`` (if any) rejected."""
        for i, tok in enumerate(drafts[:accepted + 1]):
            self.seen[tok] = self.seen.get(tok, 0) + 1
            self.accepted[tok] = self.accepted.get(tok, 0) + (i < accepted)


@dataclass
class SpeculativeOutput:
    """``sequences``: prompt + new tokens, shape (1, n + new). ``stats``: the counters."""

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    stats: DecodingStats = field(default_factory=DecodingStats)


# ---------------------------------------------------------------------------------------------
# transformers version glue: the cache keyword changed from ``past_key_values`` to ``cache`` (5.x)
# and ``Cache.crop`` now takes the (negative) number of tokens to remove.


def _cache_kw(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def _crop(cache, length: int) -> None:
    """Roll the KV cache back to its first ``length`` positions."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # negative = number of tokens to remove (all transformers versions)


class _Runner:
    """Calls a causal LM on new tokens with its KV cache, tracking how many positions are cached."""

    def __init__(self, model: torch.nn.Module, hidden: bool = False):
        self.model = model
        self.kw = _cache_kw(model)
        self.cache = None
        self.hidden = hidden
        self.calls = 0

    @property
    def cached(self) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length()

    def __call__(self, ids: torch.Tensor, keep: int):
        kwargs = {self.kw: self.cache, "use_cache": True, "logits_to_keep": keep}
        if self.hidden:
            kwargs["output_hidden_states"] = True
        out = self.model(input_ids=ids, **kwargs)
        self.cache = _out_cache(out)
        self.calls += 1
        return out

    def rollback(self, length: int) -> None:
        if self.cache is not None:
            _crop(self.cache, length)


class _CompactRunner:
    """The draft through :class:`~hasten.decoding.compact.CompactLlama`, with ``_Runner``'s interface."""

    def __init__(self, model: torch.nn.Module, max_length: int):
        from .compact import CompactLlama

        self.model = model
        self.compact = CompactLlama(model, max_length=max_length)
        self.calls = 0

    @property
    def cached(self) -> int:
        return self.compact.length

    def __call__(self, ids: torch.Tensor, keep: int):
        self.calls += 1
        return _Logits(self.compact(ids)[None, None])

    def rollback(self, length: int) -> None:
        self.compact.rollback(length)


@dataclass
class _Logits:
    logits: torch.Tensor


def _draft_runner(draft: torch.nn.Module, compact: bool, max_length: int):
    from .compact import supports

    return _CompactRunner(draft, max_length) if compact and supports(draft) is None else _Runner(draft)


# ---------------------------------------------------------------------------------------------


def _probs(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Warp logits (..., V) to the sampling distribution: temperature, then top-k."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def verify(
    draft_tokens: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    draft_probs: torch.Tensor | None = None,
    target_probs: torch.Tensor | None = None,
    judge_scores: torch.Tensor | None = None,
    threshold: float = math.inf,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int]:
    """Verify ``k`` drafted tokens against the target; returns ``(accepted, next_token, judge_only)``.

    ``draft_tokens``: (k,) ids; ``target_logits``: (k+1, V) target logits at the draft slots plus the
    bonus slot. Greedy when ``draft_probs`` is None, else speculative sampling with ``draft_probs``
    (k, V) = q and ``target_probs`` (k+1, V) = p, and ``uniforms`` (k,) the ``r_i`` (drawn here if None).
    ``judge_scores`` (k,) logits: a token is also accepted when ``score > threshold``.
    ``next_token`` is the target's replacement for the first token failing both tests, or the
    bonus token when all ``k`` are accepted. ``judge_only`` counts tokens the standard rule rejected.
    """
    k = draft_tokens.shape[0]
    if draft_probs is None:
        greedy = target_logits.argmax(-1)
        ok = greedy[:k] == draft_tokens
    else:
        if uniforms is None:
            uniforms = torch.rand(k, generator=generator)
        idx = torch.arange(k)
        p_d = target_probs[idx, draft_tokens]
        q_d = draft_probs[idx, draft_tokens]
        ok = uniforms * q_d < p_d  # r < p/q  without dividing (q_d > 0 for a sampled token)
    standard_ok = ok
    if judge_scores is not None:
        ok = ok | (judge_scores > threshold)
    fails = (~ok).nonzero()
    a = int(fails[0, 0]) if fails.numel() else k
    judge_only = int((ok[:a] & ~standard_ok[:a]).sum()) if judge_scores is not None else 0
    if draft_probs is None:
        nxt = int(greedy[a])
    elif a == k:
        nxt = int(torch.multinomial(target_probs[k], 1, generator=generator))
    else:
        residual = (target_probs[a] - draft_probs[a]).clamp_min(0)
        total = residual.sum()
        if total <= 0:  # p == q at this slot: rejection has probability 0 in exact arithmetic
            residual, total = target_probs[a], 1.0
        nxt = int(torch.multinomial(residual / total, 1, generator=generator))
    return a, nxt, judge_only


def _vocab(model: torch.nn.Module) -> int:
    emb = model.get_output_embeddings()
    return int(emb.weight.shape[0]) if emb is not None else int(model.config.vocab_size)


def _eos_set(model: torch.nn.Module, eos_token_id) -> set[int]:
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


def _check_prompt(input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        shape = tuple(input_ids.shape)
        raise HastenError(f"input_ids must have shape (1, n), one prompt at a time, got {shape}")
    if input_ids.shape[1] < 1:
        raise HastenError("input_ids is empty: give at least one prompt token")
    if max_new_tokens < 0:
        raise HastenError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    return input_ids.long()


@torch.inference_mode()
def generate(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    num_draft_tokens: int = 4,
    do_sample: bool = False,
    judge=None,
    threshold: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    compact_draft: bool = True,
    draft_stop: DraftStop | None = None,
) -> SpeculativeOutput:
    """Speculative decoding of ``target`` with ``draft`` (two HF causal LMs sharing a tokenizer).

    ``num_draft_tokens`` = k tokens drafted per round. ``do_sample=False`` is greedy (output identical
    to target-only greedy); ``do_sample=True`` is lossless speculative sampling at ``temperature`` /
    ``top_k`` (same warping for target and draft). ``judge``: a :class:`hasten.decoding.JudgeHead`
    turns this into Judge Decoding with ``threshold`` (a logit; default ``judge.threshold``).
    Stops after ``max_new_tokens`` or at EOS (``eos_token_id``, default the target's), which is kept.
    ``compact_draft``: run a Llama-family draft through :mod:`hasten.decoding.compact` (same math, a
    fraction of transformers' per-call overhead; the output does not depend on it, see there); other
    drafts, or ``False``, use the transformers forward. ``draft_stop``: a :class:`DraftStop` that ends a
    round before a token the target keeps rejecting (lossless; keep one object across calls).
    """
    if num_draft_tokens < 1:
        raise HastenError(f"num_draft_tokens (k) must be >= 1, got {num_draft_tokens}")
    vt, vd = _vocab(target), _vocab(draft)
    if vt != vd:
        raise HastenError(f"target and draft must share a vocabulary: target has {vt} tokens, draft has {vd}")
    if do_sample and temperature <= 0:
        raise HastenError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 1:
        raise HastenError(f"top_k must be >= 1, got {top_k}")
    if judge is not None:
        judge.check_model(target)
        if threshold is None:
            threshold = judge.threshold
    input_ids = _check_prompt(input_ids, max_new_tokens)
    eos = _eos_set(target, eos_token_id)
    k = num_draft_tokens
    stats = DecodingStats()
    t0 = time.perf_counter()

    tgt = _Runner(target, hidden=judge is not None)
    drf = _draft_runner(draft, compact_draft, input_ids.shape[1] + max_new_tokens + k + 1)
    tokens: list[int] = input_ids[0].tolist()
    n_prompt = len(tokens)
    done = max_new_tokens == 0

    while not done:
        remaining = max_new_tokens - (len(tokens) - n_prompt)
        k_eff = min(k, remaining - 1)
        n = len(tokens)
        drafts: list[int] = []
        q_rows: list[torch.Tensor] = []
        if k_eff > 0:
            # --- draft k tokens (feeds whatever the draft has not cached yet, then its own drafts)
            feed = torch.tensor([tokens[drf.cached:]])
            for _ in range(k_eff):
                logits = drf(feed, keep=1).logits[0, -1]
                if do_sample:
                    q = _probs(logits, temperature, top_k)
                    tok = int(torch.multinomial(q, 1, generator=generator))
                    if draft_stop is not None:  # a proposed token is drawn from q restricted to "not S"
                        blocked = draft_stop.blocked(q.shape[-1])
                        if blocked.any() and not blocked[tok]:
                            q = q.masked_fill(blocked, 0.0)
                            q = q / q.sum()
                else:
                    tok = int(logits.argmax())
                if draft_stop is not None and draft_stop.stop(tok):
                    stats.draft_stops += 1
                    break  # the target would most likely reject it: verify what we have
                if do_sample:
                    q_rows.append(q)
                drafts.append(tok)
                if tok in eos:  # nothing after an EOS can be kept: stop drafting
                    break
                feed = torch.tensor([[tok]])
        # --- one target pass over uncached committed tokens + drafts
        m = len(drafts)
        t_in = torch.tensor([tokens[tgt.cached:] + drafts])
        out = tgt(t_in, keep=m + 1)
        t_logits = out.logits[0]
        if m == 0:
            if do_sample:
                nxt = int(torch.multinomial(_probs(t_logits[-1], temperature, top_k), 1, generator=generator))
            else:
                nxt = int(t_logits[-1].argmax())
            a, judge_only = 0, 0
            if k_eff > 0:  # a DraftStop ended the round before its first token: a draft of 0 accepted
                stats.drafts += 1
        else:
            d = torch.tensor(drafts)
            scores = None
            if judge is not None:
                scores = judge.score(out.hidden_states[-1][0, -m:])
            if do_sample:
                a, nxt, judge_only = verify(d, t_logits, draft_probs=torch.stack(q_rows),
                                            target_probs=_probs(t_logits, temperature, top_k),
                                            judge_scores=scores, threshold=threshold, generator=generator)
            else:
                a, nxt, judge_only = verify(d, t_logits, judge_scores=scores, threshold=threshold)
            stats.drafts += 1
            stats.drafted_tokens += m
        new = drafts[:a]
        if not (new and new[-1] in eos):
            new.append(nxt)
        stats.accepted_tokens += a
        stats.judge_accepted_tokens += judge_only
        if draft_stop is not None and drafts:
            draft_stop.update(drafts, a)
        tokens.extend(new)
        # --- rollback: keep only the accepted prefix in both caches
        tgt.rollback(n + a)
        drf.rollback(min(drf.cached, n + a))
        hit = [i for i, t in enumerate(new) if t in eos]
        if hit:
            del tokens[n + hit[0] + 1:]
            done = True
        if len(tokens) - n_prompt >= max_new_tokens:
            done = True

    stats.target_forwards = tgt.calls
    stats.draft_forwards = drf.calls
    stats.new_tokens = len(tokens) - n_prompt
    stats.wall_s = time.perf_counter() - t0
    seq = torch.tensor([tokens])
    return SpeculativeOutput(sequences=seq, new_tokens=seq[0, n_prompt:], stats=stats)


@torch.inference_mode()
def autoregressive_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> SpeculativeOutput:
    """Plain one-token-per-pass decoding with the same lean loop (the fair "target-only" baseline)."""
    input_ids = _check_prompt(input_ids, max_new_tokens)
    eos = _eos_set(model, eos_token_id)
    stats = DecodingStats()
    t0 = time.perf_counter()
    run = _Runner(model)
    tokens: list[int] = input_ids[0].tolist()
    n_prompt = len(tokens)
    feed = input_ids
    while len(tokens) - n_prompt < max_new_tokens:
        logits = run(feed, keep=1).logits[0, -1]
        if do_sample:
            tok = int(torch.multinomial(_probs(logits, temperature, top_k), 1, generator=generator))
        else:
            tok = int(logits.argmax())
        tokens.append(tok)
        if tok in eos:
            break
        feed = torch.tensor([[tok]])
    stats.target_forwards = run.calls
    stats.new_tokens = len(tokens) - n_prompt
    stats.wall_s = time.perf_counter() - t0
    seq = torch.tensor([tokens])
    return SpeculativeOutput(sequences=seq, new_tokens=seq[0, n_prompt:], stats=stats)
