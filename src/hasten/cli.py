"""The ``hasten`` command line (typer). Bad input prints one ``error: ...`` line and exits with code 2."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from .errors import HastenError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="hasten: make generative models fast.")


def fail(message: str) -> None:
    """Print one clear error line and exit with code 2 (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def parse_labels(spec: str, per_label: int) -> list[int]:
    """'0-9' or '3,5,7' (or a mix, '0-2,7') -> each label repeated ``per_label`` times."""
    labels: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                labels += range(lo, hi + 1)
            else:
                labels.append(int(part))
    except ValueError:
        raise HastenError(f"cannot read labels {spec!r}: use e.g. '0-9' or '1,3,5'") from None
    if per_label < 1:
        raise HastenError(f"--per-label must be >= 1, got {per_label}")
    return [lab for lab in labels for _ in range(per_label)]


def check_sampling_options(steps: int, cfg: float | None) -> None:
    """Fail before loading anything when --steps or --cfg cannot be sampled with."""
    if steps < 1:
        raise HastenError(f"--steps must be >= 1, got {steps}")
    if cfg is not None and cfg < 0:
        raise HastenError(f"--cfg must be >= 0, got {cfg}")


def emit(payload: dict, as_json: bool, text_lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(payload))
    else:
        for line in text_lines:
            typer.echo(line)


@app.command()
def generate(
    model: str = typer.Option("digits", help="embedded model name or a save_pretrained folder"),
    labels: str = typer.Option("0-9", help="class labels, e.g. 0-9 or 1,3,5"),
    per_label: int = typer.Option(4, help="images per label"),
    steps: int = typer.Option(50, help="sampling steps"),
    cfg: float = typer.Option(None, help="classifier-free guidance scale (default: the model's)"),
    seed: int = typer.Option(0, help="random seed for the initial noise"),
    schedule: str = typer.Option("linear", help="linear | linear-quadratic"),
    solver: str = typer.Option("euler", help="euler | heun"),
    accel: list[str] = typer.Option([], help="acceleration method spec, e.g. block-cache:delta=0.5 (repeatable)"),
    out: Path = typer.Option(Path("grid.png"), help="PNG grid to write"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Generate a grid of samples and print wall time and denoiser calls (NFE)."""
    import torch

    from .io import check_writable
    from .pipeline import load_pipeline

    check_writable(out)
    check_sampling_options(steps, cfg)
    pipe = load_pipeline(model)
    label_list = parse_labels(labels, per_label)
    pipe.check_labels(label_list)
    handle = None
    if accel:
        from .api import accelerate_from_specs

        handle = accelerate_from_specs(pipe, accel, steps=steps, solver=solver, schedule=schedule,
                                       guidance_scale=cfg)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    result = pipe(label_list, num_inference_steps=steps, guidance_scale=cfg, generator=gen,
                  schedule=schedule, solver=solver)
    wall = time.perf_counter() - t0
    report = handle.report() if handle is not None else None
    nfe = report["nfe"] if report is not None else result.nfe
    result.save_grid(out, nrow=per_label if per_label > 1 else None)
    payload = {"out": str(out), "images": len(label_list), "steps": steps, "wall_s": round(wall, 4),
               "nfe": nfe, "transformer_calls": result.transformer_calls}
    if report is not None:
        payload["report"] = report
    emit(payload, as_json, [f"wrote {out} ({len(label_list)} images)",
                            f"wall time {wall:.2f} s, NFE per image {nfe:g}"])


@app.command("eval")
def evaluate(
    model: str = typer.Option("digits", help="embedded model name or a save_pretrained folder"),
    samples: int = typer.Option(1000, help="number of samples (spread evenly over the classes)"),
    steps: int = typer.Option(50, help="sampling steps"),
    cfg: float = typer.Option(None, help="guidance scale (default: the model's)"),
    seed: int = typer.Option(0, help="random seed"),
    schedule: str = typer.Option("linear", help="linear | linear-quadratic"),
    solver: str = typer.Option("euler", help="euler | heun"),
    batch_size: int = typer.Option(100, help="images per sampling batch"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Sample, then print class accuracy, FD-digits and the real-vs-real FD reference."""
    from .eval.metrics import evaluate_pipeline
    from .pipeline import load_pipeline

    if samples < 10:
        raise HastenError(f"--samples must be >= 10, got {samples}")
    check_sampling_options(steps, cfg)
    if batch_size < 1:
        raise HastenError(f"--batch-size must be >= 1, got {batch_size}")
    pipe = load_pipeline(model)
    res = evaluate_pipeline(pipe, samples=samples, steps=steps, guidance_scale=cfg, seed=seed,
                            schedule=schedule, solver=solver, batch_size=batch_size)
    emit(res, as_json, [f"class accuracy   {res['class_accuracy']:.4f}",
                        f"FD-digits        {res['fd_digits']:.4f}",
                        f"real-vs-real FD  {res['fd_real_vs_real']:.4f}  (train vs held-out)",
                        f"ratio            {res['fd_ratio']:.2f}",
                        f"wall time        {res['wall_s']:.1f} s, NFE per image {res['nfe']:g}"])


@app.command("train")
def train_cmd(
    out: Path = typer.Option(..., help="output folder (save_pretrained layout)"),
    steps: int = typer.Option(6000, help="optimisation steps"),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(5e-4),
    seed: int = typer.Option(0),
    what: str = typer.Option("digits", help="digits (the DiT) | classifier (the evaluator's CNN)"),
) -> None:
    """Train the default digits model (Movie Gen flow matching) or the evaluator's classifier."""
    if steps < 1:
        raise HastenError(f"--steps must be >= 1, got {steps}")
    if what == "digits":
        from .train import TrainConfig, train

        out.mkdir(parents=True, exist_ok=True)
        log = train(out, TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed))
        typer.echo(f"wrote {out}: final loss {log['loss_curve'][-1]['loss']:.4f} in {log['train_seconds']} s")
    elif what == "classifier":
        from .eval.classifier import train_classifier

        out.mkdir(parents=True, exist_ok=True)
        info = train_classifier(out, steps=steps, seed=seed)
        typer.echo(f"wrote {out}: held-out accuracy {info['held_out_accuracy']:.4f}")
    else:
        raise HastenError(f"unknown --what {what!r}: digits | classifier")


@app.command("bench")
def bench_cmd(
    model: str = typer.Option("digits", help="embedded model name or a save_pretrained folder"),
    out: Path = typer.Option(..., help="output folder: results.json, results.md, pareto.png, plans/"),
    quick: bool = typer.Option(False, "--quick", help="the <= 3-minute smoke test"),
    samples: int = typer.Option(None, help="evaluation samples (default: 160, quick: 20)"),
    batch_size: int = typer.Option(None, help="samples per interleaved repetition (default: 40, quick: 10)"),
    seed: int = typer.Option(0, help="seed of the first batch (batch k uses seed + k)"),
    peers: bool = typer.Option(True, "--peers/--no-peers", help="include diffusers' and cache-dit's caches"),
    realistic: bool = typer.Option(None, "--realistic/--no-realistic",
                                   help="the DiT-XL/2-size overhead check (default: on, off with --quick)"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's)"),
    as_json: bool = typer.Option(False, "--json", help="print the results as one JSON object"),
) -> None:
    """Benchmark hasten's methods against fewer steps and peer caches, interleaved, in one process."""
    from .eval.bench import check_args, run_bench

    check_args(out, samples, batch_size, threads)
    res = run_bench(model, out, quick=quick, samples=samples, batch_size=batch_size, seed=seed, peers=peers,
                    realistic=realistic, threads=threads,
                    progress=None if as_json else (lambda m: typer.echo(m, err=True)))
    lines = [f"wrote {out}/results.json, results.md, pareto.png ({len(res['records'])} configurations, "
             f"{res['protocol']['total_wall_s']:.0f} s)"]
    for row in res["quality_levels"]:
        h = row["hasten"]
        lines.append(f"{row['level']:<28} hasten {'-' if h is None else format(h['speedup'], '.2f') + 'x'}"
                     f"  fastest: {row['hasten_fastest']}")
    emit(res, as_json, lines)


@app.command("calibrate")
def calibrate_cmd(
    out: Path = typer.Option(..., help="plan JSON to write"),
    model: str = typer.Option("digits", help="embedded model name or a save_pretrained folder"),
    method: str = typer.Option("block-cache", help="method to calibrate (block-cache, ...)"),
    delta: float = typer.Option(None, help="block-cache: threshold of the accumulated-change rule (Eq. 7)"),
    threshold: float = typer.Option(None, help="linear-ag: AG threshold stored in the plan (default 0.991)"),
    plot: Path = typer.Option(None, help="PNG of the change curves and the schedule"),
    scale_shift: bool = typer.Option(False, "--scale-shift", help="block-cache: train scale-shift alignment"),
    train_steps: int = typer.Option(1000, help="block-cache: scale-shift Adam updates"),
    steps: int = typer.Option(50, help="sampling steps the plan is for"),
    solver: str = typer.Option("euler", help="euler | heun"),
    schedule: str = typer.Option("linear", help="linear | linear-quadratic"),
    cfg: float = typer.Option(None, help="guidance scale (default: the model's)"),
    labels: str = typer.Option(None, help="calibration labels (default: every class)"),
    seeds: str = typer.Option("1000,1001", help="calibration seeds, comma-separated (>= 2)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Calibrate a method (Block Caching: record L1rel per block and call, derive the schedule)."""
    from .api import calibrate_cli

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise HastenError(f"cannot read --seeds {seeds!r}: use e.g. 1000,1001") from None
    if steps < 1:
        raise HastenError(f"--steps must be >= 1, got {steps}")
    options = {"delta": delta, "scale_shift": scale_shift, "train_steps": train_steps}
    if threshold is not None:
        if method != "linear-ag":
            raise HastenError(f"--threshold is an option of --method linear-ag, not {method}")
        options["threshold"] = threshold
    res = calibrate_cli(model, method, out, options, plot=plot, steps=steps, solver=solver, schedule=schedule,
                        guidance_scale=cfg, labels=None if labels is None else parse_labels(labels, 1),
                        seeds=seed_list)
    lines = [f"wrote {res['out']} ({method}, {steps} {solver} steps)"]
    if "ideal_speedup" in res:
        lines.append(f"delta {res.get('delta')}: ideal speedup {res['ideal_speedup']:.2f}x (share of block work)")
    if "scale_shift_file" in res:
        lines.append(f"scale-shift parameters: {res['scale_shift_file']}")
    if "plot" in res:
        lines.append(f"wrote {res['plot']}")
    emit(res, as_json, lines)


from .decoding.cli import register as _register_decoding  # noqa: E402

_register_decoding(app)


def main() -> None:
    """Console entry point: HastenError becomes one line on stderr and exit code 2."""
    try:
        app(standalone_mode=True)
    except HastenError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
