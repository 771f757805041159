"""Imagine Flash: backward distillation of a few-step student (Kohler et al. 2024, arXiv 2405.05224).

The paper distils Emu (an epsilon-prediction U-Net) into a 1-3 step student with three parts; here
they are written for ``shapes`` (flow matching, sigma = 1 at noise, x_sigma = (1 - sigma) x0 + sigma
eps, the transformer predicts v = eps - x0 at ``timestep = 1000 sigma``). Paper references name the
section and the formula; the paper's own equation numbers could not be checked against its text in
this workspace (only its abstract and third-party summaries were retrievable), so formulas are cited
by section and written out in full instead of by a number.

Notation, and the paper's forward process (method section, "x_t = alpha_t x_0 + sigma_t eps") in flow
matching: alpha_sigma = 1 - sigma, so

    x0 = x - sigma v,        eps = x + (1 - sigma) v,        x_sigma = (1 - sigma) x0 + sigma eps.   [FM]

**Backward distillation** (method section, "Backward Distillation"). Forward distillation trains on
x_t = alpha_t x0 + sigma_t eps: the input leaks the ground truth x0 (alpha_t x0 is in it), which the
student never has at inference. Backward distillation instead runs the student's own schedule from
pure noise, without gradient, to get x_t^B, and evaluates student and teacher on that same input:

    x_t^B = Euler_student(x_T -> t),   grad_theta E[ d( x0_theta(x_t^B, t, c), x0_phi(x_t^B, t, c) ) ]   [BD]

(x0_phi: the teacher's x0-prediction with classifier-free guidance, so guidance is distilled in and
the student runs one branch). ``FlashConfig.backward = False`` is the ablation: inputs forward-noised
from data (the VAE latents of the rendered scenes the captions describe, :func:`forward_inputs`).

**Shifted Reconstruction Loss** (method section, "Shifted Reconstruction Loss"). The target is the teacher's
denoising of the student's own prediction, re-noised to a shifted level tau = gamma(t) with fresh
noise eps' and held fixed (stop-gradient):

    x_tau = alpha_tau sg(x0_theta) + sigma_tau eps',
    L = d( x0_theta(x_t^B, t, c), sg(x0_phi(x_tau, tau, c)) ).                                        [SRL]

At high t the teacher re-draws the structure (and text alignment) of the student's image, at low t
it only sharpens details. ``FlashConfig.srl = False`` is the ablation: the target is the teacher's
x0 at the student's input, [BD]. d is the mean squared error. With ``teacher_steps`` M > 1 (below),
x0_phi in both is the teacher's M-step guided solve to 0 instead of its one-step prediction.

Two things the retrievable text leaves open, and hasten's choices (both options, ablated in
``benchmarks/flash_shapes``):

- *Which noise eps'* (``FlashConfig.srl_noise``). ``"fresh"``: an independent draw. Under an MSE the
  student then regresses onto the mean over eps' of the teacher's answers, which at high tau is close to
  independent of the student's own noise x_T: a first run collapsed to one image per caption (different
  seeds, nearly the same picture; FD 6x the teacher's). ``"trajectory"`` (default): eps' = x_T, the
  sample's own starting noise, so x_tau = (1 - tau) x0_theta + tau x_T is the point at level tau on the
  straight flow path from x_T through the student's prediction, the target is a deterministic function of
  x_T, and the student is asked for a different image per seed, as the teacher draws.
- *How the teacher denoises x_tau* (``FlashConfig.teacher_steps``, :func:`teacher_denoise`). One step is
  its x0-prediction, the posterior mean at tau (blurry at high tau); M > 1 guided Euler steps from tau to 0
  follow its ODE to a sharp image at M times the teacher cost.

The shift gamma (:func:`srl_gamma`): the paper's exact gamma could not be retrieved here (what was:
tau grows with t, structure and text alignment at high t, details at low t); hasten uses the linear map

    tau = gamma(sigma) = tau_min + (tau_max - tau_min) sigma,   0 <= tau_min <= tau_max < 1,   [gamma]

defaults tau_min = 0, tau_max = 0.8: monotone; gamma(sigma) <= sigma (with tau_min = 0): the teacher
never sees more noise than the student's input held; and gamma(1) = tau_max < 1: even at the first
step (pure-noise input) the target keeps 1 - tau_max of the student's prediction, so the teacher
corrects the student's image instead of drawing an unrelated one from fresh noise (tau = 1 would make
the target independent of the student, the mean of the teacher's images: blur).

A floor tau_min > 0 (``--tau-min``; the shipped student's stages 2-4 use tau in [0.4, 0.9], stages 5-6 in
[0.6, 0.9]) gives up
gamma(sigma) <= sigma at low sigma, on evidence: with tau_min = 0 the last step of a 3-step sample (sigma 1/3,
tau 0.27) is trained towards the teacher's light sharpening of the student's own image, so nothing corrects
what the earlier steps got wrong, and the samples drift from the data as steps are added (FD-shapes 14.9 /
19.4 / 25.4 at 1 / 2 / 3 steps on 400 captions). 400 more steps with the floor gave 12.3 / 13.1 / 14.7 at
the same 3-step adherence (0.362 against 0.370), and 1100 more after those raised 3-step adherence to 0.411
on 800 captions (``benchmarks/flash_shapes``). Raising the floor to 0.6 (with a 4-step teacher solve; the
last of 3 steps then trains towards the teacher's re-draw from tau 0.7, not 0.57) for 1200 more steps gave
0.430 at FD-shapes 9.3 (12.3 before; the teacher: 0.477, 9.9); a floor of 0.7 did no better. Distilling a
stronger guidance than the teacher's (``--cfg`` 7.5 against 5) lowered adherence there.

*Guidance in a limited interval* (``--cfg-interval LO,HI``, ``FlashConfig.guidance_interval``; hasten's
addition, not the paper's): the SRL teacher guides only at LO < sigma <= HI and gives its conditional
velocity elsewhere (Kynkaenniemi et al. 2024, arXiv 2404.07724; :class:`hasten.GuidanceInterval`'s rule).
Guidance at high noise narrows the teacher's layouts and raises FD, and a student that matches the guided
teacher inherits that: after stage 6 its 3-step FD-shapes was above that of 3 UniPC steps without any
guidance. Stage 7 (600 steps from stage 6, floor 0.6 and the 4-step solve kept) limits the teacher's
guidance to (0.22, 0.84], and stage 8 (600 more) to (0.22, 0.7]. On 1200 validation captions (800-1999, noise seed 7)
the 3-step figures went from adherence 0.414 / FD-shapes 7.60 to 0.432 / 7.07, then 0.418 / 6.32 (the
50-step CFG teacher: 0.462 / 6.67; UniPC 3 without guidance: 0.263 / 7.13); (0.22, 0.84] for a second stage
instead gave 0.414 / 6.83. On the bench's 800 captions (``benchmarks/flash_shapes``) the gain held at 1 and 2
steps but not in 3-step FD-shapes (stage 6: 0.430 / 9.31, stage 7: 0.436 / 10.05, stage 8: 0.419 / 9.84):
differences of this size in FD-shapes do not carry from one caption set to another. The shipped student is
stage 7.

**Noise correction** (method section, "Noise Correction"; training-free, inference only). For an
epsilon-prediction model, the first step starts at t = T where the input is pure noise: the noise is
KNOWN, eps = x_T, while the network's eps_hat(x_T, T) is a poor, nearly trivial estimate of it (and
x0_hat = (x_T - sigma_T eps_hat) / alpha_T is ill-conditioned as alpha_T -> 0). The DDIM step

    x_t' = alpha_t' x0_hat + sigma_t' eps_hat,   x0_hat = (x_t - sigma_t eps_hat) / alpha_t          [DDIM]

is corrected on the first step only by using the known noise in the noise term:

    x_t' = alpha_t' x0_hat + sigma_t' x_T  =  [DDIM] + sigma_t' (x_T - eps_hat(x_T, T))                [NC]

(an additional bias term; :func:`ddim_eps_step` with ``noise=x_T``, :func:`sample_ddim_eps`). This form
is reconstructed from the paper's description (t = T treated as a special case, the noise there being
known, which adds a bias term), not checked against its equation.

*What [NC] becomes for ``shapes``.* Flow matching at sigma_0 = 1 is a zero-terminal-SNR process
(alpha_T = 1 - sigma_0 = 0). The model predicts v, and by [FM] the implied noise at sigma = 1 is

    eps_hat = x_T + (1 - 1) v = x_T        for ANY v,

so the known noise already IS the model's noise estimate: [NC] replaces eps_hat by itself and is the
identity. Its x0 = x_T - v is finite (no singularity: the v-parameterisation is what Lin et al.
recommend to avoid it), and the DDIM step with that x0 and eps is Euler's: (1 - s') (x - s v) +
s' (x + (1 - s) v) = x + (s' - s) v. :func:`flow_ddim_step` implements the flow-matching form with
optional ``noise``; tests check ``eps_from_v(x_T, v, 1) == x_T`` bitwise for random v and that the
corrected first step equals the uncorrected one bitwise (and Euler's up to rounding). The student's
sampler therefore takes plain Euler steps, and the pipeline has no noise-correction switch.

**The student** (:class:`FlashStudent`): a copy of the teacher transformer, one network for every
step count in ``step_counts`` (the paper's 1, 2 and 3 steps): each training sample draws K from the
step counts and a step d in [0, K) of the K-step schedule, so the student learns every schedule's
inputs (``step_draw="count"``: K uniform, then d; the last step of 3 then sees 1/9 of the rows and the
pure-noise level 11/18; ``"step"``: every (K, d) pair equally often, 1/6 each for counts 1-3).
Schedules are uniform in sigma, sigma_d = 1 - d / K ("trailing" spacing, every step starts at
a distinct level; diffusers' ``set_timesteps(2)`` would start the second step at sigma 0.001). The
sampler is K Euler steps x_{d+1} = x_d + (sigma_{d+1} - sigma_d) v: for flow matching the DDIM step
with the predicted x0 and eps is exactly this step (above). A fresh student is therefore the teacher's
conditional branch taking K Euler steps (tested bitwise).

**Training** (:func:`train_flash`): captions from the scene grammar (seeds ``CAPTION_SEED0 + caption_offset +
step * batch + i``, disjoint from training scenes < 10M, ARD trajectories 30M, calibration 40M and held-out
50M), MiniLM embeddings from the teacher pipeline's frozen encoder, AdamW, gradient clipping at 1,
cosine schedule with warm-up, EMA; each step's randomness comes from a generator seeded by (seed, step)
and every state is checkpointed atomically, so an interrupted run resumes to the same weights. ``init`` starts
from a saved student's weights (a second stage: e.g. a dearer target, more teacher steps, after a cheap
first stage).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import HastenError
from ..plans import weights_hash
from .student import StudentPipeline, init_student, load_student, said_counts, save_student, train_student

FLASH_CONFIG = "flash_config.json"
CAPTION_SEED0 = 20_000_000  # training < 10M, ARD trajectories 30M, calibration 40M, held-out 50M
MAX_STEPS = 3  # the paper's regime: 1 to 3 steps


# --------------------------------------------------------------------------- formulas
def check_step_counts(step_counts: Sequence[int]) -> tuple[int, ...]:
    """The distinct step counts, sorted; each must lie in 1..MAX_STEPS."""
    counts = sorted({int(k) for k in step_counts})
    if not counts or counts[0] < 1 or counts[-1] > MAX_STEPS:
        raise HastenError(f"an Imagine Flash student samples in 1 to {MAX_STEPS} steps, got {list(step_counts)}")
    return tuple(counts)


def student_sigmas(k: int) -> list[float]:
    """The K-step schedule, uniform in sigma from 1 (noise) to 0: [1, 1 - 1/K, ..., 0]."""
    if not 1 <= int(k) <= MAX_STEPS:
        raise HastenError(f"an Imagine Flash student samples in 1 to {MAX_STEPS} steps, not {k}")
    return [1.0 - i / k for i in range(k + 1)]


def _col(s: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    return s.view(-1, *([1] * (like.dim() - 1))) if isinstance(s, torch.Tensor) else s


def x0_from_v(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """[FM]: the clean prediction x0 = x - sigma v (``sigma`` a float or one per row)."""
    return x - _col(sigma, x) * v


def eps_from_v(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """[FM]: the implied noise eps = x + (1 - sigma) v; at sigma = 1 it is x for any v."""
    return x + (1 - _col(sigma, x)) * v


def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """[FM] forward process: x_sigma = (1 - sigma) x0 + sigma eps."""
    s = _col(sigma, x0)
    return (1 - s) * x0 + s * noise


def srl_gamma(sigma: torch.Tensor | float, tau_min: float = 0.0, tau_max: float = 0.8) -> torch.Tensor | float:
    """[gamma]: the shifted level tau = tau_min + (tau_max - tau_min) sigma of the Shifted Reconstruction
    Loss (module docstring: monotone, gamma(1) = tau_max < 1, gamma(sigma) <= sigma when tau_min = 0)."""
    if not 0.0 <= tau_min <= tau_max < 1.0:
        raise HastenError(f"the SRL shift needs 0 <= tau_min (--tau-min) <= tau_max (--tau-max) < 1: it keeps "
                          f"part of the student's prediction; got tau_min {tau_min:g}, tau_max {tau_max:g}")
    return tau_min + (tau_max - tau_min) * sigma


def ddim_eps_step(x: torch.Tensor, eps_hat: torch.Tensor, alpha: float, sigma: float, alpha_next: float,
                  sigma_next: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """[DDIM] for an epsilon-prediction model (x_t = alpha_t x0 + sigma_t eps); with ``noise`` (the known
    x_T) in the noise term it is the noise-corrected first step [NC]."""
    x0 = (x - sigma * eps_hat) / alpha
    return alpha_next * x0 + sigma_next * (eps_hat if noise is None else noise)


def sample_ddim_eps(eps_fn: Callable[[torch.Tensor, int], torch.Tensor], x_T: torch.Tensor,
                    alphas: Sequence[float], sigmas: Sequence[float], noise_correction: bool = True
                    ) -> list[torch.Tensor]:
    """Deterministic DDIM of an epsilon-prediction model ``eps_fn(x, i)`` over levels i = 0..K (alpha_0,
    sigma_0: the start, where x_T is pure noise); all K + 1 states. ``noise_correction`` applies [NC] to
    the first step only (the known noise is x_T only there)."""
    states = [x_T]
    x = x_T
    for i in range(len(alphas) - 1):
        eps_hat = eps_fn(x, i)
        known = x_T if (noise_correction and i == 0) else None
        x = ddim_eps_step(x, eps_hat, alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1], noise=known)
        states.append(x)
    return states


def flow_ddim_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """[DDIM] written for flow matching: x' = (1 - s') x0 + s' eps with x0, eps from v by [FM], or the
    known ``noise`` in place of eps ([NC]). Mathematically Euler's x + (s' - s) v; at s = 1 the implied
    eps is x itself, so ``noise=x`` changes nothing (module docstring)."""
    eps = eps_from_v(x, v, sigma) if noise is None else noise
    return (1 - sigma_next) * x0_from_v(x, v, sigma) + sigma_next * eps


# --------------------------------------------------------------------------- the student
class FlashStudent(nn.Module):
    """A copy of the teacher ``SD3Transformer2DModel`` that samples in K in ``step_counts`` Euler steps of
    :func:`student_sigmas`, one (conditional) branch: guidance is distilled in."""

    def __init__(self, teacher: nn.Module, step_counts: Sequence[int] = (1, 2, 3)):
        super().__init__()
        self.step_counts = check_step_counts(step_counts)
        self.transformer = copy.deepcopy(teacher)
        self.steps = self.step_counts[-1]  # the default step count

    @property
    def denoiser(self) -> nn.Module:
        """The module each sampling step calls once (what the bench times as the denoiser)."""
        return self.transformer

    def schedule(self, k: int) -> torch.Tensor:
        """The K + 1 levels of the K-step schedule (float32)."""
        if int(k) not in self.step_counts:
            raise HastenError(f"this Imagine Flash student samples in {said_counts(self.step_counts)} steps, not {k}")
        return torch.tensor(student_sigmas(int(k)), dtype=torch.float32)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor
                 ) -> torch.Tensor:
        """v at per-row levels ``sigma`` (B,), the transformer seeing ``timestep = 1000 sigma``."""
        return self.transformer(hidden_states=x, timestep=sigma * 1000.0, encoder_hidden_states=text,
                                pooled_projections=pooled, return_dict=False)[0]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor
                ) -> torch.Tensor:
        """The student's clean prediction x0_theta(x, sigma, c) = x - sigma v ([FM]), float32."""
        return x0_from_v(x.float(), self.velocity(x, sigma, text, pooled).float(), sigma)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, steps: int | None = None,
               return_states: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """K Euler steps from ``noise`` (K = ``steps``, default the largest step count): the final latent
        (and the K + 1 states)."""
        s = self.schedule(self.steps if steps is None else steps).to(noise.device)
        x = noise.float()
        states = [x]
        for d in range(len(s) - 1):
            v = self.velocity(x, s[d].expand(x.shape[0]), text, pooled).float()
            x = x + (s[d + 1] - s[d]) * v
            states.append(x)
        return (x, torch.stack(states, 1)) if return_states else x


# --------------------------------------------------------------------------- the losses
def schedule_table(step_counts: Sequence[int]) -> torch.Tensor:
    """(MAX_STEPS + 1, MAX_STEPS + 1) float32: row K holds the K-step schedule (padded with 0)."""
    table = torch.zeros(MAX_STEPS + 1, MAX_STEPS + 1)
    for k in step_counts:
        table[k, :k + 1] = torch.tensor(student_sigmas(k))
    return table


@torch.no_grad()
def backward_inputs(student: FlashStudent, noise: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                    ks: torch.Tensor, ds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[BD]: the student's own state after ``ds[i]`` Euler steps of its ``ks[i]``-step schedule from pure
    ``noise``, computed without gradient; returns (inputs x_t^B, their levels sigma (B,)).

    Rows still stepping are batched together (one student pass per step index)."""
    table = schedule_table(student.step_counts).to(noise.device)
    x = noise.float().clone()
    for j in range(int(ds.max()) if ds.numel() else 0):
        rows = (ds > j).nonzero().flatten()
        s0, s1 = table[ks[rows], j], table[ks[rows], j + 1]
        v = student.velocity(x[rows], s0, text[rows], pooled[rows]).float()
        x[rows] = x[rows] + (s1 - s0).view(-1, 1, 1, 1) * v
    return x, table[ks, ds]


def forward_inputs(x0: torch.Tensor, noise: torch.Tensor, ks: torch.Tensor, ds: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ablation (ordinary forward-noised distillation): the data ``x0`` noised to the same levels by
    [FM], so the input leaks x0."""
    sigma = schedule_table(range(1, MAX_STEPS + 1)).to(noise.device)[ks, ds]
    return renoise(x0.float(), noise.float(), sigma), sigma


@torch.no_grad()
def teacher_velocity(teacher: nn.Module, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                     pooled: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor], scale: float,
                     interval: tuple[float, float] | None = None) -> torch.Tensor:
    """The teacher's guided velocity v_u + s (v_c - v_u) at per-row levels ``sigma``, both branches in one call
    ([uncond; cond], as the pipeline batches them); ``empty``: the "" caption's embeddings. ``interval``
    (lo, hi): guidance only on the rows with lo < sigma <= hi and the conditional velocity v_c on the others
    (:class:`hasten.GuidanceInterval`'s rule, Kynkaenniemi et al. 2024)."""
    from ..pipelines.shapes import with_unconditional

    guided = scale > 1.0
    if guided:
        xin, sin = torch.cat([x, x]), torch.cat([sigma, sigma])
        tin, pin = with_unconditional(text, pooled, empty)
    else:
        xin, sin, tin, pin = x, sigma, text, pooled
    v = teacher(hidden_states=xin, timestep=sin * 1000.0, encoder_hidden_states=tin, pooled_projections=pin,
                return_dict=False)[0].float()
    if guided:
        v_u, v_c = v.chunk(2)
        if interval is not None:
            inside = (sigma > interval[0]) & (sigma <= interval[1])
            v_u = torch.where(_col(inside, v_c), v_u, v_c)
        v = v_u + scale * (v_c - v_u)
    return v


@torch.no_grad()
def teacher_x0(teacher: nn.Module, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
               empty: tuple[torch.Tensor, torch.Tensor], scale: float,
               interval: tuple[float, float] | None = None) -> torch.Tensor:
    """The teacher's guided clean prediction x0_phi = x - sigma v ([FM])."""
    return x0_from_v(x.float(), teacher_velocity(teacher, x, sigma, text, pooled, empty, scale, interval), sigma)


@torch.no_grad()
def teacher_denoise(teacher: nn.Module, x: torch.Tensor, sigma: torch.Tensor, steps: int, text: torch.Tensor,
                    pooled: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor], scale: float,
                    interval: tuple[float, float] | None = None) -> torch.Tensor:
    """The teacher's denoising of ``x`` from per-row levels ``sigma`` to 0: ``steps`` guided Euler steps uniform
    in sigma. One step is its x0-prediction (:func:`teacher_x0`, bitwise); more steps follow its ODE and give
    a sharp image instead of the posterior mean a single prediction is at high noise ([SRL], "the teacher
    denoises x_tau": the paper does not say in how many steps; module docstring)."""
    if steps == 1:
        return teacher_x0(teacher, x, sigma, text, pooled, empty, scale, interval)
    x = x.float()
    for i in range(steps):
        s0, s1 = sigma * (1 - i / steps), sigma * (1 - (i + 1) / steps)
        v = teacher_velocity(teacher, x, s0, text, pooled, empty, scale, interval)
        x = x + _col(s1 - s0, x) * v
    return x


@dataclass
class FlashConfig:
    steps: int = 2000  # optimisation steps
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 100
    ema_decay: float = 0.999
    step_counts: tuple[int, ...] = (1, 2, 3)  # one student for every step count
    backward: bool = True  # False: the forward-distillation ablation
    srl: bool = True  # False: regress onto the teacher's x0 at the same input
    tau_min: float = 0.0  # [gamma]
    tau_max: float = 0.8
    srl_noise: str = "trajectory"  # [SRL]'s eps': "trajectory" (the sample's own start noise) or "fresh"
    teacher_steps: int = 1  # the teacher's Euler steps from tau to 0 that make the target (1: its x0)
    step_draw: str = "count"  # per row: "count" (K uniform, then d) or "step" (every (K, d) pair equally likely)
    init: str | None = None  # an Imagine Flash student folder whose weights start the run (a second stage)
    guidance_scale: float | None = None  # the teacher's CFG scale distilled in (None: its default)
    guidance_interval: tuple[float, float] | None = None  # the teacher guides only at lo < sigma <= hi
    caption_offset: int = 0  # caption seeds start here (a later stage on captions no earlier stage saw)
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 25
    bf16_autocast: bool | None = None  # CPU bf16 matmuls where native (None: hasten.train.bf16_native); fp32 state

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise HastenError("--train-steps and --batch-size must be >= 1 and --lr > 0")
        check_step_counts(self.step_counts)
        if self.caption_offset < 0:
            raise HastenError(f"--caption-offset must be >= 0, got {self.caption_offset}")
        if self.caption_offset + self.steps * self.batch_size > 10_000_000:
            raise HastenError("too many captions for the seed range (--caption-offset + steps x batch size must "
                              "be <= 10M)")
        srl_gamma(0.0, self.tau_min, self.tau_max)
        if self.srl_noise not in ("trajectory", "fresh"):
            raise HastenError(f"--srl-noise must be 'trajectory' or 'fresh', got {self.srl_noise!r}")
        if not 1 <= self.teacher_steps <= 50:
            raise HastenError(f"--teacher-steps must be 1 to 50, got {self.teacher_steps}")
        if self.step_draw not in ("count", "step"):
            raise HastenError(f"--step-draw must be 'count' or 'step', got {self.step_draw!r}")
        if self.guidance_scale is not None and not self.guidance_scale >= 1:
            raise HastenError(f"--cfg must be >= 1 (1: no guidance), got {self.guidance_scale}")
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0.0 <= lo < hi <= 1.0:
                raise HastenError(f"--cfg-interval needs 0 <= lo < hi <= 1, got {lo:g},{hi:g}")


def flash_batch(pipe: Any, step: int, cfg: FlashConfig, gen: torch.Generator) -> dict:
    """One step's batch: grammar captions (seeds ``CAPTION_SEED0 + caption_offset + step * batch + i``) and their MiniLM
    embeddings, per row a step count K and a step d in [0, K), the start noise and the SRL noise eps', and
    for forward distillation the VAE latents of the captions' rendered scenes. All randomness from ``gen``."""
    from ..data.shapes import render, sample_scene, to_model_space

    b = cfg.batch_size
    scenes = [sample_scene(CAPTION_SEED0 + cfg.caption_offset + step * b + i) for i in range(b)]
    text, pooled = pipe.encode_prompt([s.caption for s in scenes], torch.float32)
    counts = torch.tensor(check_step_counts(cfg.step_counts))
    if cfg.step_draw == "count":  # K uniform, then d uniform in [0, K)
        ks = counts[torch.randint(0, len(counts), (b,), generator=gen)]
        ds = (torch.rand(b, generator=gen) * ks).long().clamp_max(ks - 1)
    else:  # "step": every (K, d) pair equally likely
        pairs = torch.tensor([(int(k), d) for k in counts for d in range(int(k))])
        ks, ds = pairs[torch.randint(0, len(pairs), (b,), generator=gen)].unbind(1)
    shape = (b, *pipe.latent_shape)
    batch = {"text": text, "pooled": pooled, "ks": ks, "ds": ds, "noise": torch.randn(shape, generator=gen),
             "srl_noise": torch.randn(shape, generator=gen), "captions": [s.caption for s in scenes]}
    if not cfg.backward:
        c = pipe.vae.config
        with torch.no_grad():
            imgs = torch.from_numpy(to_model_space(np.stack([render(s) for s in scenes])))
            z = pipe.vae.encode(imgs.to(pipe.vae.dtype)).latent_dist.mean.float()
        batch["x0"] = (z - (c.shift_factor or 0.0)) * c.scaling_factor
    return batch


def flash_loss(student: FlashStudent, teacher: nn.Module, batch: dict, cfg: FlashConfig,
               empty: tuple[torch.Tensor, torch.Tensor], scale: float) -> tuple[torch.Tensor, dict]:
    """The distillation loss of one batch and its parts (``inputs``, ``sigma``, ``x0`` with gradient,
    ``target`` without, ``tau``): inputs by [BD] (or forward-noised), target by [SRL] (or the teacher's x0
    at the inputs), d = mean squared error."""
    text, pooled, ks, ds = batch["text"], batch["pooled"], batch["ks"], batch["ds"]
    if cfg.backward:
        x_in, sigma = backward_inputs(student, batch["noise"], text, pooled, ks, ds)
    else:
        x_in, sigma = forward_inputs(batch["x0"], batch["noise"], ks, ds)
    x0 = student(x_in, sigma, text, pooled)
    with torch.no_grad():
        if cfg.srl:
            tau = srl_gamma(sigma, cfg.tau_min, cfg.tau_max)
            eps = batch["noise"] if cfg.srl_noise == "trajectory" else batch["srl_noise"]
            x_tau = renoise(x0.detach(), eps, tau)
        else:
            tau, x_tau = sigma, x_in
        target = teacher_denoise(teacher, x_tau, tau, cfg.teacher_steps, text, pooled, empty, scale,
                                 cfg.guidance_interval)
    loss = (x0 - target).pow(2).mean()
    return loss, {"inputs": x_in, "sigma": sigma, "x0": x0, "target": target, "tau": tau}


# --------------------------------------------------------------------------- training
def train_flash(pipe: Any, out: str | Path, cfg: FlashConfig, progress: bool = True,
                stop_after: int | None = None) -> dict:
    """Train (or resume) an Imagine Flash student of the teacher pipeline ``pipe`` (a ``ShapesPipeline``:
    transformer, frozen MiniLM, VAE for the forward ablation); returns the log and the EMA student.
    Checkpoints (atomic) go to ``out/checkpoints``; each step's batch depends only on the seed and the step,
    so a resumed run continues the same sequence."""
    from ..pipelines.shapes import encode_text

    cfg.check()
    teacher = pipe.transformer
    scale = float(pipe.default_guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale)
    empty = tuple(t.float() for t in encode_text(pipe.text_encoder, pipe.tokenizer, [""], warn=False))

    def loss(student: FlashStudent, step: int, gen: torch.Generator) -> torch.Tensor:
        return flash_loss(student, teacher, flash_batch(pipe, step, cfg, gen), cfg, empty, scale)[0]

    what = f"Imagine Flash {'backward' if cfg.backward else 'forward'}{' + SRL' if cfg.srl else ''}"
    student = FlashStudent(teacher, cfg.step_counts)
    if cfg.init is not None:
        init_weights(student, cfg.init, weights_hash(pipe.vae))
    log = train_student(student, out, cfg, loss, what, progress, stop_after)
    return {**log, "guidance_scale": scale}


def init_weights(student: FlashStudent, folder: str | Path, vae_hash: str) -> None:
    """Load the weights of the Imagine Flash student in ``folder`` (a path or ``shapes-flash``) into ``student``
    (``--init``: a second training stage, as the shipped student's floor on the SRL shift after its first
    stage); it must have been distilled in the latent space of the VAE whose :func:`hasten.plans.weights_hash`
    is ``vae_hash``."""
    init_student(student, folder, FLASH_CONFIG, "Imagine Flash", vae_hash, lambda cfg: None
                 if cfg.get("method") == "imagine-flash" else "not an Imagine Flash student of this teacher")


# --------------------------------------------------------------------------- saving, loading, sampling
def save_flash(student: FlashStudent, folder: str | Path, base: str, meta: dict) -> Path:
    """``folder/flash_config.json`` (base model, step counts and their schedules, ``meta``: it must hold
    ``base_vae`` and ``guidance_scale``) and ``folder/student.safetensors`` in float16, like the base model's
    weights (:func:`save_student`)."""
    cfg = {"method": "imagine-flash", "base": base, "step_counts": list(student.step_counts),
           "sigmas": {str(k): student_sigmas(k) for k in student.step_counts}, **meta}
    return save_student(student, folder, FLASH_CONFIG, cfg, torch.float16)


def load_flash(folder: str | Path) -> StudentPipeline:
    """A :class:`ShapesFlashPipeline` from a folder written by :func:`save_flash` (base model loaded by name)."""

    def build(base: Any, cfg: dict) -> FlashStudent:
        try:
            counts = [int(k) for k in cfg["step_counts"]]
        except (KeyError, TypeError, ValueError) as e:
            raise HastenError(f"cannot load the Imagine Flash student in {folder}: bad step_counts ({e})") from None
        return FlashStudent(base.transformer, counts)

    return load_student(folder, FLASH_CONFIG, "Imagine Flash", build, ShapesFlashPipeline)


class ShapesFlashPipeline(StudentPipeline):
    """The ``shapes`` pipeline sampling with an Imagine Flash student: same call signature, 1 to 3 steps
    (``num_steps``, the largest, by default), guidance distilled in
    (:class:`hasten.distill.student.StudentPipeline`). No noise correction: for this velocity model it is
    the identity (module docstring)."""

    method = "Imagine Flash"

    def sample_latents(self, noise: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, steps: int
                       ) -> torch.Tensor:
        return self.student.sample(noise, text, pooled, steps=steps)
