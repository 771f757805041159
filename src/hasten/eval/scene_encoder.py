"""A small CNN scene encoder for FD-shapes (the Fréchet distance of ``shapes`` images).

Trained here on rendered scenes to predict what a scene holds: the count of each (colour, shape)
(18 regression outputs) and, per colour, which cells of a 4x4 grid hold an object centre (96 binary
outputs). Its 128-d penultimate features are the space in which FD-shapes compares generated images
with held-out rendered scenes, FID-style: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.shapes import COLOURS, HELD_OUT_SEED0, IMAGE_SIZE, SHAPES, scenes, to_model_space
from ..errors import HastenError
from ..io import atomic_write, write_json

ENCODER_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes_encoder"
FEATURES = 128
GRID = 4
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
FD_REFERENCE_SEED0 = HELD_OUT_SEED0 + 500_000  # the held-out rendered scenes FD-shapes compares with


class SceneEncoder(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1), nn.SiLU(),  # 32
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.SiLU(),  # 16
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.SiLU(),  # 8
            nn.Conv2d(4 * w, 4 * w, 3, 2, 1), nn.SiLU(),  # 4
            nn.Flatten(), nn.Linear(4 * w * 16, FEATURES), nn.SiLU())
        self.counts = nn.Linear(FEATURES, len(COLOURS) * len(SHAPES))
        self.cells = nn.Linear(FEATURES, len(COLOURS) * GRID * GRID)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) in [-1, 1] -> (B, 128)."""
        return self.net(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.counts(f), self.cells(f)


def targets(scenes: list) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.zeros(len(scenes), len(COLOURS) * len(SHAPES))
    cells = torch.zeros(len(scenes), len(COLOURS), GRID, GRID)
    for i, sc in enumerate(scenes):
        for o in sc.objects:
            c = _COLOUR_INDEX[o.colour]
            counts[i, c * len(SHAPES) + _SHAPE_INDEX[o.shape]] += 1
            gx = min(GRID - 1, int(o.cx * GRID / IMAGE_SIZE))
            gy = min(GRID - 1, int(o.cy * GRID / IMAGE_SIZE))
            cells[i, c, gy, gx] = 1
    return counts, cells.flatten(1)


def train_encoder(out: str | Path | None = None, steps: int = 2000, batch_size: int = 64, seed: int = 0,
                  progress: bool = True) -> dict:
    """Train on fresh rendered scenes each step (seeds 30M + step * batch + i); save ``encoder.safetensors``."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = SceneEncoder()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    t0, curve, losses = time.time(), [], []
    for step in tqdm(range(steps), disable=not progress, desc="scene encoder", dynamic_ncols=True):
        sc, imgs = scenes(range(30_000_000 + step * batch_size, 30_000_000 + (step + 1) * batch_size))
        x = torch.from_numpy(to_model_space(imgs))
        counts, cells = targets(sc)
        pc, pl = model(x)
        loss = F.mse_loss(pc, counts) + F.binary_cross_entropy_with_logits(pl, cells)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            curve.append({"step": step + 1, "loss": float(np.mean(losses))})
            losses = []
    model.eval()
    info = {"steps": steps, "batch_size": batch_size, "seed": seed, "loss_curve": curve,
            "train_seconds": round(time.time() - t0, 1), "held_out": held_out_check(model)}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(out / "encoder.safetensors", lambda tmp: save_file(state, tmp))
        write_json(out / "train_log.json", info)
    info["model"] = model
    return info


@torch.no_grad()
def held_out_check(model: SceneEncoder, n: int = 1000) -> dict:
    """Exact-count accuracy (rounded count outputs all right) on held-out scenes."""
    sc, imgs = scenes(range(HELD_OUT_SEED0 + 800_000, HELD_OUT_SEED0 + 800_000 + n))
    x = torch.from_numpy(to_model_space(imgs))
    counts, _ = targets(sc)
    pc = torch.cat([model(x[i:i + 250])[0] for i in range(0, n, 250)])
    return {"count_exact_accuracy": float((pc.round() == counts).all(1).float().mean()), "n": n}


@lru_cache(maxsize=1)
def load_encoder(folder: str | None = None) -> SceneEncoder:
    from safetensors.torch import load_file

    path = Path(folder or ENCODER_DIR) / "encoder.safetensors"
    if not path.is_file():
        raise HastenError(f"the FD-shapes scene encoder is missing ({path}); train it with "
                          "`hasten train --what shapes-encoder --out DIR`")
    model = SceneEncoder()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def encoder_features(images01: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(B, 3, 64, 64) images in [0, 1] -> (B, 128) features."""
    model = load_encoder()
    x = images01.float() * 2 - 1
    return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def rendered(seed0: int, n: int) -> torch.Tensor:
    """n held-out rendered scenes from seed0 as (n, 3, 64, 64) in [0, 1]."""
    _, imgs = scenes(range(seed0, seed0 + n))
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
