"""``hasten decode`` and ``hasten bench-decode``: registered on the main typer app by ``register``."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import HastenError
from ..io import check_out_folder


def register(app: typer.Typer) -> None:
    """Add the decoding commands to ``app`` (heavy imports stay inside the commands)."""

    @app.command("decode")
    def decode_cmd(
        prompt: str = typer.Option(..., help="a word problem of the shipped models' task, e.g. 'mia has 347 apples. "
                                   "she buys 285 more and then gives away 169. how many apples does she have now?'"),
        judge: bool = typer.Option(False, "--judge", help="Judge Decoding (lossy) instead of lossless"),
        k: int = typer.Option(None, "--k", help="tokens drafted per round (default: 8, or the judge head's k "
                              "with --judge)"),
        max_new_tokens: int = typer.Option(160, help="at most this many new tokens"),
        delta: float = typer.Option(None, help="judge probability threshold in [0, 1] (default: the head's)"),
        sample: bool = typer.Option(False, "--sample", help="speculative sampling instead of greedy"),
        temperature: float = typer.Option(1.0, help="sampling temperature"),
        seed: int = typer.Option(0, help="random seed for sampling"),
        models: Path = typer.Option(None, help="folder with target/, draft/, judge.safetensors "
                                    "(default: the shipped one)"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    ) -> None:
        """Speculative (or Judge) decoding with the shipped target + draft; prints the text and statistics."""
        import json

        import torch

        from . import task
        from .assets import load_shipped
        from .judge import prob_to_logit
        from .speculative import generate
        from .task import EOS, decode, encode

        if k is not None and k < 1:
            raise HastenError(f"--k must be >= 1, got {k}")
        if max_new_tokens < 1:
            raise HastenError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if delta is not None and not 0 <= delta <= 1:
            raise HastenError(f"--delta must be in [0, 1], got {delta}")
        text = prompt.strip() + "\n"
        try:
            ids = encode(text)
        except ValueError as e:
            raise HastenError(f"the prompt has words the shipped models do not know ({e}); see "
                              "hasten/decoding/task.py for the task's templates") from None
        m = load_shipped(models, threads=1)
        if k is None:
            k = int(m.judge.meta.get("k", 8)) if judge else 8
        thr = prob_to_logit(delta) if delta is not None else None
        x = torch.tensor([ids])
        gen = torch.Generator().manual_seed(seed)
        out = generate(m.target, m.draft, x, max_new_tokens, num_draft_tokens=k, do_sample=sample,
                       judge=m.judge if judge else None, threshold=thr, temperature=temperature,
                       eos_token_id=EOS, generator=gen)
        answer = decode(out.new_tokens.tolist())
        stats = out.stats.as_dict()
        payload = {"prompt": prompt, "text": answer, "mode": "judge" if judge else "speculative", "k": k,
                   "stats": stats}
        problem = task.parse_prompt(prompt)
        if problem is not None:
            payload["correct"] = task.check(problem, answer)
        if as_json:
            typer.echo(json.dumps(payload))
            return
        typer.echo(answer)
        typer.echo(f"mode {payload['mode']}, k={k}: {stats['new_tokens']} tokens in {stats['wall_s']:.3f} s; "
                   f"drafts {stats['drafts']}, drafted {stats['drafted_tokens']}, accepted "
                   f"{stats['accepted_tokens']} (judge-only {stats['judge_accepted_tokens']}); "
                   f"mean accepted length {stats['mean_accepted_length']:.2f}; target passes "
                   f"{stats['target_forwards']}, draft passes {stats['draft_forwards']}")
        if "correct" in payload:
            typer.echo(f"answer correct: {payload['correct']}")

    @app.command("bench-decode")
    def bench_decode_cmd(
        out: Path = typer.Option(..., help="folder for results.json and results.md"),
        problems: int = typer.Option(None, help="first N problems of the held-out split (default: all 300)"),
        tune_problems: int = typer.Option(16, help="validation problems for choosing k and num_assistant_tokens"),
        models: Path = typer.Option(None, help="folder with target/, draft/, judge.safetensors "
                                    "(default: the shipped one)"),
        as_json: bool = typer.Option(False, "--json", help="print the result JSON"),
    ) -> None:
        """Latency per answer: target-only, transformers assisted, hasten speculative and Judge Decoding."""
        import json

        from .assets import load_shipped
        from .bench import markdown_table, run_benchmark, write_results

        if tune_problems < 1:
            raise HastenError(f"--tune-problems must be >= 1, got {tune_problems}")
        if problems is not None and problems < 1:
            raise HastenError(f"--problems must be >= 1, got {problems}")
        check_out_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        m = load_shipped(models, threads=1)
        r = run_benchmark(m, n_problems=problems, tune_problems=tune_problems)
        j, md = write_results(r, out)
        if as_json:
            typer.echo(json.dumps(r))
        else:
            typer.echo(markdown_table(r))
            typer.echo(f"wrote {j} and {md}")
