"""Side-by-side decoding benchmark on the held-out test split (one process, interleaved repetitions).

Methods, all greedy, same prompts, same ``max_new_tokens``, same draft and ``k``:

* ``target_hf``         -- ``target.generate(do_sample=False)`` (transformers, target only);
* ``target_hasten``     -- hasten's lean one-token-per-pass loop (target only);
* ``assisted_hf``       -- ``target.generate(assistant_model=draft)``, ``num_assistant_tokens = k``
  with the ``constant`` schedule (so it drafts exactly like hasten);
* ``assisted_hf_default`` -- the same with transformers' own defaults (``heuristic`` schedule that adapts
  the number of drafted tokens, confidence-based early stop), on a copy of the draft;
* ``speculative``       -- ``hasten.decoding.generate`` (lossless);
* ``judge``             -- ``hasten.decoding.generate(judge=...)`` (Judge Decoding, lossy).

Forward passes are counted with forward hooks on the two models for every method (the same
counter for transformers and hasten). For the transformers methods the mean accepted length is
``new tokens / target passes`` (each assisted pass yields the accepted drafts plus one token).
Timing: each repetition runs every method on every prompt, rotating the order per prompt, and
tokens/s = all new tokens / all wall time of that method; speedups are ratios of tokens/s.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import task
from .train import EOS, decode, encode

__all__ = ["METHODS", "run_benchmark", "markdown_table"]

METHODS = ("target_hf", "target_hasten", "assisted_hf", "assisted_hf_default", "speculative", "judge")


class _Counter:
    def __init__(self, model):
        self.n = 0
        self.h = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def close(self):
        self.h.remove()


def _run(method: str, models, x: torch.Tensor, k: int, max_new: int, draft_default=None):
    from .speculative import autoregressive_generate, generate

    if method == "target_hf":
        seq = models.target.generate(x, max_new_tokens=max_new, do_sample=False, eos_token_id=EOS,
                                     pad_token_id=0, attention_mask=torch.ones_like(x))
        return seq[0, x.shape[1]:], None
    if method in ("assisted_hf", "assisted_hf_default"):
        assistant = models.draft if method == "assisted_hf" else draft_default
        seq = models.target.generate(x, assistant_model=assistant, max_new_tokens=max_new, do_sample=False,
                                     eos_token_id=EOS, pad_token_id=0, attention_mask=torch.ones_like(x))
        return seq[0, x.shape[1]:], None
    if method == "target_hasten":
        out = autoregressive_generate(models.target, x, max_new, eos_token_id=EOS)
    elif method == "speculative":
        out = generate(models.target, models.draft, x, max_new, num_draft_tokens=k, eos_token_id=EOS)
    else:
        out = generate(models.target, models.draft, x, max_new, num_draft_tokens=k, judge=models.judge,
                       eos_token_id=EOS)
    return out.new_tokens, out.stats


def run_benchmark(models, k: int = 4, n_problems: int | None = None, reps: int = 2, max_new_tokens: int = 96,
                  split: str = "test", progress: bool = True) -> dict:
    """Run all methods on ``split`` (first ``n_problems``) and return the result dict (JSON-ready)."""
    from tqdm import tqdm

    problems = task.splits()[split]
    if n_problems is not None:
        problems = problems[:n_problems]
    import copy

    draft_default = copy.deepcopy(models.draft)  # transformers' defaults; its heuristic mutates the config
    gc = models.draft.generation_config
    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = k, "constant"
    gc.assistant_confidence_threshold = 0.0  # transformers 4.45+: no early stop of drafting
    tc, dc, dc2 = _Counter(models.target), _Counter(models.draft), _Counter(draft_default)
    agg = {m: {"time": 0.0, "tokens": 0, "target_passes": 0, "draft_passes": 0, "correct": 0, "drafts": 0,
               "accepted": 0, "drafted": 0, "equal_to_target": 0} for m in METHODS}
    texts: dict[str, list[str]] = {m: [] for m in METHODS}
    # warm-up (allocator, kernels) outside the measurement
    _ = [_run(m, models, torch.tensor([encode(task.prompt_text(problems[0]))]), k, 8, draft_default)
         for m in METHODS]
    total = reps * len(problems)
    bar = tqdm(total=total, desc="bench-decode", disable=not progress)
    with torch.inference_mode():
        for rep in range(reps):
            for i, p in enumerate(problems):
                x = torch.tensor([encode(task.prompt_text(p))])
                order = METHODS[i % len(METHODS):] + METHODS[:i % len(METHODS)]
                outs = {}
                for m in order:
                    t0n, d0n = tc.n, dc.n + dc2.n
                    t0 = time.perf_counter()
                    toks, stats = _run(m, models, x, k, max_new_tokens, draft_default)
                    dt = time.perf_counter() - t0
                    a = agg[m]
                    a["time"] += dt
                    a["tokens"] += int(toks.numel())
                    if rep == 0:
                        outs[m] = toks
                        a["target_passes"] += tc.n - t0n
                        a["draft_passes"] += dc.n + dc2.n - d0n
                        text = decode(toks.tolist())
                        texts[m].append(text)
                        a["correct"] += task.check(p, text)
                        if stats is not None:
                            a["drafts"] += stats.drafts
                            a["accepted"] += stats.accepted_tokens
                            a["drafted"] += stats.drafted_tokens
                if rep == 0:
                    for m in METHODS:
                        agg[m]["equal_to_target"] += torch.equal(outs[m], outs["target_hf"])
                bar.update(1)
    bar.close()
    for c in (tc, dc, dc2):
        c.close()
    n = len(problems)
    res = {}
    for m in METHODS:
        a = agg[m]
        mal = (1 + a["accepted"] / a["drafts"]) if a["drafts"] else (
            a["tokens"] / reps / a["target_passes"] if m.startswith("assisted") else 1.0)
        res[m] = {"accuracy": a["correct"] / n, "mean_accepted_length": round(mal, 4),
                  "target_passes_per_token": round(a["target_passes"] / (a["tokens"] / reps), 4),
                  "draft_passes_per_token": round(a["draft_passes"] / (a["tokens"] / reps), 4),
                  "tokens_per_s": round(a["tokens"] / a["time"], 2), "wall_s": round(a["time"], 3),
                  "new_tokens_per_rep": a["tokens"] // reps,
                  "outputs_equal_to_target_greedy": a["equal_to_target"],
                  "acceptance_rate": round(a["accepted"] / a["drafted"], 4) if a["drafted"] else None}
    base_hf, base_h = res["target_hf"]["tokens_per_s"], res["target_hasten"]["tokens_per_s"]
    for m in METHODS:
        res[m]["speedup_vs_target_hf"] = round(res[m]["tokens_per_s"] / base_hf, 3)
        res[m]["speedup_vs_target_hasten"] = round(res[m]["tokens_per_s"] / base_h, 3)
    summary = {
        "speculative_vs_assisted_hf_speed": round(res["speculative"]["tokens_per_s"]
                                                  / res["assisted_hf"]["tokens_per_s"], 3),
        "judge_vs_speculative_mean_accepted_length": round(res["judge"]["mean_accepted_length"]
                                                           / res["speculative"]["mean_accepted_length"], 3),
        "judge_accuracy_drop_points": round(100 * (res["target_hf"]["accuracy"]
                                                   - res["judge"]["accuracy"]), 2),
    }
    summary["targets_met"] = {
        "speculative_at_least_as_fast_as_assisted_hf": summary["speculative_vs_assisted_hf_speed"] >= 1.0,
        "judge_mal_at_least_1.5x_speculative": summary["judge_vs_speculative_mean_accepted_length"] >= 1.5,
        "judge_accuracy_within_1_point": summary["judge_accuracy_drop_points"] <= 1.0,
    }
    shown = ("target_hf", "speculative", "judge")
    examples = [{"prompt": task.prompt_text(p), **{m: texts[m][i] for m in shown}}
                for i, p in enumerate(problems[:5])]
    return {"split": split, "problems": n, "k": k, "reps": reps, "max_new_tokens": max_new_tokens,
            "judge_threshold_logit": models.judge.threshold, "torch_threads": torch.get_num_threads(),
            "methods": res, "summary": summary, "examples": examples}


def markdown_table(r: dict) -> str:
    """The README table for a result dict from :func:`run_benchmark`."""
    lines = [f"Held-out `{r['split']}` split, {r['problems']} problems, k = {r['k']}, greedy, "
             f"{r['reps']} interleaved repetitions, {r['torch_threads']} CPU thread(s).", "",
             "| method | accuracy | mean accepted length | target passes / token | tokens/s "
             "| speedup vs target (transformers) | speedup vs target (hasten loop) |",
             "|---|---|---|---|---|---|---|"]
    names = {"target_hf": "target only, transformers `generate`", "target_hasten": "target only, hasten loop",
             "assisted_hf": "transformers assisted generation (same k)",
             "assisted_hf_default": "transformers assisted generation (its defaults)",
             "speculative": "hasten speculative",
             "judge": "hasten judge decoding"}
    for m, v in r["methods"].items():
        lines.append(f"| {names[m]} | {100 * v['accuracy']:.1f}% | {v['mean_accepted_length']:.2f} | "
                     f"{v['target_passes_per_token']:.3f} | {v['tokens_per_s']:.1f} | "
                     f"{v['speedup_vs_target_hf']:.2f}x | {v['speedup_vs_target_hasten']:.2f}x |")
    s = r["summary"]
    lines += ["", "hasten speculative / transformers assisted (same k) speed: "
              f"{s['speculative_vs_assisted_hf_speed']:.2f}x; judge / speculative mean accepted length: "
              f"{s['judge_vs_speculative_mean_accepted_length']:.2f}x; judge accuracy drop vs target greedy: "
              f"{s['judge_accuracy_drop_points']:.1f} points."]
    return "\n".join(lines) + "\n"


def write_results(r: dict, out: Path) -> tuple[Path, Path]:
    from ..io import atomic_write, write_json

    out.mkdir(parents=True, exist_ok=True)
    j = write_json(out / "results.json", r)
    md = markdown_table(r)

    def _w(tmp: str) -> None:
        Path(tmp).write_text(md)

    return j, atomic_write(out / "results.md", _w)
