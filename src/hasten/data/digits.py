"""The digits data: scikit-learn's bundled UCI optical digits (1797 images, 8x8, 10 classes), no download.

Images are upsampled to 16x16 (bilinear, align_corners=False) and scaled to [-1, 1]. The split is fixed
and stratified: ``train_test_split(test_size=0.2, stratify=labels, random_state=0)`` gives 1437 train
and 360 held-out images; every model and metric in hasten uses this one split.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2
IMAGE_SIZE = 16
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    return tuple(train_test_split(d.images, d.target, test_size=HELD_OUT_FRACTION,
                                  stratify=d.target, random_state=SPLIT_SEED))  # type: ignore[return-value]


def digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 16, 16) in [-1, 1], labels (N,)) for ``split`` in {"train", "held-out"}."""
    x_train, x_test, y_train, y_test = _split()
    if split == "train":
        x, y = x_train, y_train
    elif split in ("held-out", "test"):
        x, y = x_test, y_test
    else:
        raise ValueError(f"unknown split {split!r}")
    img = torch.tensor(x, dtype=torch.float32).unsqueeze(1) / 16.0
    img = F.interpolate(img, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return img * 2 - 1, torch.tensor(y, dtype=torch.long)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space to [0, 1] image space."""
    return ((images + 1) / 2).clamp(0, 1)
