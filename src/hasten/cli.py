"""The ``hasten`` command line (typer). Bad input prints one ``error: ...`` line and exits with code 2."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import typer

from .errors import HastenError
from .io import check_out_folder

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="hasten: make generative models fast.")


def fail(message: str) -> None:
    """Print one clear error line and exit with code 2 (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


MAX_LABELS = 100_000


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
                if hi - lo >= MAX_LABELS:  # checked before the list is built: '0-999999999' is not a grid
                    raise HastenError(f"labels {part!r} name more than {MAX_LABELS} classes")
                labels += range(lo, hi + 1)
            else:
                labels.append(int(part))
    except HastenError:
        raise
    except ValueError:
        raise HastenError(f"cannot read labels {spec!r}: use e.g. '0-9' or '1,3,5'") from None
    if per_label < 1:
        raise HastenError(f"--per-label must be >= 1, got {per_label}")
    return [lab for lab in labels for _ in range(per_label)]


def check_sampling_options(steps: int, cfg: float | None, solver: str = "euler", schedule: str = "linear") -> None:
    """Fail before loading anything when --steps, --cfg, --solver or --schedule cannot be sampled with."""
    from .pipeline import SCHEDULES, SOLVERS

    if steps < 1:
        raise HastenError(f"--steps must be >= 1, got {steps}")
    if cfg is not None and not (math.isfinite(cfg) and cfg >= 0):
        raise HastenError(f"--cfg must be a finite number >= 0, got {cfg}")
    if solver not in SOLVERS:
        raise HastenError(f"unknown --solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if schedule not in SCHEDULES:
        raise HastenError(f"unknown --schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def check_model_options(pipe: object, model: str, solver: str, schedule: str) -> None:
    """After loading: --solver is for class-conditional models (text-to-image ones use their diffusers scheduler),
    and a distilled student samples at its own noise levels (no --schedule)."""
    if hasattr(pipe, "encode_prompt") and solver != "euler":
        raise HastenError(f"--solver is for class-conditional models; {model!r} samples with its diffusers "
                          "scheduler (a tuned --plan picks another)")
    if hasattr(pipe, "student") and schedule != "linear":
        raise HastenError(f"--schedule: the distilled student {model!r} samples at its own noise levels")


def emit(payload: dict, as_json: bool, text_lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(payload))
    else:
        for line in text_lines:
            typer.echo(line)


@app.command()
def generate(
    model: str = typer.Option("digits", help="embedded model name (digits, shapes) or a save_pretrained folder"),
    prompt: list[str] = typer.Option([], help="text prompt (text-to-image models; repeatable)"),
    prompts: Path = typer.Option(None, help="a file with one prompt per line (text-to-image models)"),
    labels: str = typer.Option("0-9", help="class labels, e.g. 0-9 or 1,3,5 (class-conditional models)"),
    per_label: int = typer.Option(4, help="images per label (or per prompt)"),
    steps: int = typer.Option(None, help="sampling steps (default 50, or the --plan's)"),
    cfg: float = typer.Option(None, help="classifier-free guidance scale (default: the model's)"),
    seed: int = typer.Option(0, help="random seed for the initial noise"),
    schedule: str = typer.Option("linear", help="linear | linear-quadratic"),
    solver: str = typer.Option("euler", help="euler | heun (class-conditional models)"),
    accel: list[str] = typer.Option([], help="acceleration method spec, e.g. block-cache:delta=0.5 (repeatable)"),
    plan: Path = typer.Option(None, help="a plan from hasten tune (solver, steps and methods in one file)"),
    out: Path = typer.Option(Path("grid.png"), help="PNG grid to write"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Generate a grid of samples and print wall time and denoiser calls (NFE)."""
    import torch

    from .io import check_writable
    from .pipeline import load_pipeline

    check_writable(out)
    tuned = None
    if plan is not None:
        from .plans import load_tuned_plan

        if accel:
            raise HastenError("give --plan or --accel, not both (a tuned plan already names its methods)")
        tuned = load_tuned_plan(plan)
        if steps is not None and steps != tuned["steps"]:
            raise HastenError(f"the plan was tuned for {tuned['steps']} steps, not --steps {steps}")
        steps = int(tuned["steps"])
        if cfg is None and tuned.get("guidance_scale") is not None:
            cfg = float(tuned["guidance_scale"])
    check_sampling_options(50 if steps is None else steps, cfg, solver, schedule)
    if per_label < 1:
        raise HastenError(f"--per-label must be >= 1, got {per_label}")
    text = read_prompts(prompt, prompts)
    pipe = load_pipeline(model)
    check_model_options(pipe, model, solver, schedule)
    steps = getattr(pipe, "num_steps", 50) if steps is None else steps  # a distilled student: its own steps
    is_text = hasattr(pipe, "encode_prompt")
    if is_text and not text:
        raise HastenError(f"model {model!r} is text-to-image: give --prompt TEXT or --prompts FILE")
    if not is_text and text:
        raise HastenError(f"model {model!r} is class-conditional: give --labels, not prompts")
    if is_text:
        conds = pipe.check_prompts([p for p in text for _ in range(per_label)])
    else:
        conds = parse_labels(labels, per_label)
        pipe.check_labels(conds)
    handle = None
    if tuned is not None:
        from .api import accelerate

        if not is_text:
            raise HastenError("a tuned plan applies to text-to-image (diffusers) pipelines")
        handle = accelerate(pipe, plan=tuned)
    if accel:
        from .specs import accelerate_from_specs

        handle = accelerate_from_specs(pipe, accel, steps=steps, solver=solver, schedule=schedule,
                                       guidance_scale=cfg)
    t0 = time.perf_counter()
    if is_text:
        from .eval.shapes_eval import initial_noise

        scale = pipe.default_guidance_scale if cfg is None else cfg
        sigmas = None
        if schedule == "linear-quadratic":
            from .pipelines.shapes import linear_quadratic_sigmas

            sigmas = linear_quadratic_sigmas(steps)
        images = pipe(conds, num_inference_steps=steps, guidance_scale=scale, sigmas=sigmas,
                      latents=initial_noise(pipe, len(conds), seed), output_type="pt").images
        guided = scale > 1 and not hasattr(pipe, "student")  # a student has guidance distilled in: one branch
        requested_nfe, calls = steps * (2 if guided else 1), steps
    else:
        gen = torch.Generator().manual_seed(seed)
        result = pipe(conds, num_inference_steps=steps, guidance_scale=cfg, generator=gen,
                      schedule=schedule, solver=solver)
        images, requested_nfe, calls = result.images, result.nfe, result.transformer_calls
    wall = time.perf_counter() - t0
    report = handle.report() if handle is not None else None
    nfe = report["nfe"] if report is not None else requested_nfe
    from .pipeline import save_grid

    save_grid(images, out, nrow=per_label if per_label > 1 else None)
    payload = {"out": str(out), "images": len(conds), "steps": steps, "wall_s": round(wall, 4),
               "nfe": nfe, "transformer_calls": calls}
    if report is not None:
        payload["report"] = report
    emit(payload, as_json, [f"wrote {out} ({len(conds)} images)",
                            f"wall time {wall:.2f} s, NFE per image {nfe:g}"])


def read_prompts(prompt: list[str], prompts_file: Path | None) -> list[str]:
    """--prompt values, then the non-empty lines of --prompts FILE."""
    text = list(prompt)
    if prompts_file is not None:
        try:
            lines = Path(prompts_file).read_text(encoding="utf-8-sig").splitlines()
        except OSError as e:
            raise HastenError(f"cannot read --prompts {prompts_file}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise HastenError(f"cannot read --prompts {prompts_file}: not UTF-8 text (byte {e.start})") from None
        text += [ln.strip() for ln in lines if ln.strip()]
        if not text:
            raise HastenError(f"--prompts {prompts_file} holds no prompt")
    for p in text:
        if not p.strip():
            raise HastenError("empty --prompt")
    return text


@app.command("eval")
def evaluate(
    model: str = typer.Option("digits", help="embedded model name (digits, shapes) or a save_pretrained folder"),
    samples: int = typer.Option(1000, help="number of samples (digits: spread over the classes; shapes: "
                                           "held-out captions)"),
    steps: int = typer.Option(50, help="sampling steps"),
    cfg: float = typer.Option(None, help="guidance scale (default: the model's)"),
    seed: int = typer.Option(0, help="random seed"),
    schedule: str = typer.Option("linear", help="linear | linear-quadratic (digits)"),
    solver: str = typer.Option("euler", help="euler | heun (digits)"),
    batch_size: int = typer.Option(100, help="images per sampling batch"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Sample, then score: digits: class accuracy and FD-digits; shapes: prompt adherence and FD-shapes."""
    from .pipeline import load_pipeline

    if samples < 10:
        raise HastenError(f"--samples must be >= 10, got {samples}")
    check_sampling_options(steps, cfg, solver, schedule)
    if batch_size < 1:
        raise HastenError(f"--batch-size must be >= 1, got {batch_size}")
    pipe = load_pipeline(model)
    check_model_options(pipe, model, solver, schedule)
    if hasattr(pipe, "encode_prompt") and schedule != "linear":
        raise HastenError("--schedule is for class-conditional models; hasten eval samples text-to-image models "
                          "on their scheduler's own sigmas")
    if hasattr(pipe, "encode_prompt"):
        from .eval.shapes_eval import evaluate_shapes

        res = evaluate_shapes(pipe, samples=samples, steps=steps, guidance_scale=cfg, seed=seed,
                              batch_size=batch_size)
        lines = [f"adherence        {res['adherence']:.4f}"]
        lines += [f"  {cat:<15}{v:.4f}" for cat, v in res["adherence_per_category"].items()]
        lines += [f"FD-shapes        {res['fd_shapes']:.4f}",
                  f"real-vs-real FD  {res['fd_real_vs_real']:.4f}  (held-out vs held-out, same n)",
                  f"wall time        {res['wall_s']:.1f} s, NFE per image {res['nfe']:g}"]
        emit(res, as_json, lines)
        return
    from .eval.metrics import evaluate_pipeline

    res = evaluate_pipeline(pipe, samples=samples, steps=steps, guidance_scale=cfg, seed=seed,
                            schedule=schedule, solver=solver, batch_size=batch_size)
    emit(res, as_json, [f"class accuracy   {res['class_accuracy']:.4f}",
                        f"FD-digits        {res['fd_digits']:.4f}",
                        f"real-vs-real FD  {res['fd_real_vs_real']:.4f}  (train vs held-out)",
                        f"ratio            {res['fd_ratio']:.2f}",
                        *([f"same-n real FD   {res['fd_real_subset_same_n']:.4f}  ({samples} real train images vs "
                           f"held-out; ratio {res['fd_ratio_same_n']:.2f})"] if res["fd_ratio_same_n"] else []),
                        f"wall time        {res['wall_s']:.1f} s, NFE per image {res['nfe']:g}"])


@app.command("train")
def train_cmd(
    out: Path = typer.Option(..., help="output folder (save_pretrained layout; checkpoints inside, resumable)"),
    model: str = typer.Option(None, help="digits | shapes (the model to train; default digits)"),
    steps: int = typer.Option(None, help="optimisation steps (digits 6000, shapes transformer 5000, "
                                        "classifier 1500, shapes-encoder 2000)"),
    batch_size: int = typer.Option(None, help="batch size (digits 64, shapes 64)"),
    lr: float = typer.Option(None, help="learning rate (digits 5e-4, shapes 5e-4)"),
    seed: int = typer.Option(0),
    what: str = typer.Option(None, help="classifier (digits evaluator CNN) | shapes-encoder (FD-shapes CNN)"),
) -> None:
    """Train a default model (Movie Gen flow matching) or an evaluator network. Re-running resumes (shapes)."""
    if steps is not None and steps < 1:
        raise HastenError(f"--steps must be >= 1, got {steps}")
    if batch_size is not None and batch_size < 1:
        raise HastenError(f"--batch-size must be >= 1, got {batch_size}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise HastenError(f"--lr must be a positive number, got {lr}")
    if what is not None and model is not None:
        raise HastenError("give --model or --what, not both")
    if what is not None and (batch_size is not None or lr is not None):
        raise HastenError(f"--what {what} trains with its own batch size and learning rate: drop --batch-size/--lr")
    target = what or model or "digits"
    check_out_folder(out)
    if target == "digits":
        from .train import TrainConfig, train

        out.mkdir(parents=True, exist_ok=True)
        cfg = TrainConfig(seed=seed)
        for name, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
            if v is not None:
                setattr(cfg, name, v)
        log = train(out, cfg)
        typer.echo(f"wrote {out}: final loss {log['loss_curve'][-1]['loss']:.4f} in {log['train_seconds']} s")
    elif target == "shapes":
        from .train_shapes import TransformerTrainConfig, train_shapes

        cfg = TransformerTrainConfig(seed=seed)
        for name, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
            if v is not None:
                setattr(cfg, name, v)
        out.mkdir(parents=True, exist_ok=True)
        log = train_shapes(out, tr_cfg=cfg)
        typer.echo(f"wrote {out}: final loss {log['loss_curve'][-1]['loss']:.4f} in {log['train_seconds']} s")
    elif target == "classifier":
        from .eval.classifier import train_classifier

        out.mkdir(parents=True, exist_ok=True)
        info = train_classifier(out, steps=1500 if steps is None else steps, seed=seed)
        typer.echo(f"wrote {out}: held-out accuracy {info['held_out_accuracy']:.4f}")
    elif target == "shapes-encoder":
        from .eval.scene_encoder import train_encoder

        info = train_encoder(out, steps=2000 if steps is None else steps, seed=seed)
        typer.echo(f"wrote {out}: held-out exact-count accuracy {info['held_out']['count_exact_accuracy']:.4f}")
    else:
        raise HastenError(f"unknown model {target!r}: --model digits | shapes, --what classifier | shapes-encoder")


@app.command("bench")
def bench_cmd(
    model: str = typer.Option("digits", help="embedded model name or a save_pretrained folder"),
    out: Path = typer.Option(..., help="output folder: results.json, results.md, pareto.png, plans/"),
    quick: bool = typer.Option(False, "--quick", help="the <= 3-minute smoke test"),
    samples: int = typer.Option(None, help="evaluation samples (default: 160; shapes: 96; quick: 20)"),
    batch_size: int = typer.Option(None, help="samples per repetition (default: 40; shapes: 32; quick: 10)"),
    seed: int = typer.Option(None, help="digits: seed of the first batch (batch k uses seed + k; default 0); "
                                        "shapes: the evaluation noise's seed (default 1)"),
    peers: bool = typer.Option(True, "--peers/--no-peers", help="include diffusers' and cache-dit's caches"),
    realistic: bool = typer.Option(None, "--realistic/--no-realistic",
                                   help="the DiT-XL/2-size overhead check (default: on, off with --quick)"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's)"),
    suite: str = typer.Option("default", help="default (every method, solvers, peers) | full (shapes: finer "
                              "step grids and more variants, longer) | guidance (AG and "
                              "LinearAG, calibrated and at the paper's threshold) | interval (guidance in "
                              "limited intervals)"),
    cfg: float = typer.Option(None, help="guidance scale for every configuration (default: the model's)"),
    flexi: str = typer.Option(None, help="a hasten flexify folder (or embedded name) of the model: adds FlexiDiT "
                              "configurations (default for --model shapes: the embedded shapes-flexi; 'none': off)"),
    students: str = typer.Option(None, help="distilled students of the model, comma-separated names or folders "
                                 "(default for --model shapes: the shipped shapes-ard4, shapes-flash; 'none': off)"),
    as_json: bool = typer.Option(False, "--json", help="print the results as one JSON object"),
) -> None:
    """Benchmark hasten's methods against fewer steps and peer caches, interleaved, in one process."""
    from .eval.bench import check_args, run_bench

    check_args(out, samples, batch_size, threads)
    res = run_bench(model, out, quick=quick, samples=samples, batch_size=batch_size, seed=seed, peers=peers,
                    realistic=realistic, threads=threads, suite=suite, guidance_scale=cfg, flexi=flexi,
                    students=students, progress=None if as_json else (lambda m: typer.echo(m, err=True)))
    lines = [f"wrote {out}/results.json, results.md, pareto.png ({len(res['records'])} configurations, "
             f"{res['protocol']['total_wall_s']:.0f} s)"]
    if suite not in ("default", "full"):
        for r in res["records"]:
            if r.get("error"):
                lines.append(f"{r['name']:<36} error: {r['error']}")
            else:
                lines.append(f"{r['name']:<36} NFE {r['nfe']:6.1f}  PSNR {r['psnr']:6.2f} dB  "
                             f"speed-up {r['speedup']:.2f}x")
    for row in res["quality_levels"]:
        h = row["hasten"]
        lines.append(f"{row['level']:<28} hasten {'-' if h is None else format(h['speedup'], '.2f') + 'x'}"
                     f"  fastest: {row['hasten_fastest']}")
    emit(res, as_json, lines)


@app.command("tune")
def tune_cmd(
    model: str = typer.Option("shapes", help="embedded model name or a diffusers save_pretrained folder"),
    min_psnr: float = typer.Option(..., "--min-psnr", help="PSNR (dB) against a converged solve to keep"),
    max_fd_increase: float = typer.Option(0.05, help="FD-shapes at most this share above the reference's"),
    max_adherence_drop: float = typer.Option(0.01, help="adherence at most this much below the reference's"),
    budget_minutes: float = typer.Option(20.0, help="time for the search (the confirmation comes after)"),
    prompts: Path = typer.Option(None, help="a file with one prompt per line (half tune, half confirm); "
                                 "default: the model's own captions"),
    samples: int = typer.Option(32, help="tuning captions (and as many held-out ones to confirm)"),
    out: Path = typer.Option(..., help="the plan file to write (a resumable state is kept beside it)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as one JSON object"),
) -> None:
    """The fastest plan (solver, steps, AG, Block Caching) inside a quality budget, confirmed on held-out
    prompts and seeds; apply it with hasten generate --plan or hasten.accelerate(pipe, plan=...)."""
    from .io import check_writable
    from .pipeline import load_pipeline
    from .tune import tune

    check_writable(out)
    if samples < 2:
        raise HastenError(f"--samples must be >= 2, got {samples}")
    text = read_prompts([], prompts) if prompts is not None else None
    pipe = load_pipeline(model)
    if not hasattr(pipe, "scheduler"):
        raise HastenError(f"model {model!r} has no diffusers scheduler to tune (hasten tune is for diffusers "
                          "text-to-image pipelines)")
    plan = tune(pipe, min_psnr, out, max_fd_increase, max_adherence_drop, budget_minutes, prompts=text,
                samples=samples, confirm_samples=samples, model_name=model, progress=not as_json,
                say=None if as_json else (lambda m: typer.echo(m, err=True)))
    c = plan["confirmed"]
    q = ", ".join(f"{k} {v:.3g}" for k, v in c["quality"].items())
    emit(plan, as_json, [f"wrote {out}: {plan['candidate']}",
                         f"confirmed on {c['samples']} held-out prompts: {c['speedup']:.2f}x end to end "
                         f"against 50-step Euler CFG; {q}"])


@app.command("flexify")
def flexify_cmd(
    model: str = typer.Option("shapes", help="the text-to-image model to make flexible (name or folder)"),
    out: Path = typer.Option(..., help="output folder (checkpoints and data inside; re-running resumes)"),
    steps: int = typer.Option(None, help="optimisation steps (default: 2000; digits: 600)"),
    batch_size: int = typer.Option(None, help="batch size (default: 32; digits: 64)"),
    scenes: int = typer.Option(20_000, help="training scenes rendered and encoded for the distillation"),
    rank: int = typer.Option(32, help="LoRA rank"),
    lora_targets: str = typer.Option("image", help="LoRA variant: the modules with adapters, 'image' (the image "
                                     "stream's attention and feed-forward) or 'joint' (both streams')"),
    weak_patch: int = typer.Option(4, help="the coarse patch size"),
    weak_sigma_min: float = typer.Option(0.3, help="LoRA variant: distil at sigma uniform on [this, 1], where the "
                                         "weak mode runs"),
    distil_guidance: float = typer.Option(0.0, help="LoRA variant: > 1 distils both CFG branches of every caption "
                                          "and the guided velocity at this scale (0: the paper's loss)"),
    as_json: bool = typer.Option(False, "--json", help="print the training log as one JSON object"),
) -> None:
    """FlexiDiT fine-tuning: the LoRA variant for text-to-image models (coarse mode distilled into
    per-size adapters, base frozen), the shared-parameter variant for class-conditional ones (digits);
    writes a folder that hasten.load_pipeline and --model load."""
    from .flexidit_train import LORA_TARGETS, FlexifyConfig, save_flexi, train_flexify
    from .pipeline import EMBEDDED, load_pipeline
    from .pipelines.shapes import encode_text
    from .train_shapes import load_data, prepare_data

    for name, v in (("steps", steps), ("batch-size", batch_size), ("scenes", scenes), ("rank", rank)):
        if v is not None and v < 1:
            raise HastenError(f"--{name} must be >= 1, got {v}")
    if not 0.0 <= weak_sigma_min < 1.0:
        raise HastenError(f"--weak-sigma-min must be in [0, 1), got {weak_sigma_min}")
    if not (distil_guidance == 0.0 or distil_guidance > 1.0):
        raise HastenError(f"--distil-guidance must be 0 (off) or > 1, got {distil_guidance}")
    if lora_targets not in LORA_TARGETS:
        raise HastenError(f"--lora-targets must be {' or '.join(map(repr, LORA_TARGETS))}, got {lora_targets!r}")
    check_out_folder(out)
    pipe = load_pipeline(model)
    out.mkdir(parents=True, exist_ok=True)
    base = model if model in EMBEDDED else str(Path(model).resolve())
    text = hasattr(pipe, "encode_prompt")
    steps = steps or (2000 if text else 600)
    batch_size = batch_size or (32 if text else 64)
    if not text:  # class-conditional (digits): the shared-parameter variant
        from .data.digits import digits
        from .flexidit_train import SharedFlexifyConfig, train_flexify_shared

        cfg_s = SharedFlexifyConfig(steps=steps, batch_size=batch_size, weak_patch=weak_patch)
        log = train_flexify_shared(pipe, out, cfg_s, digits("train"), progress=not as_json)
        if log["finished"]:
            save_flexi(pipe, out, base, {"weak_patch": weak_patch, "steps": steps,
                                         "base_weights": log["base_weights"]})
    else:
        data = load_data(prepare_data(out, pipe.vae, scenes, 0, not as_json, pipe.text_encoder, pipe.tokenizer))
        empty = encode_text(pipe.text_encoder, pipe.tokenizer, [""], warn=False)
        cfg = FlexifyConfig(steps=steps, batch_size=batch_size, rank=rank, weak_patch=weak_patch,
                            weak_sigma_min=weak_sigma_min, lora_targets=lora_targets,
                            distil_guidance=distil_guidance)
        log = train_flexify(pipe, out, data, empty, cfg, progress=not as_json)
        save_flexi(pipe, out, base, {"rank": rank, "weak_patch": weak_patch, "steps": steps, "scenes": scenes,
                                     "weak_sigma_min": weak_sigma_min, "lora_targets": lora_targets,
                                     "distil_guidance": distil_guidance})
    emit(log, as_json, [f"wrote {out} ({log['trainable_parameters']} trained parameters, "
                        f"{log['train_seconds']:.0f} s); load it with --model {out}"])


@app.command("calibrate")
def calibrate_cmd(
    out: Path = typer.Option(..., help="plan JSON to write"),
    model: str = typer.Option("digits", help="embedded model name or a save_pretrained folder"),
    method: str = typer.Option("block-cache", help="method to calibrate (block-cache, ...)"),
    delta: float = typer.Option(None, help="block-cache: threshold of the accumulated-change rule (Eq. 7)"),
    threshold: float = typer.Option(None, help="linear-ag: a fixed AG threshold for the second half instead "
                                    "of the search for --min-psnr"),
    min_psnr: float = typer.Option(None, help="ag / linear-ag: calibrate the AG threshold to keep this PSNR "
                                   "(dB) against CFG on the calibration runs (default 35)"),
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
    from .specs import calibrate_cli

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
    if min_psnr is not None:
        if method not in ("ag", "adaptive-guidance", "linear-ag"):
            raise HastenError(f"--min-psnr is an option of --method ag / linear-ag, not {method}")
        options["min_psnr"] = min_psnr
    res = calibrate_cli(model, method, out, options, plot=plot, steps=steps, solver=solver, schedule=schedule,
                        guidance_scale=cfg, labels=None if labels is None else parse_labels(labels, 1),
                        seeds=seed_list)
    lines = [f"wrote {res['out']} ({method}, {steps} {solver} steps)"]
    if "ideal_speedup" in res:
        lines.append(f"delta {res.get('delta')}: ideal speedup {res['ideal_speedup']:.2f}x (share of block work)")
    if "scale_shift_file" in res:
        lines.append(f"scale-shift parameters: {res['scale_shift_file']}")
    if "calibration" in res:
        c = res["calibration"]
        met = "" if c["met"] else f" (target {c['min_psnr_db']} dB not met even without switching)"
        lines.append(f"AG threshold {res['threshold']:.6g} at guidance {res.get('guidance_scale')}: "
                     f"{c['psnr_db']:.2f} dB against CFG, {c['nfe']:.1f} NFE per image on the calibration "
                     f"runs{met}")
    if "plot" in res:
        lines.append(f"wrote {res['plot']}")
    emit(res, as_json, lines)


from .decoding.cli import register as _register_decoding  # noqa: E402

_register_decoding(app)

from .distill.cli import register as _register_distill  # noqa: E402

_register_distill(app)


def quiet_loading() -> None:
    """No per-file progress bars from diffusers / transformers while a model loads (the CLI's output is
    its own lines; a bad-input run prints exactly one)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    """Console entry point: HastenError becomes one line on stderr and exit code 2."""
    quiet_loading()
    try:
        app(standalone_mode=True)
    except HastenError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
