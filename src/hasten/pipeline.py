"""Flow-matching sampling for class-conditional diffusion transformers (the Movie Gen recipe).

Convention (Movie Gen, Polyak et al. 2024): t runs from 0 (pure noise X_0) to 1 (data X_1),

    X_t = t X_1 + (1 - (1 - sigma_min) t) X_0,        v = dX_t/dt = X_1 - (1 - sigma_min) X_0,

and the transformer predicts v. Sampling integrates dx/dt = v(x, t) from t=0 to t=1 with Euler or
Heun over a time grid (``linear`` or Movie Gen's ``linear-quadratic`` schedule). The transformer is a
diffusers ``DiTTransformer2DModel``; it sees the timestep as ``1000 t`` (the scale its sinusoidal
embedding was designed for) and the null class ``num_classes`` for the unconditional branch.

Classifier-free guidance batches both branches in ONE transformer call, unconditional rows first
(``[x_u; x_c]``, the order of most diffusers pipelines), so a hook on the transformer sees the
whole guidance batch at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from .errors import HastenError
from .io import atomic_write

SIGMA_MIN = 1e-5
TIME_SCALE = 1000.0
PIPELINE_CONFIG = "hasten_pipeline.json"
MODELS_DIR = Path(__file__).parent / "models"
EMBEDDED = {"digits": MODELS_DIR / "digits", "shapes": MODELS_DIR / "shapes",
            # FlexiDiT fine-tunes (hasten flexify): what they add to their base, applied on load
            "digits-flexi": MODELS_DIR / "digits_flexi", "shapes-flexi": MODELS_DIR / "shapes_flexi",
            # a 4-step ARD student distilled from shapes (hasten distill ard)
            "shapes-ard4": MODELS_DIR / "shapes_ard4",
            # a 1-3 step Imagine Flash student of shapes (hasten distill imagine-flash)
            "shapes-flash": MODELS_DIR / "shapes_flash"}

Velocity = Callable[[torch.Tensor, float], torch.Tensor]


# --------------------------------------------------------------------------- schedules
def linear_schedule(num_steps: int) -> list[float]:
    """t_i = i / S for i = 0..S (S + 1 points, noise to data)."""
    return [i / num_steps for i in range(num_steps + 1)]


def linear_quadratic_schedule(num_steps: int, emulated_steps: int | None = None) -> list[float]:
    """Movie Gen's linear-quadratic t-schedule: S steps that emulate an N-step linear schedule.

    The first L = S // 2 steps are the first L steps of the N-step linear schedule, t_i = i / N
    (fine steps near the noise, where the flow changes fastest). The remaining Q = S - L steps follow
    a quadratic f(i) = a i^2 + b i + c chosen so that f(L) = L / N, f'(L) = 1 / N (the step size is
    continuous at the junction) and f(S) = 1. This is diffusers' Mochi ``linear_quadratic_schedule``
    written in Movie Gen's t (t = 1 - sigma) with threshold L / N. Movie Gen emulates N = 250 with
    S = 50, so the default is N = 5 S. Returns S + 1 increasing points from 0 to 1.
    """
    if num_steps < 1:
        raise HastenError(f"steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return [0.0, 1.0]
    n = 5 * num_steps if emulated_steps is None else emulated_steps
    if n < num_steps:
        raise HastenError(f"emulated steps ({n}) must be >= steps ({num_steps})")
    lin, q = num_steps // 2, num_steps - num_steps // 2
    t_lin = lin / n
    # f(L + j) = t_lin + j / N + a j^2 with a fixed by f(S) = 1.
    a = (1.0 - t_lin - q / n) / q**2
    ts = [i / n for i in range(lin + 1)]
    ts += [t_lin + j / n + a * j * j for j in range(1, q + 1)]
    ts[-1] = 1.0
    return ts


SCHEDULES = {"linear": linear_schedule, "linear-quadratic": linear_quadratic_schedule}


def make_schedule(name: str, num_steps: int) -> list[float]:
    if num_steps < 1:
        raise HastenError(f"steps must be >= 1, got {num_steps}")
    if name not in SCHEDULES:
        raise HastenError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](num_steps)


# --------------------------------------------------------------------------- solvers
def sample_euler(velocity: Velocity, x: torch.Tensor, ts: Sequence[float]) -> torch.Tensor:
    """Explicit Euler: x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i). One velocity call per step."""
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * velocity(x, t0)
    return x


def sample_heun(velocity: Velocity, x: torch.Tensor, ts: Sequence[float]) -> torch.Tensor:
    """Heun (explicit trapezoid, 2nd order): two velocity calls per step, on every step.

    Unlike k-diffusion's Heun, the last step is not reduced to Euler: the flow-matching velocity is
    finite at t = 1.
    """
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = t1 - t0
        d0 = velocity(x, t0)
        x_pred = x + h * d0
        d1 = velocity(x_pred, t1)
        x = x + h * 0.5 * (d0 + d1)
    return x


SOLVERS = {"euler": sample_euler, "heun": sample_heun}


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance v = v_u + s (v_c - v_u). Scale 1 is the conditional prediction."""
    if scale == 1.0:
        return v_cond
    return v_uncond + scale * (v_cond - v_uncond)


# --------------------------------------------------------------------------- pipeline
@dataclass
class PipelineOutput:
    """Sampled images and the denoiser work the pipeline asked for.

    ``nfe`` counts the rows the pipeline requested per sample (a CFG step counts 2). An acceleration
    handle may send fewer rows to the transformer (Adaptive Guidance): ``handle.report()["nfe"]``
    counts what actually ran.
    """

    images: torch.Tensor  # (B, C, H, W) in [0, 1]
    nfe: float  # denoiser evaluations per sample requested by the pipeline
    transformer_calls: int
    timesteps: list[float] = field(default_factory=list)

    def save_grid(self, path: str | os.PathLike, nrow: int | None = None) -> Path:
        return save_grid(self.images, path, nrow=nrow)


class HastenPipeline:
    """Class-conditional flow-matching sampler around a diffusers ``DiTTransformer2DModel``."""

    def __init__(self, transformer: DiTTransformer2DModel, num_classes: int | None = None,
                 guidance_scale: float = 3.0, name: str = "custom"):
        self.transformer = transformer.eval()
        cfg = transformer.config
        self.num_classes = int(num_classes if num_classes is not None else cfg.num_embeds_ada_norm)
        self.null_class = self.num_classes
        self.image_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.default_guidance_scale = guidance_scale
        self.name = name

    @staticmethod
    def noise_level(timestep: float) -> float:
        """The noise level (1 = pure noise) of a transformer call at ``timestep`` = 1000 t (Movie Gen's t)."""
        return 1.0 - timestep / TIME_SCALE

    # ------------------------------------------------------------------ denoiser
    def velocity_fn(self, labels: torch.Tensor, guidance_scale: float, counter: dict) -> Velocity:
        """The guided velocity field v(x, t) for fixed labels; counts transformer calls and rows."""
        null = torch.full_like(labels, self.null_class)
        guided = guidance_scale != 1.0
        y = torch.cat([null, labels]) if guided else labels

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            xin = torch.cat([x, x]) if guided else x
            tin = torch.full((xin.shape[0],), t * TIME_SCALE, dtype=x.dtype, device=x.device)
            out = self.transformer(xin, timestep=tin, class_labels=y).sample
            counter["calls"] += 1
            counter["rows"] += xin.shape[0]
            if not guided:
                return out
            v_u, v_c = out.chunk(2)
            return cfg_combine(v_u, v_c, guidance_scale)

        return velocity

    # ------------------------------------------------------------------ sampling
    def check_labels(self, class_labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise HastenError("no class labels given")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise HastenError(f"label {int(bad[0])} out of range: this model has classes 0-{self.num_classes - 1}")
        return labels

    @property
    def device(self) -> torch.device:
        p = next(self.transformer.parameters(), None)
        return torch.device("cpu") if p is None else p.device

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.transformer.parameters(), None)
        return torch.float32 if p is None else p.dtype

    def initial_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise drawn on the CPU (the same images on every device for a seed), then moved to the model's
        device and dtype."""
        return torch.randn((n, *self.image_shape), generator=generator).to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, class_labels: Sequence[int] | torch.Tensor, num_inference_steps: int = 50,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 schedule: str = "linear", solver: str = "euler",
                 latents: torch.Tensor | None = None) -> PipelineOutput:
        """Sample one image per label. Returns images in [0, 1] and the denoiser call counts."""
        labels = self.check_labels(class_labels).to(self.device)
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        if not (math.isfinite(scale) and scale >= 0):
            raise HastenError(f"guidance scale must be a finite number >= 0, got {scale}")
        if solver not in SOLVERS:
            raise HastenError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        if latents is not None and tuple(latents.shape) != (len(labels), *self.image_shape):
            raise HastenError(f"latents must have shape {(len(labels), *self.image_shape)} for {len(labels)} labels, "
                              f"got {tuple(latents.shape)}")
        ts = make_schedule(schedule, int(num_inference_steps))
        x = self.initial_noise(len(labels), generator) if latents is None else latents.to(self.device, self.dtype)
        counter = {"calls": 0, "rows": 0}
        x = SOLVERS[solver](self.velocity_fn(labels, scale, counter), x, ts)
        images = ((x.clamp(-1, 1) + 1) / 2).float()
        return PipelineOutput(images=images, nfe=counter["rows"] / len(labels),
                              transformer_calls=counter["calls"], timesteps=ts)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, folder: str | os.PathLike, card: str | None = None) -> Path:
        """Write ``folder/transformer`` (diffusers format) and the pipeline config."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(folder / "transformer")
        meta = {"num_classes": self.num_classes, "guidance_scale": self.default_guidance_scale,
                "sigma_min": SIGMA_MIN, "time_scale": TIME_SCALE, "name": self.name}

        def _write(tmp: str) -> None:
            Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")

        atomic_write(folder / PIPELINE_CONFIG, _write)
        if card is not None:
            atomic_write(folder / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(card))
        return folder


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """The folder behind an embedded model name or a local path, with a helpful error."""
    key = str(name_or_path)
    if key in EMBEDDED:
        folder = EMBEDDED[key]
        markers = (PIPELINE_CONFIG, "model_index.json", "flexi_config.json", "ard_config.json", "flash_config.json")
        if not any((folder / f).is_file() for f in markers):
            raise HastenError(f"the embedded model {key!r} is missing its weights in {folder}; "
                              "reinstall hasten or train it with `hasten train`")
        return folder
    folder = Path(key)
    if folder.is_dir():
        return folder
    raise HastenError(f"unknown model {key!r}: use one of the embedded models "
                      f"({', '.join(sorted(EMBEDDED))}) or a folder written by save_pretrained")


class _EmptyFloat32Warning(logging.Filter):
    """diffusers 0.42's ``ModelMixin.to(dtype)`` warns that modules "should be kept in float32" even when
    there are none (``[]``): drop only that empty-list case, keep every real one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_FLOAT32_FILTER = _EmptyFloat32Warning()


def load_pipeline(name_or_path: str | os.PathLike = "digits"):
    """Load an embedded model (``"digits"``, ``"shapes"``) or a local folder written by ``save_pretrained``.

    A folder with a diffusers ``model_index.json`` (``shapes``) loads as a ``ShapesPipeline`` in float32;
    a folder with ``hasten_pipeline.json`` (``digits``) as a ``HastenPipeline``.
    """
    folder = resolve_model(name_or_path)
    if (folder / "ard_config.json").is_file():  # an ARD student of another model (hasten distill ard)
        from .distill.ard import load_ard

        return load_ard(folder)
    if (folder / "flash_config.json").is_file():  # an Imagine Flash student (hasten distill imagine-flash)
        from .distill.flash import load_flash

        return load_flash(folder)
    if (folder / "flexi_config.json").is_file():  # a FlexiDiT fine-tune of another model (hasten flexify)
        from .flexidit_train import load_flexi

        return load_flexi(folder)
    if (folder / "model_index.json").is_file():
        from .pipelines.shapes import ShapesPipeline

        modeling = logging.getLogger("diffusers.models.modeling_utils")
        if _FLOAT32_FILTER not in modeling.filters:
            modeling.addFilter(_FLOAT32_FILTER)
        try:
            pipe = ShapesPipeline.from_pretrained(folder, dtype=torch.float32)
        except LOAD_ERRORS as e:
            raise _load_error(folder, e) from None
        pipe.set_progress_bar_config(disable=True)
        pipe.model_dir = folder  # calibrated plans shipped with the model live in folder/plans
        return pipe
    meta_path = folder / PIPELINE_CONFIG
    if not meta_path.is_file() or not (folder / "transformer").is_dir():
        raise HastenError(f"{folder} is not a hasten model folder: expected {PIPELINE_CONFIG} and transformer/")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"{PIPELINE_CONFIG} is not a JSON object")
        num_classes, scale = int(meta.get("num_classes", -1)), float(meta.get("guidance_scale", 3.0))
        transformer = DiTTransformer2DModel.from_pretrained(folder / "transformer")
    except LOAD_ERRORS as e:
        raise _load_error(folder, e) from None
    if num_classes != transformer.config.num_embeds_ada_norm:
        raise HastenError(f"{folder}: {PIPELINE_CONFIG} says {meta.get('num_classes')} classes but the "
                          f"transformer has {transformer.config.num_embeds_ada_norm}")
    pipe = HastenPipeline(transformer, num_classes=num_classes, guidance_scale=scale,
                          name=str(meta.get("name", folder.name)))
    pipe.model_dir = folder
    return pipe


LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError)


def _load_error(folder: Path, e: BaseException) -> HastenError:
    """One line for a model folder that cannot be loaded: the first line of what went wrong."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return HastenError(f"cannot load model from {folder}: {first}")


# --------------------------------------------------------------------------- images
def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> torch.Tensor:
    """Tile (B, C, H, W) images in [0, 1] into one (C, H', W') image, ``nrow`` images per row."""
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for k in range(b):
        r, col = divmod(k, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[k]
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 4) -> Path:
    """Save a PNG grid of (B, C, H, W) images in [0, 1], upscaled ``scale`` times (nearest), atomically."""
    from PIL import Image

    grid = make_grid(images.detach().cpu().clamp(0, 1), nrow)
    arr = (grid * 255).round().to(torch.uint8)
    arr = arr.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    mode = "L" if arr.shape[0] == 1 else "RGB"
    img = Image.fromarray(arr[0].numpy() if mode == "L" else arr.permute(1, 2, 0).numpy(), mode)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
