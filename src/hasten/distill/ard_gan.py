"""ARD's GAN fine-tune (Kim et al. 2025, Table 1 "+ GAN loss finetuning"; the public re-implementation's
``train_ARD_gan.py`` / ``models_discriminator.py``, read, not copied).

After the distillation stage the student is fine-tuned with its own MSE plus an adversarial term:

- **Discriminator**: one head per block of the *frozen teacher*, reading that block's image-token features of
  a latent re-noised to a random level (sigma ~ U(0, 1) per sample, x_sigma = (1 - sigma) x + sigma e, the
  model's own convention; hasten's choice: the re-implementation's GAN loss function is not public, only
  that it reads the frozen teacher's block features), with a projection on the caption (the pooled
  embedding, as the re-implementation projects its class-and-time vector). A head is a spectrally normalised
  1x1 convolution over the tokens, a residual kernel-9 one (circular padding), and a projection to a token-wise
  logit, as in the re-implementation.
- **Real and fake**: real latents are the VAE latents of rendered training scenes with their captions (the
  re-implementation uses real ImageNet images); fake is the student's final latent, its last group's output
  on the teacher-forced inputs.
- **Losses**: hinge, L_D = E relu(1 - D(real)) + E relu(1 + D(fake)), L_G = -E D(fake); the student's loss is
  MSE + w L_G with the VQGAN adaptive weight w = lambda |grad MSE| / (|grad L_G| + 1e-4) (clamped to
  [0, 1e4]) on the last head's projection, and w = 0 for the first ``gan_start`` steps while the
  discriminator warms up (the re-implementation: 3000 steps).

Each step first updates the discriminator on the detached fake (its own AdamW, the re-implementation's lr
1e-3), then returns the student's loss. The discriminator's draws come from their own generator, so the
student's batches, and with ``gan_start`` past the last step its weights, are bitwise those of plain ARD
training (tested).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..train_shapes import latent_batch

GAN_SEED = 7_919  # offsets the discriminator's generator from the student's (seed * 1_000_003 + step)


@dataclass
class GANConfig:
    weight: float  # lambda of the adaptive weight (> 0)
    start: int = 0  # steps before the adversarial term joins the student's loss
    lr: float = 1e-3  # the discriminator's AdamW (the re-implementation's dis_lr)
    cmap_dim: int = 64  # width of the caption projection


class DiscriminatorHead(nn.Module):
    """Token-wise logits from one block's image tokens (B, T, D), projected on the caption's pooled embedding."""

    def __init__(self, width: int, pooled_dim: int, cmap_dim: int):
        super().__init__()
        self.inp = spectral_norm(nn.Conv1d(width, width, 1))
        self.res = spectral_norm(nn.Conv1d(width, width, 9, padding=4, padding_mode="circular"))
        self.out = spectral_norm(nn.Conv1d(width, cmap_dim, 1))
        self.cmap = nn.Linear(pooled_dim, cmap_dim)
        self.cmap_dim = cmap_dim

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.inp(tokens.transpose(1, 2)), 0.2)
        h = (h + F.leaky_relu(self.res(h), 0.2)) / 2 ** 0.5
        return (self.out(h) * self.cmap(pooled).unsqueeze(-1)).sum(1) / self.cmap_dim ** 0.5  # (B, T)


class TeacherDiscriminator(nn.Module):
    """The frozen teacher's block features (not a submodule: never trained, never saved here) and one head per
    block; ``forward`` gives the logits of every head, concatenated over tokens (B, blocks * T)."""

    def __init__(self, teacher: nn.Module, cmap_dim: int = 64):
        super().__init__()
        self._teacher = [teacher.requires_grad_(False).eval()]  # a list keeps it out of parameters()/state_dict()
        width = teacher.config.num_attention_heads * teacher.config.attention_head_dim
        pooled = teacher.config.pooled_projection_dim
        self.heads = nn.ModuleList(DiscriminatorHead(width, pooled, cmap_dim)
                                   for _ in teacher.transformer_blocks)

    @contextmanager
    def _features(self) -> Any:
        feats: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda _m, _a, out: feats.append(out[1]))
                 for b in self._teacher[0].transformer_blocks]
        try:
            yield feats
        finally:
            for h in hooks:
                h.remove()

    def forward(self, x: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, gen: torch.Generator
                ) -> torch.Tensor:
        """Logits for the latents ``x`` (B, C, H, W) with their captions, re-noised to sigma ~ U(0, 1)."""
        sigma = torch.rand(x.shape[0], generator=gen).to(x)
        noise = torch.randn(x.shape, generator=gen).to(x)
        s = sigma.view(-1, 1, 1, 1)
        with self._features() as feats:
            self._teacher[0](hidden_states=(1 - s) * x + s * noise, timestep=sigma * 1000.0,
                             encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)
        return torch.cat([head(f, pooled) for head, f in zip(self.heads, feats)], 1)


def adaptive_weight(mse: torch.Tensor, adversarial: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """|grad mse| / (|grad adversarial| + 1e-4) at the parameter ``last``, clamped to [0, 1e4], detached
    (Esser et al. 2021's balance, the re-implementation's ``d_weight``)."""
    g_mse = torch.autograd.grad(mse, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adversarial, last, retain_graph=True)[0]
    return (g_mse.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class ARDGan:
    """The adversarial part of an ARD fine-tune: the discriminator, its optimiser and the real data.

    ``real``: ``latents`` (N, C, H, W), ``index`` (N,) into ``text`` (U, L, D) / ``pooled`` (U, D)
    (:func:`hasten.train_shapes.load_data`). ``state_dict``/``load_state_dict`` let a run resume."""

    def __init__(self, teacher: nn.Module, real: dict, cfg: GANConfig, seed: int, log_every: int = 25):
        self.cfg, self.real, self.seed, self.log_every = cfg, real, seed, log_every
        self.curve: list[dict] = []  # every log_every steps: the means of the student's MSE, L_D, L_G and w
        self._since: list[dict] = []
        with torch.random.fork_rng(devices=[]):  # the heads' initialisation depends on the seed alone
            torch.manual_seed(seed + GAN_SEED)
            self.disc = TeacherDiscriminator(teacher, cfg.cmap_dim)
        self.opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, weight_decay=0.0)

    def state_dict(self) -> dict:
        return {"disc": self.disc.state_dict(), "opt": self.opt.state_dict(), "curve": list(self.curve),
                "since": list(self._since)}

    def load_state_dict(self, state: dict) -> None:
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["opt"])
        self.curve, self._since = list(state["curve"]), list(state["since"])

    def _log(self, step: int, **values: float) -> None:
        self._since.append(values)
        if (step + 1) % self.log_every == 0:
            keys = {k for v in self._since for k in v}
            self.curve.append({"step": step + 1, **{k: sum(v[k] for v in self._since if k in v)
                                                    / sum(k in v for v in self._since) for k in sorted(keys)}})
            self._since = []

    def student_loss(self, mse: torch.Tensor, fake: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                     last: torch.Tensor, step: int) -> torch.Tensor:
        """One discriminator update on the detached ``fake`` (B, C, H, W) and a real batch, then the student's
        loss: ``mse`` alone before ``cfg.start``, else ``mse + w L_G`` (module docstring)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step + GAN_SEED)
        real = latent_batch(self.real, fake.shape[0], gen)
        self.disc.train()
        d_loss = (F.relu(1 - self.disc(*real, gen)).mean()
                  + F.relu(1 + self.disc(fake.detach(), text.detach(), pooled.detach(), gen)).mean())
        self.opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt.step()
        if step < self.cfg.start:
            self._log(step, mse=float(mse.detach()), d_loss=float(d_loss.detach()))
            return mse
        self.disc.requires_grad_(False)
        try:
            adversarial = -self.disc(fake, text, pooled, gen).mean()
        finally:
            self.disc.requires_grad_(True)
        w = self.cfg.weight * adaptive_weight(mse, adversarial, last)
        self._log(step, mse=float(mse.detach()), d_loss=float(d_loss.detach()), g_loss=float(adversarial.detach()),
                  weight=float(w))
        return mse + w * adversarial
