"""hasten's speculative and Judge Decoding behind transformers' own ``model.generate(...)``.

transformers (4.56+) lets ``generate`` take a decoding loop as a callable: ``custom_generate=fn``.
``generate`` still prepares everything users rely on (generation config, ``max_new_tokens``, EOS,
``do_sample`` / ``temperature`` / ``top_k``) and then calls ``fn`` instead of its own loop; extra keyword
arguments that ``fn`` declares (here ``draft_model``, ``num_draft_tokens``, ``judge``, ``threshold``,
``generator``, ``compact_draft``, ``draft_stop``) are passed through. That is the most idiomatic hook
the installed transformers offers: no subclass, no monkey-patching, and the call reads like assisted generation::

    from hasten.decoding import custom_generate
    out = target.generate(input_ids, custom_generate=custom_generate, draft_model=draft,
                          num_draft_tokens=4, max_new_tokens=128)                # lossless
    out = target.generate(input_ids, custom_generate=custom_generate, draft_model=draft,
                          judge=JudgeHead.load("judge.safetensors"), max_new_tokens=128)

(transformers' ``assistant_model=`` keyword is not used for the draft: it switches ``generate`` into
its own assisted mode, whose candidate generator cannot express Judge Decoding's verification.)

Supported: one sequence at a time (batch 1), greedy or sampling with ``temperature`` and ``top_k``.
Settings this loop would silently ignore (``top_p`` < 1, ``min_p``, repetition penalties, beams,
several return sequences, a padded attention mask, stopping criteria other than the length and EOS,
...) are refused with one clear error. A ``streamer`` is not supported: transformers does not hand it
to a custom loop, so it would see the prompt and never the end.
"""

from __future__ import annotations

import torch

from ..errors import HastenError
from .speculative import generate as _speculative

__all__ = ["custom_generate"]

# logits processors that generate() builds from settings our loop reproduces itself
_HANDLED = {"TemperatureLogitsWarper", "TopKLogitsWarper"}
# stopping criteria likewise (max_new_tokens / max_length and eos_token_id)
_STOPS = {"MaxLengthCriteria", "EosTokenCriteria"}


def custom_generate(model, input_ids: torch.Tensor, logits_processor=None, stopping_criteria=None,
                    generation_config=None, draft_model=None, num_draft_tokens: int = 4, judge=None,
                    threshold: float | None = None, generator: torch.Generator | None = None,
                    compact_draft: bool = True, draft_stop=None, **model_kwargs) -> torch.Tensor:
    """Decoding loop for ``model.generate(..., custom_generate=custom_generate, draft_model=draft)``.

    Returns the sequences (prompt + new tokens), shape (1, n), like ``generate`` with the default
    ``return_dict_in_generate=False``; with ``return_dict_in_generate=True`` it returns a
    ``GenerateDecoderOnlyOutput`` whose ``sequences`` are the same and whose ``hasten_stats`` holds the
    :class:`~hasten.decoding.DecodingStats`.
    """
    gc = generation_config
    if draft_model is None:
        raise HastenError("custom_generate needs draft_model=<a causal LM sharing the target's vocabulary>")
    if input_ids.shape[0] != 1:
        raise HastenError(f"hasten speculative decoding runs one sequence at a time (batch 1), got a batch of "
                          f"{input_ids.shape[0]}; call generate once per prompt")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise HastenError("a padded attention_mask is not supported: give one unpadded prompt")
    if (gc.num_beams or 1) > 1 or (gc.num_return_sequences or 1) > 1:
        raise HastenError("custom_generate supports neither beams nor num_return_sequences > 1")
    extra = sorted({type(p).__name__ for p in (logits_processor or [])} - _HANDLED)
    if extra:
        raise HastenError(f"generation settings that hasten's loop does not apply: {', '.join(extra)} "
                          "(supported: do_sample, temperature, top_k, max_new_tokens, eos_token_id)")
    stops = sorted({type(c).__name__ for c in (stopping_criteria or [])} - _STOPS)
    if stops:
        raise HastenError(f"stopping criteria that hasten's loop does not apply: {', '.join(stops)} (max_time, "
                          "stop_strings and custom stopping_criteria are not supported; max_new_tokens and "
                          "eos_token_id are)")
    max_new = int(gc.max_length) - input_ids.shape[1]
    if gc.max_new_tokens is not None:
        max_new = min(max_new, int(gc.max_new_tokens))
    do_sample = bool(gc.do_sample)
    top_k = gc.top_k if do_sample and gc.top_k else None
    out = _speculative(model, draft_model, input_ids, max(max_new, 0), num_draft_tokens=num_draft_tokens,
                       do_sample=do_sample, judge=judge, threshold=threshold,
                       temperature=float(gc.temperature or 1.0) if do_sample else 1.0, top_k=top_k,
                       eos_token_id=gc.eos_token_id, generator=generator, compact_draft=compact_draft,
                       draft_stop=draft_stop)
    if gc.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        res = GenerateDecoderOnlyOutput(sequences=out.sequences.to(input_ids.device))
        res.hasten_stats = out.stats
        return res
    return out.sequences.to(input_ids.device)
