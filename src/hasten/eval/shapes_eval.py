"""``hasten eval --model shapes``: prompt adherence (GenEval-style), FD-shapes, PSNR/SSIM to a reference.

Evaluation captions are the held-out scenes ``HELD_OUT_SEED0 + i`` (never used in training). Image i
starts from its own noise, ``randn(seed * 1_000_003 + i)``, so a configuration's images do not depend
on the batch size and two configurations are compared image by image on the same noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..data.shapes import HELD_OUT_SEED0, sample_scene
from .metrics import _gaussian_fd, _stats, psnr, psnr_per_image, ssim
from .scene_encoder import FD_REFERENCE_SEED0, encoder_features, rendered
from .scene_parser import adherence

FD_REFERENCE_SIZE = 2000


def eval_scenes(n: int, seed0: int = HELD_OUT_SEED0) -> list:
    return [sample_scene(seed0 + i) for i in range(n)]


def image_noise_seed(seed: int, i: int) -> int:
    """The generator seed of image i's initial noise in a set drawn with ``seed``."""
    return seed * 1_000_003 + i


def initial_noise(pipe, n: int, seed: int) -> torch.Tensor:
    """Per-image noise, independent of batching: image i uses randn with :func:`image_noise_seed` (seed, i)."""
    shape = pipe.latent_shape
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_noise_seed(seed, i)))
                        for i in range(n)])


@torch.no_grad()
def generate_images(pipe, prompts: list[str], steps: int, guidance_scale: float | None, seed: int = 0,
                    batch_size: int = 50, noise: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, float]:
    """(images (N, 3, 64, 64) in [0, 1], wall seconds) for ``prompts`` on per-image noise."""
    noise = initial_noise(pipe, len(prompts), seed) if noise is None else noise
    out, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        res = pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                   latents=noise[i:i + batch_size], output_type="pt", **kwargs)
        out.append(res.images)
    return torch.cat(out), time.perf_counter() - t0


@lru_cache(maxsize=4)
def _reference_stats(n: int = FD_REFERENCE_SIZE, seed0: int = FD_REFERENCE_SEED0) -> tuple[np.ndarray, np.ndarray]:
    return _stats(encoder_features(rendered(seed0, n)))


def fd_shapes(images01: torch.Tensor) -> float:
    """FD between the scene-encoder features of ``images01`` and 2000 held-out rendered scenes."""
    return fd_of_features(encoder_features(images01))


def fd_of_features(features: torch.Tensor, reference: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """FD-shapes of scene-encoder ``features`` (against ``reference`` statistics, by default the rendered scenes')."""
    return _gaussian_fd(*_stats(features), *(_reference_stats() if reference is None else reference))


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of scene-encoder ``features``: a ``reference`` for :func:`fd_of_features` and
    :func:`paired_bootstrap` other than the rendered scenes (a teacher's samples, to measure how far a
    student's distribution is from its teacher's)."""
    return _stats(features)


def fidelity(images01: torch.Tensor, features: torch.Tensor, teacher_images01: torch.Tensor,
             teacher_stats: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, float]:
    """How close a distilled student stays to its teacher, on the same captions and initial noise: the per-image
    PSNR (dB) of ``images01`` against the teacher's images (the student's error on the map from noise to image
    it was trained to copy), and the FD between the student's scene-encoder ``features`` and the teacher's
    (``teacher_stats``, from :func:`feature_stats`). FD-shapes against rendered scenes cannot show what
    distillation loses when the teacher's own FD-shapes is raised by guidance: a student can drift from the
    teacher and score better there."""
    return psnr_per_image(images01, teacher_images01).numpy(), fd_of_features(features, teacher_stats)


def bootstrap_interval(values: np.ndarray, statistic=np.mean, resamples: int = 1000, seed: int = 0
                       ) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of ``statistic(values)``, the units (captions, timing rounds)
    resampled with replacement."""
    rng = np.random.default_rng(seed)
    stats = [statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(resamples)]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_mean(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict:
    """The mean of per-caption ``values`` (a paired difference, e.g. of PSNR in dB) with its 95% percentile
    bootstrap interval (:func:`bootstrap_interval`)."""
    lo, hi = bootstrap_interval(values, np.mean, resamples, seed)
    return {"mean": round(float(values.mean()), 3), "ci95": [round(lo, 3), round(hi, 3)]}


def real_vs_real_fd(n: int) -> float:
    """FD-shapes of ``n`` other held-out rendered scenes: the floor a perfect model reaches at this n."""
    return fd_shapes(rendered(FD_REFERENCE_SEED0 + 100_000, n))


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    return (images01.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@dataclass
class PerImage:
    """One configuration's per-image evaluation: scene-encoder features (N, 128) and whether every caption
    fact holds (N,). What :func:`paired_bootstrap` resamples."""
    features: torch.Tensor
    satisfied: np.ndarray


def score_images(scenes: list, images01: torch.Tensor, reference: torch.Tensor | None = None,
                 per_image: bool = False) -> dict:
    """Adherence (overall and per category), FD-shapes, and PSNR/SSIM against ``reference``; with
    ``per_image`` also ``"per_image"``: a :class:`PerImage` for :func:`paired_bootstrap`."""
    res = adherence([s.facts for s in scenes], [s.category for s in scenes], to_uint8(images01))
    features = encoder_features(images01)
    out = {"adherence": res["adherence"], "adherence_per_category": res["per_category"],
           "fd_shapes": fd_of_features(features), "samples": len(scenes)}
    if reference is not None:
        out["psnr"] = psnr(images01, reference)
        out["ssim"] = ssim(images01, reference)
    if per_image:
        out["per_image"] = PerImage(features, np.asarray(res["satisfied"], dtype=bool))
    return out


def paired_bootstrap(a: PerImage, b: PerImage, resamples: int = 1000, seed: int = 0,
                     reference: tuple[np.ndarray, np.ndarray] | None = None,
                     reference_features: torch.Tensor | None = None) -> dict:
    """Differences a - b in FD-shapes and in adherence (points), with 95% percentile bootstrap intervals.

    ``a`` and ``b`` are two configurations on the same captions and the same initial noise, so the captions
    are resampled with replacement together (a paired bootstrap): the variance the two share (hard captions,
    lucky noise) cancels in the difference. An independent FD reference (the rendered scenes, or
    ``reference`` statistics) is held fixed. ``reference_features`` is a reference sampled on the same
    captions and noise (a teacher's images, for the FD to the teacher): it is the third member of each pair
    and is resampled with the same indices. A difference is resolved at this sample size when its interval
    excludes 0.
    """
    n = len(a.satisfied)
    if len(b.satisfied) != n or a.features.shape != b.features.shape:
        raise ValueError(f"paired_bootstrap needs the same captions: {n} vs {len(b.satisfied)} images")
    if reference is not None and reference_features is not None:
        raise ValueError("give reference statistics or paired reference_features, not both")
    if reference_features is not None and reference_features.shape != a.features.shape:
        raise ValueError("reference_features must come from the same captions as a and b")
    fa, fb = a.features.double(), b.features.double()
    fr = None if reference_features is None else reference_features.double()

    def fd(f: torch.Tensor, idx: torch.Tensor | None = None) -> float:
        ref = reference if fr is None else _stats(fr if idx is None else fr[idx])
        return fd_of_features(f, ref)

    rng = np.random.default_rng(seed)
    d_fd, d_adh = [], []
    for _ in range(resamples):
        idx = torch.from_numpy(rng.integers(0, n, n))
        d_fd.append(fd(fa[idx], idx) - fd(fb[idx], idx))
        d_adh.append(100 * (a.satisfied[idx].mean() - b.satisfied[idx].mean()))
    return {"fd": fd(fa) - fd(fb), "fd_ci95": np.percentile(d_fd, [2.5, 97.5]).tolist(),
            "adherence_points": 100 * (a.satisfied.mean() - b.satisfied.mean()),
            "adherence_points_ci95": np.percentile(d_adh, [2.5, 97.5]).tolist(), "resamples": resamples}


def rounded_difference(diff: dict) -> dict:
    """A :func:`paired_bootstrap` result as a benchmark JSON records it: FD-shapes to 3 decimals, adherence
    points to 2, each with its 95% interval."""
    return {"fd": round(diff["fd"], 3), "fd_ci95": [round(v, 3) for v in diff["fd_ci95"]],
            "adherence_points": round(diff["adherence_points"], 2),
            "adherence_points_ci95": [round(v, 2) for v in diff["adherence_points_ci95"]]}


CHECK_FILE = "check_metrics.json"


def card_check(pipe, steps: int, samples: int = 100, noise_seed: int = 1) -> dict:
    """The small, repeatable evaluation a shipped model records in its folder (``check_metrics.json``) and
    ``tests/test_shipped_models.py`` re-runs: the first ``samples`` held-out captions on noise seed
    ``noise_seed`` (1: noise seed 0 starts from the ARD student's training noise), ``steps`` steps at the model's
    default guidance; adherence and FD-shapes (FD at this n is biased upwards: compare it only with itself)."""
    scenes = eval_scenes(samples)
    images, _ = generate_images(pipe, [s.caption for s in scenes], steps, None, seed=noise_seed)
    q = score_images(scenes, images)
    return {"samples": samples, "steps": steps, "noise_seed": noise_seed, "adherence": q["adherence"],
            "fd_shapes": q["fd_shapes"]}


def evaluate_shapes(pipe, samples: int = 1000, steps: int = 30, guidance_scale: float | None = None,
                    seed: int = 0, batch_size: int = 50, real_vs_real: bool = True) -> dict:
    """Sample the held-out captions and score them (see ``score_images``)."""
    scenes = eval_scenes(samples)
    images, wall = generate_images(pipe, [s.caption for s in scenes], steps, guidance_scale, seed, batch_size)
    out = score_images(scenes, images)
    gs = pipe.default_guidance_scale if guidance_scale is None else guidance_scale
    out.update({"steps": steps, "guidance_scale": gs, "seed": seed, "wall_s": wall,
                "nfe": steps * (2 if gs > 1 else 1)})
    if real_vs_real:
        out["fd_real_vs_real"] = real_vs_real_fd(samples)
    return out
