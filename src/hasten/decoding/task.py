"""A checkable task with many correct phrasings: two-step arithmetic word problems, worked answers.

Prompt (one of five templates, 3-digit start amount, 2-3 digit changes), e.g.::

    mia has 347 apples. she buys 285 more and then gives away 169. how many apples does she have now?

Worked answer: each operation is done column by column from the ones, with carries (``+ 1``) and
borrows (``borrow``) written out, so every digit the model writes depends on a few digits it can
attend to; in the target's favourite wording::

    347 + 285: 7 + 5 = 12, 4 + 8 + 1 = 13, 3 + 2 + 1 = 6, so 632. 632 - 169: 2 - 9 = 3 borrow,
    3 - 6 - 1 = 6 borrow, 6 - 1 - 1 = 4, so 463. answer 463.

Four kinds of *slot* (``SLOTS``: the operation's lead-in, the column separator, the word before an
operation's result, the final phrase) have three interchangeable wordings each, drawn independently
at every occurrence. The answer is correct when the LAST integer in the text equals the problem's
answer (``check``), whatever the wording.

Why: the target is trained on all wordings (its favourite at 50%), the much smaller draft mostly on
another one (80%), so standard verification rejects drafted tokens that are in fact correct at every
slot -- the situation Judge Decoding is made for -- while the digits need real arithmetic, which the
draft often gets wrong and the target rarely.

Tokens (``tokenize``): a lowercase word, one digit or one punctuation mark, each with at most one
leading space; ``"\\n"`` ends the prompt. The vocabulary is closed (every word the templates and
slots can produce, with and without a leading space) and built in code (``VOCAB``); the same
vocabulary ships as a transformers ``tokenizer.json`` (``build_tokenizer``). Ids 0..2 are
``<pad>``, ``<bos>``, ``<eos>``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["SLOTS", "TEMPLATES", "Problem", "prompt_text", "answer_text", "check", "parse_answer", "splits",
           "sample_problem", "parse_prompt", "tokenize", "encode", "decode", "build_tokenizer", "VOCAB", "PAD",
           "BOS", "EOS", "answer_pieces", "AnswerChecker",
           "TARGET_MIX", "DRAFT_MIX", "UNIFORM_MIX", "DIGIT_IDS", "MAX_NEW_TOKENS", "train_problems"]

# slot -> three wordings; index 0 = target's favourite, 1 = draft's favourite, 2 = rare
SLOTS: dict[str, tuple[str, str, str]] = {
    "lead": ("", "do ", "now "),                 # before "347 + 285:"
    "sep": (",", ";", " and"),                   # between two columns
    "result": (", so", "; result", ", giving"),  # before an operation's result
    "final": ("answer", "the answer is", "in all"),
}
TARGET_MIX = (0.5, 0.25, 0.25)  # wording probabilities per slot in the target's training data
DRAFT_MIX = (0.1, 0.8, 0.1)  # ... and in the draft's
UNIFORM_MIX = (1 / 3, 1 / 3, 1 / 3)  # judge data: every wording equally
MAX_NEW_TOKENS = 160  # the longest worked answer plus <eos> is well under this

NAMES = (("mia", "she"), ("leo", "he"), ("ava", "she"), ("sam", "he"), ("zoe", "she"), ("max", "he"),
         ("ivy", "she"), ("ben", "he"))
ITEMS = ("apples", "marbles", "stickers", "coins", "books", "cards", "shells", "pencils")
# (template, the two operations in order)
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{n} has {a} {i}. {p} buys {b} more and then gives away {c}. how many {i} does {p} have now?", "+-"),
    ("{n} had {a} {i} and lost {b} of them. then {p} found {c} more. how many {i} does {p} have now?", "-+"),
    ("a box holds {a} {i} and a bag holds {b}. {n} takes {c} out. how many {i} are left?", "+-"),
    ("{n} collects {a} {i} on monday, {b} on tuesday and {c} on friday. how many {i} in all?", "++"),
    ("{n} had {a} {i}, gave {b} to a friend and then gave {c} to another. how many {i} are left?", "--"),
)


@dataclass(frozen=True)
class Problem:
    template: int
    name: int
    item: int
    a: int
    b: int
    c: int

    @property
    def ops(self) -> str:
        return TEMPLATES[self.template][1]

    @property
    def steps(self) -> tuple[tuple[int, str, int, int], ...]:
        """``((x, op, y, result), ...)`` for the two operations."""
        out, x = [], self.a
        for op, y in zip(self.ops, (self.b, self.c), strict=True):
            r = x + y if op == "+" else x - y
            out.append((x, op, y, r))
            x = r
        return tuple(out)

    @property
    def answer(self) -> int:
        return self.steps[-1][3]


def prompt_text(p: Problem) -> str:
    n, pron = NAMES[p.name]
    return TEMPLATES[p.template][0].format(n=n, p=pron, i=ITEMS[p.item], a=p.a, b=p.b, c=p.c) + "\n"


def _columns(x: int, op: str, y: int) -> list[str]:
    """Column steps of ``x op y`` from the ones: ``"7 + 5 = 12"``, ``"4 + 8 + 1 = 13"``, ``"2 - 9 = 3 borrow"``."""
    n = max(len(str(x)), len(str(y)))
    xs = [int(d) for d in str(x).zfill(n)[::-1]]
    ys = [int(d) for d in str(y).zfill(n)[::-1]]
    cols, carry = [], 0
    for dx, dy in zip(xs, ys, strict=True):
        if op == "+":
            s = dx + dy + carry
            cols.append(f"{dx} + {dy}" + (" + 1" if carry else "") + f" = {s}")
            carry = s // 10
        else:
            v = dx - dy - carry
            borrow = v < 0
            cols.append(f"{dx} - {dy}" + (" - 1" if carry else "") + f" = {v + 10 * borrow}"
                        + (" borrow" if borrow else ""))
            carry = int(borrow)
    return cols


def answer_text(p: Problem, choice: dict[str, int] | None = None, rng: random.Random | None = None,
                mix: tuple[float, float, float] = TARGET_MIX) -> str:
    """The worked answer; each slot's wording from ``choice`` or drawn from ``mix`` with ``rng``."""
    def w(slot: str) -> str:
        if choice is not None and slot in choice:
            return SLOTS[slot][choice[slot]]
        r = rng or random
        return SLOTS[slot][r.choices(range(3), weights=mix)[0]]

    parts = []
    for x, op, y, r in p.steps:
        cols = _columns(x, op, y)
        body = cols[0] + "".join(f"{w('sep')} {c}" for c in cols[1:])
        parts.append(f"{w('lead')}{x} {op} {y}: {body}{w('result')} {r}.")
    return " ".join(parts) + f" {w('final')} {p.answer}."


def parse_prompt(text: str) -> Problem | None:
    """The problem a prompt states (any template, name and item of the task), or None."""
    text = text.strip()
    groups = {"n": "[a-z]+", "p": "[a-z]+", "i": "[a-z]+", "a": r"\d+", "b": r"\d+", "c": r"\d+"}
    for t, (tpl, _) in enumerate(TEMPLATES):
        pattern = re.escape(tpl)
        for key, rx in groups.items():  # first occurrence captures, later ones must repeat it
            pattern = pattern.replace(rf"\{{{key}\}}", f"(?P<{key}>{rx})", 1).replace(rf"\{{{key}\}}", f"(?P={key})")
        m = re.fullmatch(pattern, text)
        names = [n for n, _ in NAMES]
        if m and m["i"] in ITEMS and m["n"] in names:  # every template names a person
            p = Problem(t, names.index(m["n"]), ITEMS.index(m["i"]), int(m["a"]), int(m["b"]), int(m["c"]))
            return p if all(r >= 0 for *_, r in p.steps) else None
    return None


_INT = re.compile(r"\d+")


def parse_answer(text: str) -> int | None:
    """The last integer in ``text`` (None if there is none)."""
    found = _INT.findall(text)
    return int(found[-1]) if found else None


def check(p: Problem, generated: str) -> bool:
    """True when the last integer of the generated answer equals the problem's answer."""
    return parse_answer(generated) == p.answer


def sample_problem(rng: random.Random) -> Problem:
    """A random problem: start amount 100-999, changes 10-999, every intermediate amount >= 0."""
    while True:
        t = rng.randrange(len(TEMPLATES))
        a = rng.randint(100, 999)
        b, c = (rng.randint(10, 999) if rng.random() < 0.7 else rng.randint(10, 99) for _ in range(2))
        p = Problem(t, rng.randrange(len(NAMES)), rng.randrange(len(ITEMS)), a, b, c)
        if all(r >= 0 for *_, r in p.steps):
            return p


def splits(seed: int = 0, n_test: int = 300, n_val: int = 200) -> dict[str, list[Problem]]:
    """Held-out ``test`` and ``val`` problems (drawn with ``seed``) and ``train``, a function that draws
    fresh training problems that never share numbers and template with a held-out one."""
    rng = random.Random(seed)
    held: list[Problem] = []
    seen = set()
    while len(held) < n_test + n_val:
        p = sample_problem(rng)
        if (p.template, p.a, p.b, p.c) not in seen:
            seen.add((p.template, p.a, p.b, p.c))
            held.append(p)
    return {"test": held[:n_test], "val": held[n_test:], "held_out_keys": seen}


def train_problems(rng: random.Random, n: int, held_out_keys: set) -> list[Problem]:
    """``n`` random training problems, none equal (template and numbers) to a held-out one."""
    out = []
    while len(out) < n:
        p = sample_problem(rng)
        if (p.template, p.a, p.b, p.c) not in held_out_keys:
            out.append(p)
    return out


# ---- which continuations are correct --------------------------------------------------------


def answer_pieces(p: Problem) -> list[tuple[str, ...]]:
    """The worked answer as a sequence of pieces, each a tuple of interchangeable strings (a slot's three
    wordings, or one fixed string): every concatenation, one string per piece, is a correct answer, and
    ``answer_text`` writes exactly these."""
    pieces: list[tuple[str, ...]] = []
    for j, (x, op, y, r) in enumerate(p.steps):
        if j:
            pieces.append((" ",))
        cols = _columns(x, op, y)
        pieces += [SLOTS["lead"], (f"{x} {op} {y}: {cols[0]}",)]
        for c in cols[1:]:
            pieces += [SLOTS["sep"], (f" {c}",)]
        pieces += [SLOTS["result"], (f" {r}.",)]
    pieces += [(" ",), SLOTS["final"], (f" {p.answer}.",)]
    return pieces


class AnswerChecker:
    """Which next tokens keep a partial answer correct (any wording), for labelling judge data.

    A character-level automaton over ``answer_pieces``: a state is (piece, wording, offset). A token is
    acceptable after a prefix when prefix + token is a prefix of some correct answer and ends on a token
    boundary there (a word is not cut); ``<eos>`` is acceptable exactly after a complete answer.
    """

    def __init__(self, p: Problem):
        self.pieces = answer_pieces(p)

    def _close(self, states: set) -> set:
        out, todo = set(), list(states)
        while todo:
            s = todo.pop()
            if s in out:
                continue
            out.add(s)
            i, a, o = s
            if o == len(self.pieces[i][a]) and i + 1 < len(self.pieces):
                todo += [(i + 1, b, 0) for b in range(len(self.pieces[i + 1]))]
        return out

    def start(self) -> set:
        return self._close({(0, a, 0) for a in range(len(self.pieces[0]))})

    def step(self, states: set, text: str) -> set:
        """The states after reading ``text`` (empty: no correct answer continues this way)."""
        for ch in text:
            states = self._close({(i, a, o + 1) for i, a, o in states
                                  if o < len(self.pieces[i][a]) and self.pieces[i][a][o] == ch})
            if not states:
                break
        return states

    def _next_chars(self, states: set) -> set:
        return {self.pieces[i][a][o] if o < len(self.pieces[i][a]) else "" for i, a, o in states}

    def complete(self, states: set) -> bool:
        return any(i == len(self.pieces) - 1 and o == len(self.pieces[i][a]) for i, a, o in states)

    def acceptable(self, states: set, token: int) -> bool:
        """Is ``token`` a correct continuation from ``states`` (the states after the answer so far)?"""
        if token == EOS:
            return self.complete(states)
        text = _INV.get(token, "")
        if token <= EOS or not text or text == "\n":
            return False
        after = self.step(states, text)
        if not after:
            return False
        if text[-1].isalpha():  # a word must end here: the correct answer may not go on with a letter
            return any(not c.isalpha() for c in self._next_chars(after))
        return True

    def acceptable_tokens(self, states: set) -> set[int]:
        """Every vocabulary token that keeps the answer correct after ``states`` (``<eos>`` included)."""
        nxt = self._next_chars(states)
        return {i for t, i in VOCAB.items() if (i == EOS or t[:1] in nxt) and self.acceptable(states, i)}


# ---- tokenizer ------------------------------------------------------------------------------
SPECIAL = ("<pad>", "<bos>", "<eos>")
PAD, BOS, EOS = 0, 1, 2
_TOKEN = re.compile(r" ?[a-z]+| ?\d| ?[^\sa-z\d]|\n")


def _vocab() -> dict[str, int]:
    words = set()
    for tpl, _ in TEMPLATES:
        words |= set(re.findall(r"[a-z]+", re.sub(r"\{[a-z]\}", " ", tpl)))
    for n, pron in NAMES:
        words |= {n, pron}
    words |= set(ITEMS) | {"borrow"}
    for options in SLOTS.values():
        for o in options:
            words |= set(re.findall(r"[a-z]+", o))
    atoms = sorted(words) + list("0123456789") + list(".,;:?+-=")
    toks = [a for atom in atoms for a in (atom, " " + atom)] + ["\n"]
    return {t: i for i, t in enumerate(SPECIAL + tuple(toks))}


VOCAB: dict[str, int] = _vocab()
_INV = {i: t for t, i in VOCAB.items()}
DIGIT_IDS = tuple(VOCAB[d] for d in "0123456789") + tuple(VOCAB[" " + d] for d in "0123456789")


def tokenize(text: str) -> list[str]:
    """Split ``text`` into vocabulary tokens; ValueError for text outside the task's vocabulary."""
    toks = _TOKEN.findall(text)
    if "".join(toks) != text or any(t not in VOCAB for t in toks):
        bad = sorted({t for t in toks if t not in VOCAB} or {text})
        raise ValueError(f"text is outside the task's vocabulary: {bad[:5]}")
    return toks


def encode(text: str) -> list[int]:
    """Token ids, identical to ``build_tokenizer()`` (checked in the tests)."""
    return [VOCAB[t] for t in tokenize(text)]


def decode(ids: list[int]) -> str:
    return "".join(_INV[i] for i in ids if i > EOS)


def build_tokenizer():
    """The vocabulary as a ``PreTrainedTokenizerFast`` built in code (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_TOKEN.pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
