"""``StudentPipeline``: the ``shapes`` pipeline sampling with a distilled few-step student.

Same call signature as :class:`hasten.ShapesPipeline`, so users, ``hasten generate`` and the benchmarks
swap a student in by name. What differs is said with an error, not silently ignored: a student samples
only at the step counts it was trained for, and the teacher's guidance scale is distilled in (one branch
per step), so another scale, negative prompts, custom sigmas or step callbacks are refused.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import HastenError
from ..io import atomic_write, read_model_folder, write_json
from ..pipelines.shapes import ShapesPipeline

WEIGHTS = "student.safetensors"


def said_counts(counts: Any) -> str:
    """Step counts for a message: "4", "1 or 2", "1, 2 or 3"."""
    c = [str(k) for k in counts]
    return c[0] if len(c) == 1 else ", ".join(c[:-1]) + " or " + c[-1]


def train_student(student: torch.nn.Module, out: str | Path, cfg: Any,
                  loss_fn: Callable[[torch.nn.Module, int, torch.Generator], torch.Tensor], what: str,
                  progress: bool = True, stop_after: int | None = None, extra: dict[str, Any] | None = None) -> dict:
    """Train (or resume) ``student`` on ``loss_fn(student, step, gen)``: AdamW, cosine schedule with warm-up,
    gradient clipping at 1, EMA, optional CPU bf16 autocast, atomic checkpoints in ``out/checkpoints``.

    ``cfg`` is a dataclass with ``steps, lr, weight_decay, warmup, ema_decay, seed, checkpoint_every,
    log_every, bf16_autocast``. Step ``s`` draws all its randomness from a generator seeded by
    ``seed * 1_000_003 + s``, so an interrupted run resumes to the same weights; a checkpoint of other
    settings is refused. Returns the log (config, loss curve, times) with the EMA student as ``student``.
    ``stop_after`` interrupts (tests). ``extra``: objects with their own state that ``loss_fn`` updates (a GAN's
    discriminator), saved in and restored from the checkpoint by name."""
    from ..train import autocast_bf16, ema_update
    from ..train_shapes import LossLog, cosine_lr, load_checkpoint, optimizer_step, save_checkpoint

    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoints" / "student.pt"
    student.train().requires_grad_(True)
    ema = copy.deepcopy(student).requires_grad_(False).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.steps, cfg.warmup))
    start, curve, elapsed, cpu = 0, [], 0.0, 0.0
    state = load_checkpoint(ckpt_path, cfg)
    if state is not None:
        student.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, curve, elapsed, cpu = state["step"], state["curve"], state["elapsed_s"], state["cpu_s"]
        for name, obj in (extra or {}).items():
            obj.load_state_dict(state["extra"][name])
    t0, c0 = time.time() - elapsed, time.process_time() - cpu
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress, desc=what,
               dynamic_ncols=True)
    loss_log = LossLog(curve, cfg.log_every, cfg.steps, t0, bar)
    for step in bar:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16(cfg.bf16_autocast)):
            loss = loss_fn(student, step, gen).float()
        value = optimizer_step(loss, opt, sched, student.parameters(), what, step)
        ema_update(ema, student, step, cfg.ema_decay)
        loss_log.add(step, value)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            save_checkpoint(ckpt_path, {"model": student.state_dict(), "ema": ema.state_dict(),
                                        "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1,
                                        "curve": curve, "elapsed_s": time.time() - t0,
                                        "cpu_s": time.process_time() - c0, "config": asdict(cfg),
                                        "extra": {name: obj.state_dict() for name, obj in (extra or {}).items()}})
    return {"train_config": asdict(cfg), "loss_curve": curve, "step": end, "finished": end == cfg.steps,
            "train_seconds": round(time.time() - t0, 1), "train_cpu_seconds": round(time.process_time() - c0, 1),
            "num_parameters": sum(p.numel() for p in student.parameters()), "student": ema}


def shipped_students() -> list[str]:
    """The embedded models that are distilled students with their weights in this install (``shapes-ard4``,
    ``shapes-flash``): every ``EMBEDDED`` folder holding a ``student.safetensors``."""
    from ..pipeline import EMBEDDED

    return [name for name, folder in EMBEDDED.items() if (folder / WEIGHTS).is_file()]


def save_student(student: torch.nn.Module, folder: str | Path, config_name: str, cfg: dict,
                 dtype: torch.dtype | None = None) -> Path:
    """``folder/config_name`` (``cfg``: the base model, the student's shape, and ``base_vae``, the
    :func:`hasten.plans.weights_hash` of the base's VAE, whose latent space the student samples in) and
    ``folder/student.safetensors`` (in ``dtype`` when given; :func:`load_student` reads float32), each
    written atomically."""
    from safetensors.torch import save_file

    if "base_vae" not in cfg:
        raise HastenError("a student's config must record base_vae (the base VAE's weights hash)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in student.state_dict().items()}
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    write_json(folder / config_name, cfg)
    return folder


def load_student(folder: str | Path, config_name: str, what: str,
                 build: Callable[[Any, dict], torch.nn.Module], pipeline: type[StudentPipeline]) -> StudentPipeline:
    """The ``pipeline`` around the student of ``folder`` (see :func:`save_student`): its base model loaded by
    name, the VAE checked, the student built by ``build(base_pipeline, cfg)`` and its weights loaded."""
    from ..pipeline import load_pipeline
    from ..plans import weights_hash

    folder = Path(folder)
    error = f"cannot load the {what} student in {folder}"
    cfg, tensors = read_model_folder(folder, config_name, WEIGHTS, error)
    try:
        base = cfg["base"]
    except (KeyError, TypeError) as e:
        raise HastenError(f"{error}: {e}") from None
    base_pipe = load_pipeline(base)
    if weights_hash(base_pipe.vae) != cfg.get("base_vae"):
        raise HastenError(f"{folder} was distilled in the latent space of other {base!r} weights than the ones "
                          "installed; distil it again")
    student = build(base_pipe, cfg)
    try:
        student.load_state_dict(tensors)
    except RuntimeError as e:
        raise HastenError(f"{folder}: the weights do not fit the student of {base!r}: "
                          f"{str(e).splitlines()[0]}") from None
    student.requires_grad_(False).eval()
    scale = float(cfg.get("guidance_scale", base_pipe.default_guidance_scale))
    pipe = pipeline.from_student(student, base_pipe, guidance_scale=scale)
    pipe.name = folder.name
    pipe.model_dir = folder
    pipe.student_config = cfg  # what it was distilled from and with (trajectories, steps, ...)
    return pipe


def init_student(student: torch.nn.Module, folder: str | Path, config_name: str, what: str, vae_hash: str,
                 check: Callable[[dict], str | None] | None = None) -> None:
    """``--init``: load the weights of the saved ``what`` student in ``folder`` (a path, or an embedded name such
    as ``shapes-ard4``; see :func:`save_student`) into ``student`` to start a second training stage. It must have
    been distilled in the latent space of the VAE whose :func:`hasten.plans.weights_hash` is ``vae_hash``;
    ``check(config)`` returns what else is wrong with it, or None."""
    from ..pipeline import EMBEDDED

    folder = EMBEDDED.get(str(folder), Path(folder))
    cfg, tensors = read_model_folder(folder, config_name, WEIGHTS, f"--init {folder} is not an {what} student folder")
    if not isinstance(cfg, dict) or cfg.get("base_vae") != vae_hash:
        raise HastenError(f"--init {folder} is not an {what} student of this teacher")
    problem = check(cfg) if check is not None else None
    if problem:
        raise HastenError(f"--init {folder}: {problem}")
    try:
        student.load_state_dict(tensors)  # float16 on disk, copied into the float32 parameters
    except RuntimeError as e:
        raise HastenError(f"--init {folder}: the weights do not fit this student: {str(e).splitlines()[0]}") from None


class StudentPipeline(ShapesPipeline):
    """Subclasses name their ``method`` and implement :meth:`sample_latents`; ``student.step_counts`` (or
    ``(student.steps,)``) are the step counts it samples at, ``student.steps`` the default."""

    method = "distilled"
    student: Any
    num_steps: int

    @classmethod
    def from_student(cls, student: Any, base: Any, guidance_scale: float) -> StudentPipeline:
        """The student with the VAE, text encoder and scheduler of its ``base`` pipeline."""
        pipe = cls(transformer=student.transformer, vae=base.vae, scheduler=base.scheduler,
                   text_encoder=base.text_encoder, tokenizer=base.tokenizer)
        pipe.student, pipe.num_steps = student, student.steps
        pipe.default_guidance_scale = guidance_scale
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def step_counts(self) -> tuple[int, ...]:
        return tuple(getattr(self.student, "step_counts", (self.student.steps,)))

    def sample_latents(self, noise: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, steps: int
                       ) -> torch.Tensor:
        raise NotImplementedError

    def _steps(self, num_inference_steps: Any) -> int:
        k = self.num_steps if num_inference_steps is None else num_inference_steps
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        counts = self.step_counts
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or int(k) not in counts:
            raise HastenError(f"this {self.method} student samples in {said_counts(counts)} steps, "
                              f"not {num_inference_steps}")
        return int(k)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, sigmas: list[float] | None = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil", height: int | None = None,
                 width: int | None = None, return_dict: bool = True, callback_on_step_end: Any = None) -> Any:
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        k = self._steps(num_inference_steps)
        if guidance_scale is not None and not math.isclose(float(guidance_scale), self.default_guidance_scale):
            raise HastenError(f"this student has guidance {self.default_guidance_scale:g} distilled in; "
                              f"it cannot sample at guidance_scale {guidance_scale}")
        if sigmas is not None or negative_prompt is not None or callback_on_step_end is not None:
            raise HastenError(f"an {self.method} student takes no sigmas, negative_prompt or callback_on_step_end")
        self.check_output(output_type, height, width)
        self.check_inputs(num_images_per_prompt, self.default_guidance_scale, k, None)
        prompts = [p for p in self.check_prompts(prompt) for _ in range(num_images_per_prompt)]
        self.check_latents(latents, generator, len(prompts))
        text, pooled = self.encode_prompt(prompts)
        if latents is None:
            latents = randn_tensor((len(prompts), *self.latent_shape), generator=generator, device=text.device,
                                   dtype=torch.float32)
        z = self.sample_latents(latents.to(text.device, torch.float32), text, pooled, k)
        images = self.to_output(z, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
