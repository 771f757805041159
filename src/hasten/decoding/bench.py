"""End-to-end decoding benchmark: latency per completed answer, side by side, in one process.

The user's cost is the time until the answer is complete, so the headline is the latency of each
answer, measured from the call that starts decoding (the first target/draft pass) until EOS, reported
as median and p90 over the held-out problems, next to the task accuracy. Tokens/s and the mean
accepted length are printed beside it, never instead of it: a method whose answers are longer
(Judge Decoding adopts the draft's wording) looks faster per token than it is per answer.

Methods (same prompts, same ``max_new_tokens``, one CPU thread):

* greedy: ``target_hf`` (transformers ``generate``, target only), ``target_hasten`` (hasten's lean
  one-token-per-pass loop), ``assisted_hf_default`` (transformers assisted generation with the same
  draft and its own defaults), ``assisted_hf_best`` (its constant ``num_assistant_tokens`` that was
  fastest on validation problems), ``speculative`` (hasten, lossless, ``k`` fastest on validation; the
  draft runs through ``compact.CompactLlama`` and a ``DraftStop`` learnt online ends rounds before tokens
  the target keeps rejecting), ``speculative_plain`` (the same loop and ``k`` without either: what the
  two add), ``judge`` (hasten Judge Decoding at the shipped head's threshold and ``k``);
* sampling at ``temperature`` (0.7): ``target_hf_sample``, ``assisted_hf_best_sample``,
  ``speculative_sample`` (the lossless ones only).

Timing is interleaved: for problem ``i`` every method runs once, in an order rotated by ``i``, so
drifts of the machine hit all methods alike. Forward passes are counted with hooks on the two
models (the same counter for transformers and hasten). The harness (``run_interleaved``,
``summarize``) takes its clock as an argument and is tested with fake timings.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import task
from .task import EOS, decode, encode

__all__ = ["Method", "run_interleaved", "summarize", "choose_settings", "run_benchmark", "markdown_table",
           "write_results"]

TEMPERATURE = 0.7


@dataclass
class Method:
    """``run(prompt_ids, i) -> (new token ids, hasten DecodingStats or None)`` for problem ``i``."""

    name: str
    label: str
    run: Callable
    sampling: bool = False


class _Counter:
    """Counts forward calls of a module (a hook, so transformers and hasten are counted alike)."""

    def __init__(self, model):
        self.n = 0
        self.h = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def close(self):
        self.h.remove()


def run_interleaved(inputs: list[torch.Tensor], methods: list[Method], clock: Callable[[], float] = time.perf_counter,
                    counters: tuple = (), progress: bool = False) -> dict[str, list[dict]]:
    """Run every method on every input through ``hasten bench``'s engine
    (:func:`hasten.eval.bench_harness.run_interleaved`, order ``rotate``: the method that goes first
    changes from one input to the next); one record per (method, input).

    A record holds ``latency_s`` (clock difference around the whole call), the new ``tokens``, hasten's
    ``stats`` (or None) and ``passes``: forward calls seen by each of ``counters`` during the call.
    A method that raises stops the benchmark (every answer is needed for the figures).
    """
    from tqdm import tqdm

    from ..eval.bench_harness import Batch, BenchConfig, Prepared
    from ..eval.bench_harness import run_interleaved as engine

    extra: dict[str, list[dict]] = {m.name: [] for m in methods}

    def config(m: Method) -> BenchConfig:
        def sample(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            before = [c.n for c in counters]
            toks, stats = m.run(x, gen.initial_seed())  # the batch's seed is the problem's index
            extra[m.name].append({"stats": stats, "passes": [c.n - b for c, b in zip(counters, before, strict=True)]})
            return toks

        return BenchConfig(m.name, "decoding", {}, lambda: Prepared(sample))

    bar = tqdm(total=len(inputs), desc="bench-decode", disable=not progress)
    measured = engine([config(m) for m in methods], [Batch(x, i) for i, x in enumerate(inputs)], timer=clock,
                      order="rotate", progress=lambda msg: bar.update(1) if msg.startswith("batch ") else None)
    bar.close()
    records: dict[str, list[dict]] = {}
    for m in methods:
        got = measured[m.name]
        if got.error:
            raise RuntimeError(f"{m.name}: {got.error}")
        records[m.name] = [{"latency_s": t, "tokens": toks, **e}
                           for t, toks, e in zip(got.times, got.images, extra[m.name], strict=True)]
    return records


def _pct(values: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def summarize(records: dict[str, list[dict]], problems: list, reference: str = "target_hf") -> dict:
    """Per method: accuracy, latency per answer (median, p90, mean), tokens/s, mean accepted length,
    target passes per token, and how many outputs equal the ``reference`` method's token for token."""
    res = {}
    ref = records.get(reference)
    for name, recs in records.items():
        lat = [r["latency_s"] for r in recs]
        n_tok = sum(int(r["tokens"].numel()) for r in recs)
        t_passes = sum(r["passes"][0] for r in recs) if recs and recs[0]["passes"] else None
        stats = [r["stats"] for r in recs if r["stats"] is not None]
        if stats:
            drafts = sum(s.drafts for s in stats)
            mal = 1 + sum(s.accepted_tokens for s in stats) / drafts if drafts else 1.0
        elif t_passes:  # transformers: every target pass yields the accepted drafts plus one token
            mal = n_tok / t_passes
        else:
            mal = None
        texts = [decode(r["tokens"].tolist()) for r in recs]
        res[name] = {
            "accuracy": sum(task.check(p, t) for p, t in zip(problems, texts, strict=True)) / len(recs),
            "latency_median_s": round(_pct(lat, 0.5), 5), "latency_p90_s": round(_pct(lat, 0.9), 5),
            "latency_mean_s": round(sum(lat) / len(lat), 5), "wall_s": round(sum(lat), 3),
            "tokens_per_s": round(n_tok / sum(lat), 2), "mean_new_tokens": round(n_tok / len(recs), 2),
            "mean_accepted_length": None if mal is None else round(mal, 4),
            "target_passes_per_token": None if t_passes is None else round(t_passes / n_tok, 4),
            "outputs_equal_to_target_greedy": None if ref is None else sum(
                torch.equal(a["tokens"], b["tokens"]) for a, b in zip(recs, ref, strict=True)),
        }
    return res


def _hf(target, draft=None, sample: bool = False, seed0: int = 1000):
    def run(x, i):
        kw = {"assistant_model": draft} if draft is not None else {}
        if sample:
            torch.manual_seed(seed0 + i)
            kw.update(do_sample=True, temperature=TEMPERATURE, top_k=0)
        else:
            kw.update(do_sample=False)
        seq = target.generate(x, max_new_tokens=task.MAX_NEW_TOKENS, eos_token_id=EOS, pad_token_id=0,
                              attention_mask=torch.ones_like(x), **kw)
        return seq[0, x.shape[1]:], None
    return run


def _assistant(draft, n: int | None):
    """A copy of the draft configured for transformers assisted generation: its defaults (``n`` None),
    or ``n`` drafted tokens per round with the constant schedule and no confidence early stop."""
    d = copy.deepcopy(draft)
    if n is not None:
        gc = d.generation_config
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = n, "constant"
        gc.assistant_confidence_threshold = 0.0
    return d


def _hasten(target, draft, k: int, judge=None, sample: bool = False, seed0: int = 1000, compact: bool = True,
            stop: bool = False):
    """hasten's loop; ``stop``: one :class:`DraftStop` learnt online across the problems of this method."""
    from .speculative import DraftStop, generate

    draft_stop = DraftStop() if stop else None

    def run(x, i):
        gen = torch.Generator().manual_seed(seed0 + i) if sample else None
        out = generate(target, draft, x, task.MAX_NEW_TOKENS, num_draft_tokens=k, judge=judge, do_sample=sample,
                       temperature=TEMPERATURE if sample else 1.0, eos_token_id=EOS, generator=gen,
                       compact_draft=compact, draft_stop=draft_stop)
        return out.new_tokens, out.stats
    return run


def _target_hasten(target):
    from .speculative import autoregressive_generate

    def run(x, i):
        out = autoregressive_generate(target, x, task.MAX_NEW_TOKENS, eos_token_id=EOS)
        return out.new_tokens, out.stats
    return run


def choose_settings(models, problems: list, assisted_ns=(4, 6, 8, 10, 12), hasten_ks=(4, 6, 8, 10, 12),
                    progress: bool = True) -> dict:
    """The fastest constant ``num_assistant_tokens`` for transformers and ``k`` for hasten speculative,
    by total greedy latency on ``problems`` (validation, never the test split), interleaved."""
    methods = [Method(f"assisted_{n}", "", _hf(models.target, _assistant(models.draft, n))) for n in assisted_ns]
    methods += [Method(f"speculative_{k}", "", _hasten(models.target, models.draft, k, stop=True)) for k in hasten_ks]
    inputs = [torch.tensor([encode(task.prompt_text(p))]) for p in problems]
    recs = run_interleaved(inputs, methods, progress=progress)
    total = {name: round(sum(r["latency_s"] for r in rs), 3) for name, rs in recs.items()}
    best_n = min(assisted_ns, key=lambda n: total[f"assisted_{n}"])
    best_k = min(hasten_ks, key=lambda k: total[f"speculative_{k}"])
    return {"problems": len(problems), "total_latency_s": total, "assisted_num_assistant_tokens": best_n,
            "speculative_k": best_k}


def run_benchmark(models, n_problems: int | None = None, judge_k: int | None = None, tune_problems: int = 16,
                  split: str = "test", progress: bool = True) -> dict:
    """Choose settings on validation problems, then run all methods on ``split`` and summarize."""
    sp = task.splits()
    problems = sp[split][:n_problems] if n_problems else sp[split]
    settings = choose_settings(models, sp["val"][:tune_problems], progress=progress)
    judge_k = judge_k or int(models.judge.meta.get("k", 4))
    t, d = models.target, models.draft
    best, k = settings["assisted_num_assistant_tokens"], settings["speculative_k"]
    methods = [
        Method("target_hf", "target only, transformers `generate`", _hf(t)),
        Method("target_hasten", "target only, hasten loop", _target_hasten(t)),
        Method("assisted_hf_default", "transformers assisted generation (its defaults)", _hf(t, _assistant(d, None))),
        Method("assisted_hf_best", f"transformers assisted generation (best: {best} tokens)",
               _hf(t, _assistant(d, best))),
        Method("speculative", f"hasten speculative (lossless, k = {k})", _hasten(t, d, k, stop=True)),
        Method("speculative_plain", f"hasten speculative (k = {k}) without DraftStop, draft through transformers' "
               "forward", _hasten(t, d, k, compact=False)),
        Method("judge", f"hasten Judge Decoding (k = {judge_k})", _hasten(t, d, judge_k, judge=models.judge)),
        Method("target_hf_sample", "target only, transformers `generate`", _hf(t, sample=True), sampling=True),
        Method("assisted_hf_best_sample", f"transformers assisted generation ({best} tokens)",
               _hf(t, _assistant(d, best), sample=True), sampling=True),
        Method("speculative_sample", f"hasten speculative sampling (k = {k})", _hasten(t, d, k, sample=True, stop=True),
               sampling=True),
    ]
    inputs = [torch.tensor([encode(task.prompt_text(p))]) for p in problems]
    warm = [torch.tensor([encode(task.prompt_text(sp["val"][0]))])]  # not a measured problem: DraftStop learns
    with torch.inference_mode():
        run_interleaved(warm, methods)  # warm-up (allocator, kernels) outside the measurement
        counters = (_Counter(t), _Counter(d))
        try:
            recs = run_interleaved(inputs, methods, counters=counters, progress=progress)
        finally:  # the caller's models keep no hooks, whatever happens
            for c in counters:
                c.close()
    res = summarize(recs, problems)
    for m in methods:
        res[m.name].update(label=m.label, sampling=m.sampling)
        if m.sampling:
            res[m.name]["outputs_equal_to_target_greedy"] = None
    med = {n: v["latency_median_s"] for n, v in res.items()}
    summary = {
        "speculative_vs_target_hf": round(med["target_hf"] / med["speculative"], 3),
        "speculative_vs_assisted_hf_best": round(med["assisted_hf_best"] / med["speculative"], 3),
        "speculative_sample_vs_target_hf_sample": round(med["target_hf_sample"] / med["speculative_sample"], 3),
        "speculative_sample_vs_assisted_hf_best_sample": round(
            med["assisted_hf_best_sample"] / med["speculative_sample"], 3),
        "judge_vs_target_hf": round(med["target_hf"] / med["judge"], 3),
        "judge_accuracy_drop_points": round(100 * (res["target_hf"]["accuracy"] - res["judge"]["accuracy"]), 2),
        "judge_vs_speculative_mean_accepted_length": round(res["judge"]["mean_accepted_length"]
                                                           / res["speculative"]["mean_accepted_length"], 3),
        "speculative_identical_to_target_greedy": res["speculative"]["outputs_equal_to_target_greedy"] == len(problems),
    }
    summary["targets"] = {
        "speculative_vs_target_hf >= 1.5": summary["speculative_vs_target_hf"] >= 1.5,
        "speculative_vs_assisted_hf_best >= 1.2": summary["speculative_vs_assisted_hf_best"] >= 1.2,
        "speculative_sample_vs_target_hf_sample >= 1.5": summary["speculative_sample_vs_target_hf_sample"] >= 1.5,
        "speculative_sample_vs_assisted_hf_best_sample >= 1.2":
            summary["speculative_sample_vs_assisted_hf_best_sample"] >= 1.2,
        "speculative identical to target greedy on every problem": summary["speculative_identical_to_target_greedy"],
        "judge_vs_target_hf >= 2.5": summary["judge_vs_target_hf"] >= 2.5,
        "judge_accuracy_drop_points <= 1": summary["judge_accuracy_drop_points"] <= 1.0,
        "judge_vs_speculative_mean_accepted_length >= 2": summary["judge_vs_speculative_mean_accepted_length"] >= 2.0,
    }
    texts = {m: [decode(r["tokens"].tolist()) for r in recs[m][:3]] for m in ("target_hf", "speculative", "judge")}
    examples = [{"prompt": task.prompt_text(p), **{m: texts[m][i] for m in texts}} for i, p in enumerate(problems[:3])]
    return {"split": split, "problems": len(problems), "temperature": TEMPERATURE,
            "max_new_tokens": task.MAX_NEW_TOKENS, "torch_threads": torch.get_num_threads(),
            "judge_threshold_logit": models.judge.threshold, "judge_k": judge_k, "settings": settings,
            "cost_ratio": measure_cost_ratio(t, d), "methods": res, "summary": summary, "examples": examples}


@torch.inference_mode()
def measure_cost_ratio(target, draft, context: int = 40, reps: int = 60) -> dict:
    """Wall time of one decoding forward pass (batch 1, one new token, KV cache of ``context`` tokens)
    for target and draft, median of ``reps``, interleaved."""
    from .speculative import _Runner

    x = torch.tensor([encode(task.prompt_text(task.splits()["val"][0]))])[:, :context]
    tok = x[:, -1:]
    runs = {"target": _Runner(target), "draft": _Runner(draft)}
    for r in runs.values():
        r(x, keep=1)
    times: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(reps):
        for n, r in runs.items():
            t0 = time.perf_counter()
            r(tok, keep=1)
            times[n].append(time.perf_counter() - t0)
            r.rollback(x.shape[1])
    ms = {n: 1000 * _pct(v, 0.5) for n, v in times.items()}
    params = {n: sum(p.numel() for p in r.model.parameters()) for n, r in runs.items()}
    return {"target_ms_per_token": round(ms["target"], 3), "draft_ms_per_token": round(ms["draft"], 3),
            "ratio": round(ms["target"] / ms["draft"], 2), "target_params": params["target"],
            "draft_params": params["draft"]}


def markdown_table(r: dict) -> str:
    """The README table for a result dict from :func:`run_benchmark`."""
    c = r["cost_ratio"]
    lines = [f"Held-out `{r['split']}` split, {r['problems']} problems, {r['torch_threads']} CPU thread, batch 1; "
             f"target {c['target_params'] / 1e6:.1f}M parameters at {c['target_ms_per_token']:.1f} ms per token, "
             f"draft {c['draft_params'] / 1e6:.2f}M at {c['draft_ms_per_token']:.2f} ms ({c['ratio']:.1f}x).", "",
             "| method | accuracy | latency per answer, median | p90 | speed-up (median) vs target | "
             "tokens per answer | tokens/s | mean accepted length |",
             "|---|---|---|---|---|---|---|---|"]
    base = {False: r["methods"]["target_hf"]["latency_median_s"],
            True: r["methods"]["target_hf_sample"]["latency_median_s"]}
    for sampling in (False, True):
        lines.append(f"| **{'sampling, temperature ' + str(r['temperature']) if sampling else 'greedy'}** "
                     "| | | | | | | |")
        for v in r["methods"].values():
            if v["sampling"] != sampling:
                continue
            mal = "-" if v["mean_accepted_length"] is None else f"{v['mean_accepted_length']:.2f}"
            lines.append(f"| {v['label']} | {100 * v['accuracy']:.1f}% | {1000 * v['latency_median_s']:.0f} ms | "
                         f"{1000 * v['latency_p90_s']:.0f} ms | {base[sampling] / v['latency_median_s']:.2f}x | "
                         f"{v['mean_new_tokens']:.1f} | {v['tokens_per_s']:.0f} | {mal} |")
    s = r["summary"]
    lines += ["", "Targets: " + "; ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in s["targets"].items()) + "."]
    return "\n".join(lines) + "\n"


def write_results(r: dict, out: Path) -> tuple[Path, Path]:
    from ..io import atomic_write, write_json

    out.mkdir(parents=True, exist_ok=True)
    j = write_json(out / "results.json", r)
    md = markdown_table(r)
    return j, atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(md))
