"""Train the default digits model from scratch with the Movie Gen flow-matching recipe.

Per step (Polyak et al. 2024, Sec. 3.1): data X_1, noise X_0 ~ N(0, I), t = sigmoid(n) with
n ~ N(0, 1) (logit-normal), X_t = t X_1 + (1 - (1 - sigma_min) t) X_0, and the loss is
|| u(X_t, t, y) - (X_1 - (1 - sigma_min) X_0) ||^2. Labels are replaced by the null class with
probability 0.1 (label dropout, for classifier-free guidance). The weights kept are an EMA.

Label dropout is done here, once per sample, and the model is run in eval mode: diffusers'
``LabelEmbedding`` would otherwise drop labels independently inside every DiT block.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from tqdm.auto import tqdm

from .data.digits import IMAGE_SIZE, NUM_CLASSES, digits
from .io import write_json
from .pipeline import SIGMA_MIN, TIME_SCALE, HastenPipeline


def bf16_native() -> bool:
    """Whether the CPU has native bfloat16 matmuls (AVX512-BF16 or AMX): only there does bf16 autocast pay
    off; elsewhere it is emulated and ~20x slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_bf16(setting: bool | None) -> bool:
    """A config's ``bf16_autocast``: True or False as set, None (the default) for :func:`bf16_native`."""
    return bf16_native() if setting is None else bool(setting)


def digits_transformer_config(**overrides) -> dict:
    """The default model: a DiT with 6 blocks, width 128 (4 heads x 32), patch 2 on 16x16x1."""
    cfg = dict(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1,
               num_layers=6, sample_size=IMAGE_SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
               norm_num_groups=32)
    cfg.update(overrides)
    return cfg


@dataclass
class TrainConfig:
    steps: int = 6000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    seed: int = 0
    guidance_scale: float = 3.0
    log_every: int = 50


def flow_matching_loss(model: DiTTransformer2DModel, x1: torch.Tensor, y: torch.Tensor,
                       null_class: int, label_dropout: float, generator: torch.Generator) -> torch.Tensor:
    """One Movie Gen flow-matching loss evaluation on a batch of data ``x1`` with labels ``y``."""
    b = x1.shape[0]
    x0 = torch.randn(x1.shape, generator=generator)
    t = torch.sigmoid(torch.randn(b, generator=generator))
    drop = torch.rand(b, generator=generator) < label_dropout
    y = torch.where(drop, torch.full_like(y, null_class), y)
    tt = t.view(-1, 1, 1, 1)
    xt = tt * x1 + (1 - (1 - SIGMA_MIN) * tt) * x0
    target = x1 - (1 - SIGMA_MIN) * x0
    pred = model(xt, timestep=t * TIME_SCALE, class_labels=y).sample
    return (pred - target).pow(2).mean()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """EMA of the weights with warm-up: decay min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)


def train(out: str | Path | None, cfg: TrainConfig, model_config: dict | None = None,
          progress: bool = True, data: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Train, save the EMA model with ``save_pretrained`` under ``out`` (if given); return the log."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = digits("train") if data is None else data
    model = DiTTransformer2DModel(**(model_config or digits_transformer_config()))
    model.eval()  # no dropout layers; keeps diffusers' per-block label dropout off (see module doc)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    null = model.config.num_embeds_ada_norm
    losses, curve, t0 = [], [], time.time()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="train", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, x_all.shape[0], (cfg.batch_size,), generator=gen)
        loss = flow_matching_loss(model, x_all[idx], y_all[idx], null, cfg.label_dropout, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, step, cfg.ema_decay)
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
            curve.append({"step": step + 1, "loss": mean, "elapsed_s": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{mean:.4f}")
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss diverged at step {step}")
    log = {"train_config": asdict(cfg), "model_config": dict(model.config),
           "num_parameters": sum(p.numel() for p in model.parameters()),
           "loss_curve": curve, "train_seconds": round(time.time() - t0, 1),
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    if out is not None:
        out = Path(out)
        pipe = HastenPipeline(ema, num_classes=null, guidance_scale=cfg.guidance_scale, name="digits")
        pipe.save_pretrained(out)
        write_json(out / "train_log.json", log)
    log["model"] = ema
    return log
