"""Evaluator sanity: the classifier knows real digits; metrics behave as metrics."""

import pytest
import torch

from hasten.data import digits
from hasten.errors import HastenError
from hasten.eval import class_accuracy, frechet_distance, psnr, ssim
from hasten.eval.metrics import fd_to_held_out, psnr_per_image, real_subset_fd, real_vs_real_fd


def test_classifier_scores_real_held_out_images():
    x, y = digits("held-out")
    assert class_accuracy((x + 1) / 2, y) >= 0.95


def test_frechet_distance_properties():
    x, _ = digits("train")
    x = (x + 1) / 2
    assert abs(frechet_distance(x, x)) < 1e-3
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    ref = real_vs_real_fd()
    assert ref > 0
    assert fd_to_held_out(noisy) > 2 * ref  # corrupted images are much further than real vs real


def test_the_same_n_reference_carries_fd_s_small_sample_bias():
    """FD falls with the number of images: a real subset of n images is the reference for n generated ones,
    and at the whole train split it is the usual real-vs-real FD."""
    n_train = digits("train")[0].shape[0]
    assert real_subset_fd(200) > real_subset_fd(1000) > real_vs_real_fd()
    assert real_subset_fd(n_train) == pytest.approx(real_vs_real_fd(), rel=1e-6)
    with pytest.raises(HastenError, match="real subset"):
        real_subset_fd(1)


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(8, 1, 16, 16, generator=g)
    assert psnr(a, a) == 100.0
    assert abs(ssim(a, a) - 1.0) < 1e-9
    b = (a + 0.01 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    c = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert 35 < psnr(a, b) < 45 and psnr(a, c) < psnr(a, b)
    assert ssim(a, c) < ssim(a, b) < 1.0
    per = psnr_per_image(a, torch.cat([b[:4], c[4:]]))  # one value per pair, psnr is their mean
    assert per.shape == (8,) and (per[:4] > per[4:].max()).all()
    assert psnr(a, b) == pytest.approx(psnr_per_image(a, b).mean().item(), abs=1e-12)
