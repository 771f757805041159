"""Train the ``shapes`` text-to-image model: a diffusers ``AutoencoderKL`` on the scenes, then an
``SD3Transformer2DModel`` on its latents with the Movie Gen flow-matching recipe.

Both stages are resumable: a checkpoint (weights, EMA, optimiser, scheduler, loss log) is written
atomically every ``checkpoint_every`` steps under ``OUT/checkpoints``, and re-running the same command
continues from it. Every step draws its data and noise from a generator seeded by (seed, step) and
its scenes from seeds (step * batch + i), so a resumed run takes exactly the steps an uninterrupted
run would: the result is the same (tested).

Flow matching in diffusers' convention (so that stock flow-matching schedulers apply): with data
x and noise e, x_sigma = (1 - sigma) x + sigma e and the model predicts v = e - x. This is Movie
Gen's interpolation (Polyak et al. 2024, Sec. 3.1) with t = 1 - sigma, sigma_min = 0 and the
velocity negated (Movie Gen's v = X_1 - X_0 = x - e). The training t (hence sigma) is logit-normal,
sigmoid(N(0, 1)), as in Movie Gen; the transformer sees ``timestep = 1000 sigma`` as in SD3.
Captions are dropped (replaced by the empty caption's embedding) with probability 0.1 for
classifier-free guidance; the kept weights are an EMA; AdamW with linear warm-up and cosine decay.
The transformer's forward runs under CPU bf16 autocast (``bf16_autocast``; parameters, optimiser
state, EMA and the loss stay fp32); sampling runs in fp32.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.shapes import HELD_OUT_SEED0, TRAIN_SEED_RANGE, render, sample_scene, scenes, to_model_space
from .errors import HastenError
from .io import write_json


# --------------------------------------------------------------------------- configs
def vae_config(**overrides) -> dict:
    """64x64x3 -> 16x16x4: three encoder levels (16, 32, 64 channels), two downsamplings."""
    cfg = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 64], layers_per_block=1,
               latent_channels=4, norm_num_groups=8, sample_size=64, mid_block_add_attention=False)
    cfg.update(overrides)
    return cfg


def transformer_config(**overrides) -> dict:
    """MMDiT (SD3 family): 16x16x4 latents, patch 2 (64 image tokens), MiniLM text (384-d)."""
    cfg = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=32,
               num_attention_heads=6, joint_attention_dim=384, caption_projection_dim=192,
               pooled_projection_dim=384, pos_embed_max_size=8, qk_norm="rms_norm")
    cfg.update(overrides)
    return cfg


@dataclass
class VAETrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-6
    l1_weight: float = 0.5
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 50


@dataclass
class TransformerTrainConfig:
    steps: int = 5000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 300
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 50
    bf16_autocast: bool | None = None  # CPU bf16 matmuls; None: where native (~1.3x faster); weights, EMA, loss fp32
    model: dict = field(default_factory=transformer_config)


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written checkpoint."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: Any = None) -> dict | None:
    """The checkpoint at ``path``, or None when there is none. With ``cfg`` (the run's config dataclass),
    a checkpoint written with other settings is refused: resuming it would silently mix two recipes (a
    later ``--lr`` or ``--distil-guidance`` applied to a half-trained run). A setting the checkpoint does
    not record (written before the option existed) must be at its default, which is what that run used."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a checkpoint from another version or a damaged file
        raise HastenError(f"cannot resume from {path}: {e}; delete it to start over") from None
    if cfg is not None:
        saved, now = state.get("config") or {}, asdict(cfg)
        defaults = {f.name: f.default_factory() if f.default is MISSING and f.default_factory is not MISSING
                    else f.default for f in fields(cfg)}
        for key, value in now.items():
            old = saved.get(key, defaults[key])
            if old != value:
                raise HastenError(f"{path.parent.parent} holds a run with other settings ({key}: {old!r} there, "
                                  f"{value!r} now); use another --out, or delete {path} to start over")
    return state


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def scene_batch(step: int, batch: int, seed: int) -> tuple[list, np.ndarray]:
    """Training scenes for one step: seeds (seed % 5) * 10^7 + step * batch + i (the seed ranges of
    :mod:`hasten.data.shapes`; never the held-out ones)."""
    if step * batch + batch > TRAIN_SEED_RANGE:
        raise HastenError(f"too many training scenes for the seed's range of {TRAIN_SEED_RANGE:,}")
    base = training_seed0(seed) + step * batch
    return scenes(range(base, base + batch))


def training_seed0(seed: int) -> int:
    """The first scene seed of training seed ``seed``'s range (the ranges of :mod:`hasten.data.shapes`)."""
    return (seed % 5) * TRAIN_SEED_RANGE


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched: Any, params: Any, what: str,
                   step: int) -> float:
    """Backward, clip the gradient norm to 1, step optimiser and schedule; the loss as a float (a
    non-finite loss is an error naming ``what`` and the step)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    value = loss.item()
    if not math.isfinite(value):
        raise HastenError(f"{what} loss diverged at step {step}")
    return value


class LossLog:
    """Mean loss over every ``every`` steps (and the last), with the wall time since ``t0``."""

    def __init__(self, curve: list, every: int, total: int, t0: float, bar: Any):
        self.curve, self.every, self.total, self.t0, self.bar = curve, every, total, t0, bar
        self.losses: list[float] = []

    def add(self, step: int, value: float) -> None:
        self.losses.append(value)
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            self.curve.append({"step": step + 1, "loss": float(np.mean(self.losses)),
                               "elapsed_s": round(time.time() - self.t0, 1)})
            self.bar.set_postfix(loss=f"{self.curve[-1]['loss']:.4f}")
            self.losses = []


# --------------------------------------------------------------------------- VAE
def train_vae(out: str | Path, cfg: VAETrainConfig, model_config: dict | None = None,
              progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) the VAE into ``out/vae``; return its log. ``stop_after`` interrupts (tests)."""
    from diffusers import AutoencoderKL

    out = Path(out)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / "vae.pt"
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**(model_config or vae_config()))
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.steps, cfg.warmup))
    start, curve, elapsed = 0, [], 0.0
    state = load_checkpoint(ckpt_path, cfg)
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, curve, elapsed = state["step"], state["curve"], state["elapsed_s"]
    t0 = time.time() - elapsed
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress, desc="vae",
               dynamic_ncols=True)
    loss_log = LossLog(curve, cfg.log_every, cfg.steps, t0, bar)
    for step in bar:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        _, imgs = scene_batch(step, cfg.batch_size, cfg.seed)
        x = torch.from_numpy(to_model_space(imgs))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = (rec - x).pow(2).mean() + cfg.l1_weight * (rec - x).abs().mean() + cfg.kl_weight * post.kl().mean()
        loss_log.add(step, optimizer_step(loss, opt, sched, vae.parameters(), "VAE", step))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            save_checkpoint(ckpt_path, {"model": vae.state_dict(), "opt": opt.state_dict(),
                                        "sched": sched.state_dict(), "step": step + 1, "curve": curve,
                                        "elapsed_s": time.time() - t0, "config": asdict(cfg)})
    log = {"train_config": asdict(cfg), "model_config": dict(vae.config), "loss_curve": curve,
           "num_parameters": sum(p.numel() for p in vae.parameters()), "train_seconds": round(time.time() - t0, 1),
           "finished": end == cfg.steps}
    if end == cfg.steps:
        vae.eval()
        stats = latent_stats(vae)
        vae.register_to_config(scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"])
        log["latent_stats"] = stats
        log["reconstruction"] = reconstruction_metrics(vae)
        vae.save_pretrained(out / "vae")
        write_json(out / "vae" / "train_log.json", log)
    log["model"] = vae
    return log


@torch.no_grad()
def latent_stats(vae, n: int = 2048, batch: int = 256) -> dict:
    """shift = mean and scaling = 1 / std of the posterior means over ``n`` training scenes (SD3's
    convention: z = (latent - shift) * scaling)."""
    zs = []
    for k in range(0, n, batch):
        _, imgs = scene_batch(k // batch, batch, seed=4)
        zs.append(vae.encode(torch.from_numpy(to_model_space(imgs))).latent_dist.mean)
    z = torch.cat(zs)
    return {"shift_factor": float(z.mean()), "scaling_factor": float(1.0 / z.std()), "n": n}


@torch.no_grad()
def reconstruction_metrics(vae, n: int = 500) -> dict:
    """PSNR (dB, images in [0, 1]) of decode(encode mean) on ``n`` held-out scenes."""
    seeds = range(HELD_OUT_SEED0 + 900_000, HELD_OUT_SEED0 + 900_000 + n)
    _, imgs = scenes(seeds)
    x = torch.from_numpy(to_model_space(imgs))
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 100]).latent_dist.mean).sample for i in range(0, n, 100)])
    mse = ((rec.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-12))
    return {"psnr_db_mean": float(psnr.mean()), "psnr_db_min": float(psnr.min()), "n": n}


# --------------------------------------------------------------------------- latent data set
SHARD = 10_000


def prepare_data(out: str | Path, vae, num_scenes: int, seed: int = 0, progress: bool = True,
                 text_encoder=None, tokenizer=None) -> Path:
    """Render ``num_scenes`` training scenes and store, per shard of 10k, the VAE latents (posterior
    means, scaled as the transformer sees them, fp16), the captions, and the MiniLM embeddings of the
    shard's unique captions (fp16). Shards are written atomically; re-running skips finished ones."""
    from safetensors.torch import save_file

    from .pipelines.shapes import encode_text, load_text_encoder

    data = Path(out) / "data"
    data.mkdir(parents=True, exist_ok=True)
    if text_encoder is None:
        text_encoder, tokenizer = load_text_encoder()
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    if num_scenes > TRAIN_SEED_RANGE:
        raise HastenError(f"at most {TRAIN_SEED_RANGE:,} training scenes per seed (the seed's range), got {num_scenes}")
    from .plans import weights_hash

    n_shards = math.ceil(num_scenes / SHARD)
    vae_hash = weights_hash(vae)
    for k in tqdm(range(n_shards), disable=not progress, desc="data", dynamic_ncols=True):
        path = data / f"shard_{k:04d}.safetensors"
        lo, hi = k * SHARD, min(num_scenes, (k + 1) * SHARD)
        want = {"first_scene": str(lo), "n": str(hi - lo), "seed": str(seed), "vae": vae_hash}
        if path.is_file():
            _check_shard(path, want)
            continue
        scenes = [sample_scene(training_seed0(seed) + i) for i in range(lo, hi)]
        lat = []
        with torch.no_grad():
            for j in range(0, len(scenes), 250):
                imgs = np.stack([render(s) for s in scenes[j:j + 250]])
                z = vae.encode(torch.from_numpy(to_model_space(imgs))).latent_dist.mean
                lat.append(((z - shift) * sf).half())
        captions = [s.caption for s in scenes]
        uniq = sorted(set(captions))
        where = {c: i for i, c in enumerate(uniq)}
        toks, pooled = [], []
        for j in range(0, len(uniq), 256):
            t, p = encode_text(text_encoder, tokenizer, uniq[j:j + 256], warn=False)
            toks.append(t.half())
            pooled.append(p.half())
        tensors = {"latents": torch.cat(lat).contiguous(), "caption_index": torch.tensor([where[c] for c in captions]),
                   "text": torch.cat(toks), "pooled": torch.cat(pooled)}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={**want, "captions": json.dumps(uniq)})
        os.replace(tmp, path)
    write_json(data / "manifest.json", {"num_scenes": num_scenes, "seed": seed, "vae": vae_hash, "shards": n_shards})
    return data


def _check_shard(path: Path, want: dict) -> None:
    """A finished shard is reused only if it holds the scenes, seed and VAE this run asks for (shards written
    before these were recorded are checked on their first scene only)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as h:
        meta = h.metadata() or {}
    wrong = [k for k, v in want.items() if k in meta and meta[k] != v]
    if wrong or meta.get("first_scene") != want["first_scene"]:
        raise HastenError(f"{path} was written for other settings ({', '.join(wrong) or 'first_scene'}): "
                          f"delete {path.parent} to render the data again")


def load_data(data: Path) -> dict:
    """All shards in memory: latents (N, 4, 16, 16), text (U, L, 384), pooled (U, 384), index (N,)."""
    from safetensors.torch import load_file

    lat, idx, text, pooled, offset = [], [], [], [], 0
    manifest = Path(data) / "manifest.json"
    paths = (sorted(Path(data).glob("shard_*.safetensors")) if not manifest.is_file() else  # older data folders
             [Path(data) / f"shard_{k:04d}.safetensors" for k in range(json.loads(manifest.read_text())["shards"])])
    for path in paths:
        t = load_file(str(path))
        lat.append(t["latents"])
        idx.append(t["caption_index"] + offset)
        text.append(t["text"])
        pooled.append(t["pooled"])
        offset += t["text"].shape[0]
    if not lat:
        raise HastenError(f"no data shards in {data}")
    return {"latents": torch.cat(lat), "index": torch.cat(idx), "text": torch.cat(text), "pooled": torch.cat(pooled)}


# --------------------------------------------------------------------------- transformer
def flow_matching_loss(model, z: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                       gen: torch.Generator) -> torch.Tensor:
    """Movie Gen flow matching in diffusers' convention (module docstring): logit-normal sigma,
    x_sigma = (1 - sigma) z + sigma e, target e - z."""
    e = torch.randn(z.shape, generator=gen)
    sigma = torch.sigmoid(torch.randn(z.shape[0], generator=gen))
    s = sigma.view(-1, 1, 1, 1)
    x = (1 - s) * z + s * e
    pred = model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=text, pooled_projections=pooled,
                 return_dict=False)[0]
    return (pred - (e - z)).pow(2).mean()


def latent_batch(data: dict, batch_size: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random rows of ``data`` (:func:`load_data`) as float (latents, token embeddings, pooled embedding)."""
    rows = torch.randint(0, data["latents"].shape[0], (batch_size,), generator=gen)
    cap = data["index"][rows]
    return data["latents"][rows].float(), data["text"][cap].float(), data["pooled"][cap].float()


def caption_batch(data: dict, batch_size: int, caption_dropout: float, empty: tuple, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random batch of (latents, token embeddings, pooled embedding) from ``data`` (:func:`latent_batch`),
    each caption replaced by the empty one (``empty``) with probability ``caption_dropout``."""
    z, text, pooled = latent_batch(data, batch_size, gen)
    drop = torch.rand(batch_size, generator=gen) < caption_dropout
    text = torch.where(drop.view(-1, 1, 1), empty[0].expand_as(text), text)
    pooled = torch.where(drop.view(-1, 1), empty[1].expand_as(pooled), pooled)
    return z, text, pooled


def train_transformer(out: str | Path, cfg: TransformerTrainConfig, data: dict, empty_text: tuple,
                      progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) the transformer on the latent data set; returns the log and the EMA model.

    ``empty_text`` is the empty caption's (tokens (1, L, 384), pooled (1, 384)), the caption-dropout
    replacement and the unconditional branch at sampling time.
    """
    from .pipelines.shapes import ShapesTransformer2DModel
    from .train import autocast_bf16, ema_update

    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoints" / "transformer.pt"
    torch.manual_seed(cfg.seed)
    model = ShapesTransformer2DModel(**cfg.model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.steps, cfg.warmup))
    start, curve, elapsed = 0, [], 0.0
    state = load_checkpoint(ckpt_path, cfg)
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, curve, elapsed = state["step"], state["curve"], state["elapsed_s"]
    e_tok, e_pool = (t.float() for t in empty_text)
    t0 = time.time() - elapsed
    # process CPU seconds (all threads), the budget's measure: wall time also counts any pause or
    # contention; checkpoints written before this was recorded start it at 0
    c0 = time.process_time() - (state or {}).get("cpu_s", 0.0)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress, desc="transformer",
               dynamic_ncols=True)
    loss_log = LossLog(curve, cfg.log_every, cfg.steps, t0, bar)
    loss_log.losses = list((state or {}).get("pending", []))  # losses since the last logged point
    bf16 = autocast_bf16(cfg.bf16_autocast)
    if state is not None and state.get("bf16", bf16) != bf16:
        raise HastenError(f"{ckpt_path} was trained {'with' if state['bf16'] else 'without'} bf16 autocast; this "
                          "machine would resume it the other way: set bf16_autocast explicitly to match")
    for step in bar:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        z, text, pooled = caption_batch(data, cfg.batch_size, cfg.caption_dropout, (e_tok, e_pool), gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = flow_matching_loss(model, z, text, pooled, gen).float()
        value = optimizer_step(loss, opt, sched, model.parameters(), "transformer", step)
        ema_update(ema, model, step, cfg.ema_decay)
        loss_log.add(step, value)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                        "sched": sched.state_dict(), "step": step + 1, "curve": curve,
                                        "elapsed_s": time.time() - t0, "cpu_s": time.process_time() - c0,
                                        "config": asdict(cfg), "pending": list(loss_log.losses), "bf16": bf16})
    return {"train_config": asdict(cfg), "model_config": dict(model.config), "loss_curve": curve,
            "num_parameters": sum(p.numel() for p in model.parameters()), "train_seconds": round(time.time() - t0, 1),
            "train_cpu_seconds": round(time.process_time() - c0, 1),
            "finished": end == cfg.steps, "step": end, "model": ema, "raw_model": model}


def train_shapes(out: str | Path, vae_cfg: VAETrainConfig | None = None,
                 tr_cfg: TransformerTrainConfig | None = None, num_scenes: int = 120_000,
                 progress: bool = True, stop_after: int | None = None, vae_model_config: dict | None = None) -> dict:
    """The whole recipe, resumable at every stage: VAE -> latent data set -> transformer -> pipeline
    folder ``out`` (``model_index.json``, ``transformer/``, ``vae/``, ``scheduler/``)."""
    from diffusers import AutoencoderKL

    from .pipelines.shapes import ShapesPipeline, default_scheduler, encode_text, load_text_encoder

    out = Path(out)
    vae_cfg, tr_cfg = vae_cfg or VAETrainConfig(), tr_cfg or TransformerTrainConfig()
    if (out / "vae" / "train_log.json").is_file():  # written last: the VAE folder is complete
        vae = AutoencoderKL.from_pretrained(out / "vae")
        vae_log = json.loads((out / "vae" / "train_log.json").read_text())
    else:
        vae_log = train_vae(out, vae_cfg, vae_model_config, progress=progress)
        vae = vae_log.pop("model")
    vae.eval().requires_grad_(False)
    te, tok = load_text_encoder()
    data = load_data(prepare_data(out, vae, num_scenes, tr_cfg.seed, progress, te, tok))
    empty = encode_text(te, tok, [""], warn=False)
    log = train_transformer(out, tr_cfg, data, empty, progress=progress, stop_after=stop_after)
    model = log.pop("model")
    log.pop("raw_model")
    log["vae"] = {k: vae_log.get(k) for k in ("reconstruction", "latent_stats", "train_seconds", "num_parameters")}
    log["num_scenes"] = num_scenes
    if log["finished"]:
        pipe = ShapesPipeline(transformer=model.eval(), vae=vae, scheduler=default_scheduler(), text_encoder=te,
                              tokenizer=tok)
        pipe.save_pretrained(out)
        write_json(out / "train_log.json", log)
    log["model"] = model
    return log
