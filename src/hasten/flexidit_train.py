"""Fine-tuning a flexified transformer (FlexiDiT, Anagnostidis et al. 2025, Sec. 3.2): the LoRA variant
for text-conditioned models.

The base transformer is frozen; the coarse patch size gets its own LoRA adapters (``peft``, through
diffusers' ``add_adapter``) on the image stream's attention projections and feed-forward (the paper:
LoRAs on self-attention and FFN, cross-attention frozen without LoRA; SD3's joint attention has no
separate cross-attention, so by default the text stream's projections stay frozen; ``lora_targets="joint"``
adapts them too, which measured the same on `shapes`), its own embedding and
de-embedding and the per-size embedding and norms of :func:`hasten.flexify`. The adapters are active
only while the model runs at the coarse size, so the original size stays the pretrained model bitwise.

Loss (Sec. 3.2, distillation from the powerful mode, which has no trainable parameters):
``E_{sigma, x_sigma} || v(x_sigma; p_powerful) - v(x_sigma; p_weak) ||^2`` on the flow-matching inputs
the base model was trained on (the model's own latents and captions, 10 % empty captions so the
unconditional branch learns too), at the noise levels where the scheduler runs the weak mode (sigma
uniform on [0.3, 1]; see :func:`distillation_loss`). ``distil_guidance`` s > 1 (``--distil-guidance``,
hasten's addition) distils both CFG branches of every row and the guided velocity at scale s instead.
AdamW, paper hyperparameters where they fit (lr 8e-4, weight decay 1e-2, rank 32); resumable like
:mod:`hasten.train_shapes` (same seeding per step, atomic checkpoints).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import HastenError
from .io import write_json
from .methods.flexidit import flexi_parameters, flexify, patch_size
from .plans import weights_hash
from .train_shapes import LossLog, caption_batch, cosine_lr, load_checkpoint, optimizer_step, save_checkpoint

LORA_TARGETS = {
    # the image stream's attention projections and feed-forward (the text stream frozen)
    "image": r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))",
    # both streams of the joint attention and both feed-forwards: in an MMDiT the text tokens are part of the one
    # self-attention, and at the coarse size they attend to other image tokens
    "joint": r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
             r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))",
}


@dataclass
class FlexifyConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 8e-4
    weight_decay: float = 1e-2
    warmup: int = 50
    rank: int = 32
    lora_targets: str = "image"  # a key of LORA_TARGETS
    weak_patch: int = 4
    caption_dropout: float = 0.1
    weak_sigma_min: float = 0.3  # distil on sigma ~ U(weak_sigma_min, 1): where the weak mode runs
    distil_guidance: float = 0.0  # > 1: distil both CFG branches and the guided velocity at this scale
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 25


def adapter_name(p: int) -> str:
    return f"flexi_p{p}"


def add_lora(transformer: Any, p: int, rank: int, targets: str = "image") -> None:
    """Per-size LoRA adapters on the modules ``LORA_TARGETS[targets]`` names (inactive at the original size;
    ``patch_size`` switches them on)."""
    from peft import LoraConfig

    if targets not in LORA_TARGETS:
        raise HastenError(f"LoRA targets must be one of {sorted(LORA_TARGETS)}, got {targets!r}")
    if not hasattr(transformer, "add_adapter"):
        raise HastenError(f"{type(transformer).__name__} has no diffusers peft integration: use the "
                          "shared-parameter variant")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS[targets],
                                       init_lora_weights=True),
                            adapter_name=adapter_name(p))
    transformer.flex_lora = {**(getattr(transformer, "flex_lora", None) or {}), p: adapter_name(p)}
    transformer.disable_adapters()


def tuned_parameters(transformer: Any) -> list[torch.nn.Parameter]:
    """What the fine-tune trains (and ships): LoRA variant, the LoRA weights and the parameters flexify added;
    shared variant (``transformer.flex_variant == "shared"``), every parameter. Flags untouched."""
    if getattr(transformer, "flex_variant", "lora") == "shared":
        return list(transformer.parameters())
    return flexi_parameters(transformer) + [q for n, q in transformer.named_parameters() if "lora_" in n]


def trainable_parameters(transformer: Any) -> list[torch.nn.Parameter]:
    """:func:`tuned_parameters`, with ``requires_grad`` on for them and off for everything else."""
    params = tuned_parameters(transformer)
    keep = {id(q) for q in params}
    for q in transformer.parameters():
        q.requires_grad_(id(q) in keep)
    return params


def distillation_loss(model: Any, z: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, weak: int,
                      gen: torch.Generator, sigma_min: float = 0.0, guidance: float = 0.0,
                      empty: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """|| v(x; powerful) - v(x; weak) ||^2 (flow matching, diffusers' convention) at sigma ~ U(sigma_min, 1).

    The paper distils on the diffusion loss's inputs without restricting the noise level; its scheduler
    (and ours) runs the weak mode only on the first, noisiest calls, so we spend the fine-tune there: on
    `shapes` (50 Euler steps, sigmas linear from 1 to 0) ``compute=0.8`` runs the first 19 calls weak, down to
    sigma 0.63, and ``compute=0.6`` the first 38, down to 0.25; a first fine-tune on the base model's
    logit-normal sigma left its largest error at low sigma, where the weak mode rarely runs (0.75 at sigma
    0.2 against 0.26 at 0.95).

    ``guidance`` s > 1 (hasten's addition, not the paper's): every row is distilled in both CFG branches
    (``empty``: the "" caption's embeddings), and the loss adds the error of the guided velocity
    g = v_u + s (v_c - v_u) that the sampler actually uses, scaled by 1/s^2:

        L = (|dv_c|^2 + |dv_u|^2) / 2 + |dv_u + s (dv_c - dv_u)|^2 / s^2,   dv = v(weak) - v(powerful).

    With the paper's loss and caption dropout p, the unconditional branch trains on a fraction p of the rows,
    yet its error enters the guided velocity with weight 1 - s (-4 at s = 5), and the errors of the two
    branches that guidance amplifies are their difference, which a per-branch loss does not target."""
    e = torch.randn(z.shape, generator=gen)
    sigma = sigma_min + (1.0 - sigma_min) * torch.rand(z.shape[0], generator=gen)
    s = sigma.view(-1, 1, 1, 1)
    x = (1 - s) * z + s * e
    if guidance > 1.0:
        from .pipelines.shapes import with_unconditional

        if empty is None:
            raise HastenError("guided distillation needs the empty caption's embeddings")
        x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
        text, pooled = with_unconditional(text, pooled, empty)
    kw = dict(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=text, pooled_projections=pooled,
              return_dict=False)
    with torch.no_grad():
        target = model(**kw)[0]
    with patch_size(model, weak):
        pred = model(**kw)[0]
    d = pred - target
    if guidance <= 1.0:
        return d.pow(2).mean()
    d_u, d_c = d.chunk(2)
    return d.pow(2).mean() + (d_u + guidance * (d_c - d_u)).div(guidance).pow(2).mean()


def train_flexify(pipe: Any, out: str | Path, data: dict, empty_text: tuple, cfg: FlexifyConfig,
                  progress: bool = True, stop_after: int | None = None) -> dict:
    """Flexify ``pipe.transformer`` (in place), add the LoRAs, and train them (or resume) from ``data``
    (latents, text, pooled, index: :func:`hasten.train_shapes.load_data`). Returns the log."""
    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoints" / "flexify.pt"
    tr = pipe.transformer
    torch.manual_seed(cfg.seed)
    if getattr(tr, "flex_patch_sizes", None) is None:
        flexify(tr, (tr.config.patch_size, cfg.weak_patch))
    if not getattr(tr, "flex_lora", None):
        add_lora(tr, cfg.weak_patch, cfg.rank, cfg.lora_targets)
    params = trainable_parameters(tr)
    base_weights = weights_hash(_base_only(tr))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.steps, cfg.warmup))
    start, curve, elapsed = 0, [], 0.0
    state = load_checkpoint(ckpt_path, cfg)
    if state is not None:
        check_resume_base(state, base_weights, ckpt_path)
        try:
            missing = tr.load_state_dict(state["trainable"], strict=False)
        except RuntimeError as e:
            raise HastenError(f"cannot resume from {ckpt_path}: {str(e).splitlines()[0]}") from None
        if missing.unexpected_keys:
            raise HastenError(f"cannot resume from {ckpt_path}: unexpected {missing.unexpected_keys[0]}")
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, curve, elapsed = state["step"], state["curve"], state["elapsed_s"]
    e_tok, e_pool = (t.float() for t in empty_text)
    t0 = time.time() - elapsed
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    tr.train()
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress, desc="flexify",
               dynamic_ncols=True)
    names = {id(q): k for k, q in tr.named_parameters()}
    loss_log = LossLog(curve, cfg.log_every, cfg.steps, t0, bar)
    dropout = 0.0 if cfg.distil_guidance > 1.0 else cfg.caption_dropout  # guided: both branches of every row
    for step in bar:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 77 + step)
        z, text, pooled = caption_batch(data, cfg.batch_size, dropout, (e_tok, e_pool), gen)
        loss = distillation_loss(tr, z, text, pooled, cfg.weak_patch, gen, cfg.weak_sigma_min,
                                 cfg.distil_guidance, (e_tok, e_pool))
        loss_log.add(step, optimizer_step(loss, opt, sched, params, "flexify", step))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            save_checkpoint(ckpt_path, {"trainable": {names[id(q)]: q.detach().clone() for q in params},
                                        "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1,
                                        "curve": curve, "elapsed_s": time.time() - t0, "config": asdict(cfg),
                                        "base_weights": base_weights})
    tr.eval()
    log = {"config": asdict(cfg), "loss_curve": curve, "trainable_parameters": sum(q.numel() for q in params),
           "base_parameters": sum(q.numel() for q in tr.parameters()) - sum(q.numel() for q in params),
           "train_seconds": round(time.time() - t0, 1), "finished": end == cfg.steps, "step": end}
    if log["finished"]:
        write_json(out / "flexify_log.json", log)
    return log


def check_resume_base(state: dict, base_weights: str | None, ckpt_path: Path) -> None:
    """A checkpoint resumes only onto the base weights it was fine-tuned from (older checkpoints record none)."""
    if state.get("base_weights", base_weights) != base_weights:
        raise HastenError(f"{ckpt_path} holds a fine-tune of other base weights than --model's: use another "
                          f"--out, or delete {ckpt_path.parent} to start again")


# --------------------------------------------------------------------------- shipping
FLEXI_CONFIG = "flexi_config.json"
FLEXI_WEIGHTS = "flexi.safetensors"


def save_flexi(pipe: Any, folder: str | Path, base: str, extra: dict | None = None) -> Path:
    """Write what the flexified model adds to ``base`` (the base pipeline's name or folder): the trained
    parameters (``flexi.safetensors``, fp16 where the base ships fp16 is not needed: they are small) and
    ``flexi_config.json``; ``hasten.load_pipeline(folder)`` loads ``base`` and applies them."""
    from safetensors.torch import save_file

    from .io import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tr = pipe.transformer
    names = {id(q): k for k, q in tr.named_parameters()}
    tensors = {names[id(q)]: q.detach().contiguous() for q in tuned_parameters(tr)}  # flags untouched
    atomic_write(folder / FLEXI_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    lora = {str(p): n for p, n in (getattr(tr, "flex_lora", None) or {}).items()}
    cfg = {"base": base, "variant": getattr(tr, "flex_variant", "lora"), "patch_sizes": list(tr.flex_patch_sizes),
           "lora": lora, "rank": (extra or {}).get("rank"), **(extra or {})}
    cfg.setdefault("base_weights", weights_hash(_base_only(tr)))  # the shared variant passes the pre-training one
    atomic_write(folder / FLEXI_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"))
    return folder


def _base_only(tr: Any) -> torch.nn.Module:
    """A stand-in module holding only the base weights (for the fingerprint the loader checks)."""
    holder = torch.nn.Module()
    flex = {id(q) for q in flexi_parameters(tr)}  # what flexify added, whatever the model names its embedder
    base = sorted((k, q) for k, q in tr.named_parameters() if "lora_" not in k and id(q) not in flex)
    for i, (_, q) in enumerate(base):
        holder.register_parameter(f"p{i}", torch.nn.Parameter(q.detach(), requires_grad=False))
    return holder


def load_flexi(folder: str | Path) -> Any:
    """The base pipeline with the flexified transformer of ``folder`` (see :func:`save_flexi`)."""
    from .io import read_model_folder
    from .pipeline import load_pipeline

    folder = Path(folder)
    cfg, tensors = read_model_folder(folder, FLEXI_CONFIG, FLEXI_WEIGHTS,
                                     f"cannot load the flexified model in {folder}")
    base = cfg["base"]
    base_path = folder / base if (folder / base).is_dir() else base
    pipe = load_pipeline(base_path)
    tr = flexify(pipe.transformer, cfg["patch_sizes"])
    tr.flex_variant = cfg.get("variant", "lora")
    for p, _name in cfg.get("lora", {}).items():
        add_lora(tr, int(p), int(cfg["rank"]), cfg.get("lora_targets", "image"))
    if weights_hash(_base_only(tr)) != cfg["base_weights"]:
        raise HastenError(f"{folder} was fine-tuned from other weights of {base!r} than the ones installed; "
                          "re-run hasten flexify")
    missing = tr.load_state_dict(tensors, strict=False)
    if missing.unexpected_keys:
        raise HastenError(f"{folder}: unexpected weights {missing.unexpected_keys[0]}")
    tr.requires_grad_(False).eval()
    pipe.name = folder.name
    return pipe


# --------------------------------------------------------------------------- the shared-parameter variant
@dataclass
class SharedFlexifyConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-4
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    weak_patch: int = 4
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 25


def train_flexify_shared(pipe: Any, out: str | Path, cfg: SharedFlexifyConfig, data: tuple,
                         progress: bool = True, stop_after: int | None = None) -> dict:
    """The shared-parameter variant on a class-conditional hasten pipeline (``digits``; paper Sec. 3.1,
    4.1): flexify, then fine-tune every parameter with the model's own flow-matching loss at a patch size
    drawn uniformly per step from {original, weak} (the paper samples "one of the available patch sizes"
    without saying how), AdamW lr 1e-4 with no weight decay and an EMA (its Table 4); resumable. The
    pretrained weights' fingerprint is kept for :func:`save_flexi`. The paper's extra
    exposure-bias (MMD) loss for this setting is not used."""
    import copy

    from .train import ema_update, flow_matching_loss

    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoints" / "flexify.pt"
    tr = pipe.transformer
    p0 = int(tr.config.patch_size)
    flexify(tr, (p0, cfg.weak_patch))
    tr.flex_variant = "shared"
    base_weights = weights_hash(_base_only(tr))
    torch.manual_seed(cfg.seed)
    params = trainable_parameters(tr)
    ema = copy.deepcopy(tr).requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    start, curve, elapsed = 0, [], 0.0
    state = load_checkpoint(ckpt_path, cfg)
    if state is not None:
        check_resume_base(state, base_weights, ckpt_path)
        try:
            tr.load_state_dict(state["model"])
        except RuntimeError as e:
            raise HastenError(f"cannot resume from {ckpt_path}: {str(e).splitlines()[0]}") from None
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start, curve, elapsed = state["step"], state["curve"], state["elapsed_s"]
    x_all, y_all = data
    null = tr.config.num_embeds_ada_norm
    t0 = time.time() - elapsed
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress, desc="flexify",
               dynamic_ncols=True)
    loss_log = LossLog(curve, cfg.log_every, cfg.steps, t0, bar)
    for step in bar:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 91 + step)
        idx = torch.randint(0, x_all.shape[0], (cfg.batch_size,), generator=gen)
        p = (p0, cfg.weak_patch)[int(torch.randint(0, 2, (1,), generator=gen))]
        with patch_size(tr, p):
            loss = flow_matching_loss(tr, x_all[idx], y_all[idx], null, cfg.label_dropout, gen)
        loss_log.add(step, optimizer_step(loss, opt, sched, params, "flexify", step))
        ema_update(ema, tr, step, cfg.ema_decay)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            save_checkpoint(ckpt_path, {"model": tr.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                        "step": step + 1, "curve": curve, "elapsed_s": time.time() - t0,
                                        "config": asdict(cfg), "base_weights": base_weights})
    if end == cfg.steps:
        tr.load_state_dict(ema.state_dict())  # ship the EMA
    tr.eval()
    return {"config": asdict(cfg), "loss_curve": curve, "trainable_parameters": sum(q.numel() for q in params),
            "train_seconds": round(time.time() - t0, 1), "finished": end == cfg.steps, "step": end,
            "base_weights": base_weights}
