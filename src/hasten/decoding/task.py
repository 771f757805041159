"""A checkable toy task with many correct phrasings: two-number addition with a worked answer.

Prompt ``"23+45\\n"``; answer, e.g. (target's favourite wording)
``"ones 3+5=8, tens 2+4=6, so 68."`` or (the draft's favourite)
``"units 3 plus 5 is 8; tens digits 2 plus 4 is 6; answer 68."``. Every answer is a chain of
*slots*; each slot has three interchangeable wordings and is chosen independently. The answer is
correct when the LAST integer in the text equals ``a + b`` (``check``), whatever the wording.

Why: the target is trained on all wordings (its favourite at 50%), the much smaller draft mostly on
another one (80%), so standard verification rejects drafted tokens that are in fact correct at
every slot -- the situation Judge Decoding is made for.

The tokenizer is character level, built in code (``build_tokenizer``) and shipped as
``tokenizer.json``; ids 0..2 are ``<pad>``, ``<bos>``, ``<eos>``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["SLOTS", "Problem", "answer_text", "check", "splits", "build_tokenizer", "CHARS",
           "TARGET_MIX", "DRAFT_MIX", "prompt_text"]

# slot name -> three wordings; index 0 = target's favourite, 1 = draft's favourite, 2 = rare
SLOTS: dict[str, tuple[str, str, str]] = {
    "ones": ("ones ", "units ", "last "),
    "plus": ("+", " plus ", " and "),
    "eq": ("=", " is ", " makes "),
    "sep": (", ", "; ", " then "),
    "tens": ("tens ", "tens digits ", "next "),
    "final": ("so ", "answer ", "total "),
}
TARGET_MIX = (0.5, 0.25, 0.25)  # wording probabilities per slot in the target's training data
DRAFT_MIX = (0.1, 0.8, 0.1)  # ... and in the draft's
UNIFORM_MIX = (1 / 3, 1 / 3, 1 / 3)  # judge data: every wording equally

CHARS = "0123456789+=,;.: \nabcdefghijklmnopqrstuvwxyz"
SPECIAL = ("<pad>", "<bos>", "<eos>")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b


def prompt_text(p: Problem) -> str:
    return f"{p.a}+{p.b}\n"


def answer_text(p: Problem, choice: dict[str, int] | None = None, rng: random.Random | None = None,
                mix: tuple[float, float, float] = TARGET_MIX) -> str:
    """The worked answer; each slot's wording from ``choice`` or drawn from ``mix`` with ``rng``."""
    def w(slot: str) -> str:
        if choice is not None and slot in choice:
            return SLOTS[slot][choice[slot]]
        r = rng or random
        return SLOTS[slot][r.choices(range(3), weights=mix)[0]]

    a1, a0 = divmod(p.a, 10)
    b1, b0 = divmod(p.b, 10)
    carry, r0 = divmod(a0 + b0, 10)
    tens = f"{a1}{w('plus')}{b1}" + (f"{w('plus')}{carry}" if carry else "")
    return (f"{w('ones')}{a0}{w('plus')}{b0}{w('eq')}{a0 + b0}{w('sep')}"
            f"{w('tens')}{tens}{w('eq')}{a1 + b1 + carry}{w('sep')}{w('final')}{p.answer}.")


_INT = re.compile(r"\d+")


def parse_answer(text: str) -> int | None:
    """The last integer in ``text`` (None if there is none)."""
    found = _INT.findall(text)
    return int(found[-1]) if found else None


def check(p: Problem, generated: str) -> bool:
    """True when the last integer of the generated answer equals ``a + b``."""
    return parse_answer(generated) == p.answer


def splits(seed: int = 0, n_test: int = 300, n_val: int = 200) -> dict[str, list[Problem]]:
    """All 10,000 problems ``a, b in [0, 99]``, shuffled with ``seed`` into test / val / train."""
    allp = [Problem(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(allp)
    return {"test": allp[:n_test], "val": allp[n_test:n_test + n_val], "train": allp[n_test + n_val:]}


def build_tokenizer():
    """Character-level ``PreTrainedTokenizerFast`` built in code (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + tuple(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
