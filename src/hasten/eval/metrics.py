"""Quality metrics on (B, 1, 16, 16) images in [0, 1].

- ``class_accuracy``: share of images the evaluator classifier assigns to the requested class.
- ``frechet_distance`` (FD-digits): the Fréchet distance between Gaussians fitted to the classifier's
  64-d penultimate features of two sets, ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)),
  i.e. FID with the digit classifier in place of Inception.
- ``psnr`` / ``ssim``: per-image fidelity of an accelerated run to the full run from the same seeds,
  averaged over images (the caching papers' protocol). PSNR caps at 100 dB for identical images.
  SSIM uses a 7x7 Gaussian window (sigma 1.5) over valid positions, data range 1, K1=0.01, K2=0.03
  (Wang et al. 2004 with a window sized for 16x16 images).
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..data.digits import NUM_CLASSES, digits
from ..errors import HastenError
from .classifier import load_classifier


@torch.no_grad()
def classifier_features(images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model = load_classifier()
    return torch.cat([model.features(images[i:i + batch_size].float())
                      for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels: torch.Tensor | list[int]) -> float:
    """Share of ``images`` that the evaluator classifies as ``labels``."""
    model = load_classifier()
    labels = torch.as_tensor(labels)
    preds = torch.cat([model(images[i:i + 500].float()).argmax(1) for i in range(0, images.shape[0], 500)])
    return (preds == labels).float().mean().item()


def _gaussian_fd(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^(1/2) S2 S1^(1/2) (same spectrum), which stays stable when features have zero variance.
    """
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    if feats.shape[0] < 2:
        raise HastenError(f"a Frechet distance needs at least 2 images per set, got {feats.shape[0]}")
    if not torch.isfinite(feats).all():
        raise HastenError("the images hold NaN or infinite values: they cannot be scored")
    f = feats.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """FD-digits between two image sets (any sizes >= 2)."""
    return _gaussian_fd(*_stats(classifier_features(images_a)), *_stats(classifier_features(images_b)))


@lru_cache(maxsize=1)
def _held_out_stats() -> tuple[np.ndarray, np.ndarray]:
    x, _ = digits("held-out")
    return _stats(classifier_features((x + 1) / 2))


def fd_to_held_out(images: torch.Tensor) -> float:
    """FD-digits of generated images against the real held-out split (the quality figure)."""
    return _gaussian_fd(*_stats(classifier_features(images)), *_held_out_stats())


@lru_cache(maxsize=1)
def real_vs_real_fd() -> float:
    """The reference: FD-digits of the real train split against the real held-out split."""
    x, _ = digits("train")
    return fd_to_held_out((x + 1) / 2)


@lru_cache(maxsize=8)
def real_subset_fd(n: int) -> float:
    """FD-digits of ``n`` real train images (a fixed random subset, seed 0) against the held-out split: the
    reference for ``n`` generated images, since FD is biased upwards at small ``n`` (about 95 at 200 images
    against 25 for the whole train split)."""
    x, _ = digits("train")
    if not 2 <= n <= x.shape[0]:
        raise HastenError(f"a real subset needs 2 to {x.shape[0]} images, got {n}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    return fd_to_held_out((x[perm[:n]] + 1) / 2)


def psnr_per_image(images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB (data range 1) of each image pair, (N,) float64, capped at 100 dB for identical images."""
    mse = (images_a.double() - images_b.double()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def psnr(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Mean per-image PSNR in dB (data range 1), capped at 100 dB for identical images."""
    return psnr_per_image(images_a, images_b).mean().item()


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004) over images and channels, 7x7 Gaussian window, data range 1."""
    a, b = images_a.double(), images_b.double()
    c = a.shape[1]
    w = _gaussian_window().repeat(c, 1, 1, 1)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    s_aa = F.conv2d(a * a, w, groups=c) - mu_a**2
    s_bb = F.conv2d(b * b, w, groups=c) - mu_b**2
    s_ab = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return s.mean().item()


def eval_labels(samples: int) -> torch.Tensor:
    """``samples`` labels spread evenly over the classes: 0..9, 0..9, ... (100 per class for 1000)."""
    return torch.arange(samples) % NUM_CLASSES


@torch.no_grad()
def sample_eval_set(pipe, samples: int = 1000, steps: int = 50, guidance_scale: float | None = None,
                    seed: int = 0, schedule: str = "linear", solver: str = "euler",
                    batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sample the evaluation set in fixed batches; batch k uses seed ``seed + k``, so any two runs with
    the same arguments (accelerated or not) start from the same noise and can be compared per image."""
    labels = eval_labels(samples)
    images, calls, rows, t0 = [], 0, 0.0, time.perf_counter()
    for k, start in enumerate(range(0, samples, batch_size)):
        lab = labels[start:start + batch_size]
        gen = torch.Generator().manual_seed(seed + k)
        out = pipe(lab, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen,
                   schedule=schedule, solver=solver)
        images.append(out.images)
        calls += out.transformer_calls
        rows += out.nfe * len(lab)
    wall = time.perf_counter() - t0
    return torch.cat(images), labels, {"wall_s": wall, "nfe": rows / samples, "transformer_calls": calls}


def evaluate_pipeline(pipe, samples: int = 1000, steps: int = 50, guidance_scale: float | None = None,
                      seed: int = 0, schedule: str = "linear", solver: str = "euler",
                      batch_size: int = 100) -> dict:
    """Sample and score: class accuracy, FD-digits against held-out, and two real-vs-real references: the whole
    train split (``fd_ratio``, the model card's bar, meaningful near 1000 samples) and ``samples`` real train
    images (``fd_ratio_same_n``: FD's small-sample bias cancels; None above the train split's size)."""
    images, labels, info = sample_eval_set(pipe, samples, steps, guidance_scale, seed, schedule, solver,
                                           batch_size)
    fd = fd_to_held_out(images)
    ref = real_vs_real_fd()
    n_train = digits("train")[0].shape[0]
    same_n = real_subset_fd(samples) if samples <= n_train else None
    return {"samples": samples, "steps": steps,
            "guidance_scale": pipe.default_guidance_scale if guidance_scale is None else guidance_scale,
            "schedule": schedule, "solver": solver, "seed": seed,
            "class_accuracy": class_accuracy(images, labels), "fd_digits": fd, "fd_real_vs_real": ref,
            "fd_ratio": fd / ref, "fd_real_subset_same_n": same_n,
            "fd_ratio_same_n": fd / same_n if same_n else None, "wall_s": info["wall_s"], "nfe": info["nfe"]}
