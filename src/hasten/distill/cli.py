"""``hasten distill trajectories``, ``hasten distill ard`` and ``hasten distill imagine-flash``: registered on the
main app by ``register``."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import HastenError
from ..io import check_out_folder


def register(app: typer.Typer) -> None:
    """Add ``hasten distill ...`` to ``app`` (heavy imports stay inside the commands)."""
    distill = typer.Typer(no_args_is_help=True, help="Distil few-step students from a teacher's trajectories.")
    app.add_typer(distill, name="distill")

    @distill.command("trajectories")
    def trajectories_cmd(
        teacher: str = typer.Option("shapes", help="the teacher (a text-to-image model name or folder)"),
        steps: int = typer.Option(25, help="teacher Euler steps (CFG at the teacher's guidance)"),
        keep: int = typer.Option(4, help="kept intermediate states = student steps"),
        n: int = typer.Option(..., "--n", help="number of trajectories"),
        out: Path = typer.Option(..., help="output folder (re-running continues where it stopped)"),
        shard_size: int = typer.Option(256, help="trajectories per safetensors shard"),
        batch_size: int = typer.Option(64, help="teacher batch size"),
        as_json: bool = typer.Option(False, "--json", help="print the manifest as one JSON object"),
    ) -> None:
        """Run the teacher from noise on grammar captions and store its trajectories (resumable)."""
        import json

        from ..pipeline import load_pipeline
        from .trajectories import check_options, generate_trajectories

        check_options(out, n, steps, keep, shard_size, batch_size)  # before loading anything
        pipe = load_pipeline(teacher)
        if not hasattr(pipe, "encode_prompt") or hasattr(pipe, "student"):
            raise HastenError(f"--teacher {teacher!r} must be a text-to-image diffusion model (e.g. shapes)")
        man = generate_trajectories(pipe, out, n, steps, keep, shard_size, batch_size, teacher, progress=not as_json)
        typer.echo(json.dumps(man) if as_json else f"wrote {n} trajectories to {out} (kept steps "
                   f"{man['kept_indices']} of {steps})")

    @distill.command("add-x0")
    def add_x0_cmd(
        teacher: str = typer.Option("shapes", help="the teacher the trajectories came from"),
        data: Path = typer.Option(..., help="a folder written by hasten distill trajectories"),
        batch_size: int = typer.Option(64, help="trajectories per teacher call (4 kept states each, with CFG)"),
        trajectories: int | None = typer.Option(None, help="only the shards holding the first N trajectories "
                                                "(default: all)"),
    ) -> None:
        """Add the teacher's x0-predictions at the kept states to trajectories stored without them (resumable),
        for hasten distill ard --convention x0."""
        from ..pipeline import load_pipeline
        from .trajectories import add_x0_predictions, check_teacher, load_manifest

        if batch_size < 1:
            raise HastenError("--batch-size must be >= 1")
        check_teacher(load_manifest(data), data, teacher)
        written = add_x0_predictions(load_pipeline(teacher), data, batch_size, first=trajectories)
        typer.echo(f"added x0-predictions to {written} shards of {data}")

    @distill.command("ard")
    def ard_cmd(
        teacher: str = typer.Option("shapes", help="the teacher the trajectories came from"),
        data: Path = typer.Option(..., help="a folder written by hasten distill trajectories"),
        layers_with_history: int = typer.Option(..., help="N: lower blocks that attend to earlier steps "
                                                "(0 = plain step distillation)"),
        out: Path = typer.Option(..., help="output folder (checkpoints inside; re-running resumes)"),
        steps: int = typer.Option(2000, help="optimisation steps"),
        batch_size: int = typer.Option(32, help="trajectories per step"),
        lr: float = typer.Option(1e-4, help="AdamW learning rate"),
        warmup: int = typer.Option(100, help="steps of linear learning-rate warm-up before the cosine decay"),
        own_history: float = typer.Option(0.0, help="share of each batch whose inputs are the student's own "
                                          "sampled history (0: teacher-forced, the paper's recipe)"),
        init: str | None = typer.Option(None, help="an ARD student (folder or shapes-ard4) to start from"),
        trajectories: int | None = typer.Option(None, help="train on the first N trajectories of --data only "
                                                "(what --n N would have stored; default: all of them)"),
        loss_space: str = typer.Option("state", help="each step's MSE on the next state (state) or on the clean "
                                       "image the step implies (x0: early steps weigh more)"),
        convention: str = typer.Option("state", help="what each step reads and predicts: the teacher's states "
                                       "(state) or its x0-predictions (x0, the public re-implementation's; "
                                       "needs trajectories with them, see hasten distill add-x0)"),
        history_gate: bool = typer.Option(False, "--history-gate/--no-history-gate", help="zero-initialised "
                                          "learned gates on the history attention, so training starts from "
                                          "step distillation (not the paper's; off: the paper's attention)"),
        gan_weight: float = typer.Option(0.0, help="> 0: the paper's GAN fine-tune (discriminator heads on the "
                                         "frozen teacher's blocks, real rendered scenes), lambda of its adaptive "
                                         "weight (the re-implementation's: 10); use with --init"),
        gan_start: int = typer.Option(0, help="GAN fine-tune: steps that train only the discriminator first"),
        gan_lr: float = typer.Option(1e-3, help="GAN fine-tune: the discriminator's learning rate"),
        gan_scenes: int = typer.Option(5000, help="GAN fine-tune: real training scenes rendered and encoded"),
        as_json: bool = typer.Option(False, "--json", help="print the training log as one JSON object"),
    ) -> None:
        """Train an ARD student (teacher-forced, mean of per-step MSEs, AdamW, EMA; --gan-weight adds the paper's
        GAN fine-tune); writes a folder that hasten.load_pipeline and --model load."""
        import json

        import torch

        from ..pipeline import EMBEDDED, load_pipeline
        from ..plans import weights_hash
        from .ard import ARDConfig, check_gan, check_space, save_ard, train_ard
        from .trajectories import check_teacher, load_trajectories

        if steps < 1 or batch_size < 1 or not lr > 0:
            raise HastenError("--steps and --batch-size must be >= 1 and --lr > 0")
        if not 0 <= warmup <= steps:
            raise HastenError(f"--warmup must be in [0, --steps], got {warmup}")
        if not 0.0 <= own_history <= 1.0:
            raise HastenError(f"--own-history must be in [0, 1], got {own_history}")
        check_gan(gan_weight, gan_start, gan_lr)
        if gan_scenes < 1:
            raise HastenError(f"--gan-scenes must be >= 1, got {gan_scenes}")
        check_space("--loss-space", loss_space)
        check_space("--convention", convention)
        check_out_folder(out)
        traj = load_trajectories(data, first=trajectories)
        check_teacher(traj["manifest"], data, teacher)
        pipe = load_pipeline(teacher)
        cfg = ARDConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                        layers_with_history=layers_with_history, own_history=own_history, init=init,
                        history_gate=history_gate, trajectories=len(traj["captions"]), loss_space=loss_space,
                        convention=convention, gan_weight=gan_weight, gan_start=gan_start, gan_lr=gan_lr)
        torch.manual_seed(cfg.seed)
        vae = weights_hash(pipe.vae)
        real = None
        if gan_weight > 0:
            from ..train_shapes import load_data, prepare_data

            real = load_data(prepare_data(out, pipe.vae, gan_scenes, 0, not as_json, pipe.text_encoder,
                                          pipe.tokenizer))
        log = train_ard(pipe.transformer, traj, out, cfg, progress=not as_json, vae_hash=vae, real=real)
        student = log.pop("student")
        if log["finished"]:
            m = traj["manifest"]
            base = teacher if teacher in EMBEDDED else str(Path(teacher).resolve())
            save_ard(student, out, base, {"guidance_scale": m["guidance_scale"], "teacher_steps": m["steps"],
                                          "kept_indices": m["kept_indices"], "base_vae": vae,
                                          "trajectories": cfg.trajectories, "train_steps": steps,
                                          "own_history": own_history, "init": init,
                                          **({"gan_weight": gan_weight, "gan_start": gan_start, "gan_lr": gan_lr,
                                              "gan_scenes": gan_scenes} if gan_weight > 0 else {})})
            from ..io import write_json

            write_json(out / "train_log.json", log)
        typer.echo(json.dumps(log) if as_json else f"wrote {out} ({log['train_seconds']:.0f} s, final loss "
                   f"{log['loss_curve'][-1]['loss']:.5f}); load it with --model {out}")

    @distill.command("imagine-flash")
    def flash_cmd(
        teacher: str = typer.Option("shapes", help="the teacher (a text-to-image model name or folder)"),
        steps: int = typer.Option(3, help="the most steps the student samples in (1-3); it is trained for "
                                  "every count from 1 to this"),
        out: Path = typer.Option(..., help="output folder (checkpoints inside; re-running resumes)"),
        train_steps: int = typer.Option(2000, help="optimisation steps"),
        batch_size: int = typer.Option(32, help="captions per step"),
        lr: float = typer.Option(1e-4, help="AdamW learning rate"),
        backward: bool = typer.Option(True, "--backward/--forward", help="inputs from the student's own "
                                      "schedule (backward distillation) or forward-noised data (ablation)"),
        srl: bool = typer.Option(True, "--srl/--no-srl", help="Shifted Reconstruction Loss, or regression onto "
                                 "the teacher's x0 at the same input (ablation)"),
        tau_max: float = typer.Option(0.8, help="SRL shift: tau = tau_min + (tau_max - tau_min) sigma (< 1)"),
        tau_min: float = typer.Option(0.0, help="SRL shift at sigma = 0 (0 <= tau_min <= tau_max)"),
        srl_noise: str = typer.Option("trajectory", help="SRL re-noising noise: 'trajectory' (the sample's own "
                                      "start noise) or 'fresh'"),
        teacher_steps: int = typer.Option(1, help="teacher Euler steps (CFG) from the target's level to 0; "
                                          "1: its x0-prediction"),
        step_draw: str = typer.Option("count", help="which step each caption trains: 'count' (a step count, "
                                      "then one of its steps) or 'step' (every step of every count equally often)"),
        init: str | None = typer.Option(None, help="an Imagine Flash student (folder or shapes-flash) to start "
                                        "from (a second training stage)"),
        cfg_scale: float | None = typer.Option(None, "--cfg", help="the teacher's guidance scale distilled in "
                                               "(default: the teacher's)"),
        cfg_interval: str | None = typer.Option(None, help="LO,HI: the teacher guides only at noise levels "
                                                "LO < sigma <= HI, unguided elsewhere (Kynkaenniemi et al. 2024)"),
        caption_offset: int = typer.Option(0, help="the first caption seed (offset into the grammar's training "
                                           "captions): a later stage on captions no earlier stage saw"),
        as_json: bool = typer.Option(False, "--json", help="print the training log as one JSON object"),
    ) -> None:
        """Train an Imagine Flash student (backward distillation, Shifted Reconstruction Loss, guidance
        distilled in; AdamW, EMA) that samples in 1 to --steps steps; writes a folder that
        hasten.load_pipeline and --model load."""
        import json

        import torch

        from ..pipeline import EMBEDDED, load_pipeline
        from ..plans import weights_hash
        from .flash import MAX_STEPS, FlashConfig, save_flash, train_flash

        if not 1 <= steps <= MAX_STEPS:
            raise HastenError(f"--steps must be 1 to {MAX_STEPS} (Imagine Flash's few-step regime), got {steps}")
        cfg = FlashConfig(steps=train_steps, batch_size=batch_size, lr=lr, step_counts=tuple(range(1, steps + 1)),
                          backward=backward, srl=srl, tau_min=tau_min, tau_max=tau_max, srl_noise=srl_noise,
                          teacher_steps=teacher_steps, step_draw=step_draw,
                          init=init, guidance_scale=cfg_scale,
                          guidance_interval=_interval(cfg_interval), caption_offset=caption_offset)
        cfg.check()
        check_out_folder(out)
        pipe = load_pipeline(teacher)
        if not hasattr(pipe, "encode_prompt") or hasattr(pipe, "student"):
            raise HastenError(f"--teacher {teacher!r} must be a text-to-image diffusion model (e.g. shapes)")
        torch.manual_seed(cfg.seed)
        log = train_flash(pipe, out, cfg, progress=not as_json)
        student = log.pop("student")
        if log["finished"]:
            base = teacher if teacher in EMBEDDED else str(Path(teacher).resolve())
            save_flash(student, out, base, {"guidance_scale": log["guidance_scale"], "base_vae": weights_hash(pipe.vae),
                                            "backward": backward, "srl": srl, "tau_min": cfg.tau_min,
                                            "tau_max": cfg.tau_max, "srl_noise": cfg.srl_noise,
                                            "teacher_steps": cfg.teacher_steps, "step_draw": cfg.step_draw,
                                            "init": cfg.init, "train_steps": train_steps,
                                            "guidance_interval": cfg.guidance_interval})
            from ..io import write_json

            write_json(out / "train_log.json", log)
        typer.echo(json.dumps(log) if as_json else f"wrote {out} ({log['train_seconds']:.0f} s, final loss "
                   f"{log['loss_curve'][-1]['loss']:.5f}); load it with --model {out}")


def _interval(text: str | None) -> tuple[float, float] | None:
    """``--cfg-interval LO,HI`` as two floats (range checked by ``FlashConfig.check``)."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise HastenError(f"--cfg-interval needs two numbers LO,HI, got {text!r}") from None
    return lo, hi
