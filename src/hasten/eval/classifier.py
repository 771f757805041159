"""The evaluator's digit classifier: a small CNN on 16x16 images, trained on the train split only.

Its 64-d penultimate activations are the feature space of FD-digits (the digits analogue of FID's
Inception pool features). Weights ship in ``hasten/models/digits_classifier``.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.digits import digits
from ..errors import HastenError
from ..io import atomic_write

CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "models" / "digits_classifier"
WEIGHTS = "classifier.safetensors"


class DigitClassifier(nn.Module):
    """conv32-conv64-pool-conv64-pool-fc64-fc10 on (B, 1, 16, 16) images in [0, 1]."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(images))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel (zero padding = background) for robustness to small misplacement."""
    padded = F.pad(x, (1, 1, 1, 1))
    out = torch.empty_like(x)
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=gen)
    for k, (dy, dx) in enumerate(offsets.tolist()):
        out[k] = padded[k, :, dy:dy + 16, dx:dx + 16]
    return out


def train_classifier(out: str | Path | None = None, steps: int = 1500, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, progress: bool = True) -> dict:
    """Train on the train split (images in [0, 1]); report held-out accuracy; save if ``out`` is given."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = digits("train")
    x = (x + 1) / 2
    xt, yt = digits("held-out")
    xt = (xt + 1) / 2
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0, curve = time.time(), []
    for step in tqdm(range(steps), disable=not progress, desc="classifier"):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            curve.append({"step": step + 1, "loss": round(loss.item(), 5)})
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
        train_acc = (model(x).argmax(1) == y).float().mean().item()
    info = {"held_out_accuracy": acc, "train_accuracy": train_acc, "steps": steps, "batch_size": batch_size,
            "lr": lr, "seed": seed, "loss_curve": curve, "train_seconds": round(time.time() - t0, 1)}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(out / WEIGHTS, lambda tmp: save_file(state, tmp))
        atomic_write(out / "train_log.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    info["model"] = model
    return info


@lru_cache(maxsize=1)
def load_classifier(folder: str | None = None) -> DigitClassifier:
    """The shipped evaluator classifier (eval mode, no gradients)."""
    path = Path(folder or CLASSIFIER_DIR) / WEIGHTS
    if not path.is_file():
        raise HastenError(f"evaluator weights missing at {path}; train them with `hasten train --what classifier`")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
