"""ARD: autoregressive distillation of a diffusion transformer (Kim et al., CVPR 2025, arXiv 2504.11295).

A K-step student predicts the teacher's ODE trajectory at K kept points (see
:mod:`hasten.distill.trajectories`: states x_{sigma_0} = noise, ..., x_{sigma_K} = the final latent).
Step distillation gives student step d only its current input x_{sigma_d}; ARD gives it the whole
history x_{sigma_0..d}, which the paper shows mitigates exposure bias and carries coarse information.

The student is the teacher's ``SD3Transformer2DModel`` (weights copied) with:

- **history groups in one sequence**: group d is one full teacher sequence (its image tokens and its own
  copy of the text tokens) for input x_{sigma_d}; groups are laid out as extra rows during the
  per-token work, so every group gets its **own token-wise time embedding** ``time_text_embed(1000
  sigma_d, pooled)`` (SD3's adaLN conditioning is per sequence; per group is per token of the joint
  sequence);
- **block-causal attention across groups in the lower N blocks** (``layers_with_history``): a query of
  group d attends to the keys of groups <= d (image and text tokens); the upper blocks attend within
  their group, i.e. they are the teacher's blocks unchanged. N = 0 is plain step distillation: K
  independent passes of one network;
- **one output head per step** (the teacher's ``norm_out`` + ``proj_out``, copied K times);
- the head predicts a velocity and the group's output state is the Euler jump
  ``x_{sigma_{d+1}} = x_{sigma_d} + (sigma_{d+1} - sigma_d) v_d``, so the freshly built student is the
  teacher (conditional branch) taking K big Euler steps: a tested, sensible initialisation;
- ``convention="x0"``, the public re-implementation's (Talpa-Grigory/ARD, ``predx0``; the paper speaks of
  the "denoised samples" a student reads): group 0 reads the noise, group d > 0 the teacher's guided
  x0-prediction at the kept state d (:func:`hasten.distill.trajectories.teacher_x0_predictions`), and each
  group predicts the next one (the last group the final latent) as the teacher's x0 formula at the group's
  time label l_d, ``x0_{d+1} = input_d - l_d v_d``, with l_0 = 1 (the fresh group 0 is the teacher's
  x0-prediction from the noise) and l_d = sigma_d / 8 for d > 0 (X0_LABEL_SCALE): the fresh later groups read
  their input, a clean prediction, as nearly clean, which keeps them within a few percent of the identity
  (measured on 32 ``shapes`` trajectories: reading it at sigma_d instead makes the fresh group 1 24x worse
  than copying its input); the labels still differ per group, as the re-implementation's t, 3t/4, t/2, t/4
  do. The re-implementation regresses its raw head output from an epsilon teacher over 300k steps, which we
  cannot afford: this residual form starts near the answer. The difference that matters: a state
  determines the teacher's next state (its ODE is deterministic), so under the state convention the history
  can only repeat what the input holds, which is what ``benchmarks/ard_shapes`` measured; an x0-prediction
  has lost the noise, which group 0 (the noise itself) and the earlier predictions still carry, so there the
  history holds information the input lacks and step distillation (N = 0) has to do without it. Measured on
  ``shapes`` at stage 1's budget (``benchmarks/ard_shapes/x0_convention``): 7.5 adherence points below the
  state convention, and ARD no better than N = 0 there either; the state convention stays the default;
- **inference in K sequential passes** with a KV cache in the lower N blocks (each pass computes only
  its own group); it reproduces the teacher-forced masked pass fed with its own predictions.

An option beyond the paper, ``history_gate``: opening the lower blocks to earlier groups changes their
attention at initialisation (on ``shapes``, the fresh N = 2 student's teacher-forced loss on steps 2-4 is
1.39-1.45x the fresh N = 0 one's), and at our training budget ARD never recovered from it (its later steps'
loss stays 11-23% above N = 0's, ``benchmarks/ard_shapes/history_use``). With the gate, each history head
mixes two attention distributions, ``(1 - g) softmax(own group) + g softmax(own and earlier groups)``
(:func:`gated_attention`), with a learned g per block and head in [0, 1], zero at initialisation: the
fresh student is step distillation (N = 0) and training opens a head's history while its gradient asks for
it (the zero-initialised gating Flamingo and ControlNet use to add a pathway to a pretrained network; g is
clamped, so a gate pushed below 0 gets no gradient and stays shut). g = 1 is the paper's block-causal
attention. It costs no matrix products beyond the paper's (the mixing is elementwise). Measured on
``shapes`` (``benchmarks/ard_gate.py``): opening any head raises the fresh student's loss, the optimiser
shut every gate and the run became step distillation; the option stays for models where history may pay.

Training (teacher-forced, the paper's objective): the groups' inputs are the teacher's states
x_{sigma_0..K-1}; loss = mean over d of MSE(x_{sigma_d} + (sigma_{d+1} - sigma_d) v_d, x^teacher_{sigma_{d+1}})
(x0 convention: the inputs and targets of :meth:`ARDStudent.teacher_forced`, the same mean of per-step MSEs).
AdamW, gradient clipping at 1, EMA of the weights (the paper's recipe); the paper's GAN fine-tune is
``--gan-weight`` (:mod:`hasten.distill.ard_gan`).
The guidance of the teacher (CFG) is distilled in: the student runs one branch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HastenError
from .student import StudentPipeline, init_student, load_student, save_student, train_student

ARD_CONFIG = "ard_config.json"


GATE_GAIN = 50.0  # g = clamp(GATE_GAIN * parameter, 0, 1): see ARDStudent.history_gates
X0_LABEL_SCALE = 1 / 8  # x0 convention: group d > 0 reads its input at the time label sigma_d / 8 (module docstring)


def gated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor | None,
                    own: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Attention (B, H, Lq, hd) whose weights per head h are ``(1 - g_h) softmax(s | own) + g_h softmax(s | seen)``,
    s = q k^T / sqrt(hd), ``softmax(s | m)`` the softmax over the keys the boolean (Lq, Lk) mask m allows:
    ``own`` the query's own group, ``seen`` its own and earlier groups (None: every key). g = 0 attends within
    the group (step distillation), g = 1 is ARD's block-causal attention; both are distributions, so is the mix."""
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    p_own = s.masked_fill(~own, float("-inf")).softmax(-1)
    p_seen = (s if seen is None else s.masked_fill(~seen, float("-inf"))).softmax(-1)
    g = gate.view(1, -1, 1, 1).to(p_own.dtype)
    return (p_own + g * (p_seen - p_own)).to(v.dtype) @ v


def block_causal_mask(groups: int, tokens: int, history: bool = True) -> torch.Tensor:
    """(groups * tokens)^2 boolean attention mask, True where a query may attend to a key: query of group
    d sees keys of groups <= d (``history``) or of group d only (block-diagonal)."""
    g = torch.arange(groups).repeat_interleave(tokens)
    return (g[:, None] >= g[None, :]) if history else (g[:, None] == g[None, :])


class HistoryAttention:
    """Attention processor of a lower block: SD3's joint attention (diffusers' ``JointAttnProcessor2_0``,
    same projections and norms) across history groups.

    Teacher-forced (``cache is None``): the rows of the batch are (sample, group) pairs, ``groups`` per
    sample; each sample's groups are joined into one sequence under :func:`block_causal_mask`.
    Cached (``start_cache``): one group per call; its keys and values are appended to the cache and its
    queries attend to every cached group and itself (the same as the mask for the newest group).
    With ``gate`` (per head, set by a gated :class:`ARDStudent` before each pass): :func:`gated_attention`.
    """

    def __init__(self) -> None:
        self.groups = 1
        self.cache: list[torch.Tensor] | None = None
        self.cached_groups = 0
        self.gate: torch.Tensor | None = None

    def start_cache(self) -> None:
        self.cache, self.cached_groups = [], 0

    def stop_cache(self) -> None:
        self.cache, self.cached_groups = None, 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor | None,
               own: torch.Tensor) -> torch.Tensor:
        """SDPA over the keys ``seen`` allows (None: all), or :func:`gated_attention` when gated."""
        if self.gate is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=seen)
        return gated_attention(q, k, v, seen, own, self.gate)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        rows, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(rows, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck, cv = split(attn.add_k_proj(encoder_hidden_states)), split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        length, hd = q.shape[2], q.shape[3]
        if self.cache is not None:  # one group; attend to every earlier group and itself
            if self.cache:
                k, v = torch.cat([self.cache[0], k], 2), torch.cat([self.cache[1], v], 2)
            self.cache[:] = [k, v]
            self.cached_groups += 1
            own = (torch.arange(k.shape[2], device=q.device) >= k.shape[2] - length).expand(length, -1)
            out = self.attend(q, k, v, None, own)
        else:
            g = self.groups
            if rows % g:
                raise HastenError(f"{rows} rows are not whole samples of {g} groups")

            def join(t: torch.Tensor) -> torch.Tensor:  # (B g, H, L, hd) -> (B, H, g L, hd)
                return t.view(rows // g, g, heads, length, hd).transpose(1, 2).reshape(rows // g, heads, g * length, hd)

            seen = block_causal_mask(g, length).to(q.device)
            own = block_causal_mask(g, length, history=False).to(q.device)
            out = self.attend(join(q), join(k), join(v), seen, own)
            out = out.view(rows // g, heads, g, length, hd).transpose(1, 2).reshape(rows, heads, length, hd)
        out = out.transpose(1, 2).reshape(rows, length, heads * hd).to(q.dtype)
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](img)), ctx


class ARDStudent(nn.Module):
    """The K-step ARD student built from a teacher ``SD3Transformer2DModel``; see the module docstring.

    ``sigmas``: the K + 1 kept noise levels, from 1 (noise) to 0 (the final latent). ``convention``: what the
    groups read and predict, ``"state"`` (the states x_{sigma_d}) or ``"x0"`` (x0-predictions; module
    docstring). ``history_gate``: the
    lower blocks' history attention is gated (module docstring), with ``history_gates`` (N, heads), zero at
    initialisation; g = clamp(GATE_GAIN * parameter, 0, 1). The gain is there because AdamW moves a
    parameter by about lr per step: a bare gate would open by at most 0.2 in 1000 steps at lr 2e-4.
    """

    def __init__(self, teacher: nn.Module, sigmas: Sequence[float], layers_with_history: int,
                 history_gate: bool = False, convention: str = "state"):
        super().__init__()
        check_space("--convention", convention)
        layers = len(teacher.transformer_blocks)
        if not 0 <= layers_with_history <= layers:
            raise HastenError(f"--layers-with-history must be in [0, {layers}], got {layers_with_history}")
        if len(sigmas) < 2:
            raise HastenError("an ARD student needs at least 2 kept noise levels (1 step)")
        s = torch.as_tensor(list(sigmas), dtype=torch.float32)
        if not (s[0] <= 1 and s[-1] >= 0 and bool((s[1:] < s[:-1]).all())):
            raise HastenError(f"the kept noise levels must decrease within [0, 1], got {s.tolist()}")
        self.transformer = copy.deepcopy(teacher)
        self.register_buffer("sigmas", torch.as_tensor(list(sigmas), dtype=torch.float32), persistent=False)
        labels = s[:-1].clone()  # the time label each group reads its input at
        if convention == "x0":
            labels[1:] *= X0_LABEL_SCALE
        self.register_buffer("labels", labels, persistent=False)
        self.steps = len(sigmas) - 1
        self.layers_with_history = layers_with_history
        self.convention = convention
        self.head_norms = nn.ModuleList(copy.deepcopy(self.transformer.norm_out) for _ in range(self.steps))
        self.head_projs = nn.ModuleList(copy.deepcopy(self.transformer.proj_out) for _ in range(self.steps))
        self.history = [HistoryAttention() for _ in range(layers_with_history)]
        for block, proc in zip(self.transformer.transformer_blocks, self.history):
            block.attn.set_processor(proc)
        self.history_gate = history_gate
        if history_gate:
            heads = self.transformer.config.num_attention_heads
            self.history_gates = nn.Parameter(torch.zeros(layers_with_history, heads))

    def gates(self) -> torch.Tensor | None:
        """The history gates g (N, heads) in [0, 1], or None for the paper's ungated attention."""
        return (GATE_GAIN * self.history_gates).clamp(0.0, 1.0) if self.history_gate else None

    # ------------------------------------------------------------------ pieces
    def _condition(self, x: torch.Tensor, groups: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tr = self.transformer
        timestep = self.labels[groups] * 1000.0
        return tr.pos_embed(x), tr.time_text_embed(timestep, pooled), tr.context_embedder(text)

    def _blocks(self, h: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        gates = self.gates()
        for i, proc in enumerate(self.history):
            proc.gate = None if gates is None else gates[i]
        for block in self.transformer.transformer_blocks:
            ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb)
        return h

    def _head(self, d: int, h: torch.Tensor, temb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        p, c = self.transformer.config.patch_size, self.transformer.out_channels
        out = self.head_projs[d](self.head_norms[d](h, temb))
        hh, ww = size[0] // p, size[1] // p
        out = out.reshape(out.shape[0], hh, ww, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], c, hh * p, ww * p)

    # ------------------------------------------------------------------ teacher-forced (training)
    def forward(self, states: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, group: int | None = None
                ) -> torch.Tensor:
        """Velocities (B, K, C, H, W) of all K groups at once from their inputs ``states`` (B, K, C, H, W);
        with ``group``, one cached inference pass: the velocity (B, C, H, W) of that group from its input
        ``states`` (B, C, H, W) (see :meth:`sample`)."""
        if group is not None:
            if any(proc.cache is None for proc in self.history):
                raise HastenError("a single-group pass reads the KV cache of the earlier groups: "
                                  "use sample() or kv_cache()")
            if any(proc.cached_groups != group for proc in self.history):
                raise HastenError(f"pass {group} needs the KV cache of groups 0..{group - 1} exactly, in order; "
                                  f"the cache holds {self.history[0].cached_groups} groups")
            ids = torch.full((states.shape[0],), group, device=states.device, dtype=torch.long)
            h, temb, ctx = self._condition(states, ids, text, pooled)
            return self._head(group, self._blocks(h, ctx, temb), temb, states.shape[-2:])
        b, k = states.shape[:2]
        if k != self.steps:
            raise HastenError(f"the student has {self.steps} groups, got {k} input states")
        groups = torch.arange(k, device=states.device).repeat(b)
        h, temb, ctx = self._condition(states.flatten(0, 1), groups, text.repeat_interleave(k, 0),
                                       pooled.repeat_interleave(k, 0))
        for proc in self.history:
            proc.groups, proc.cache = k, None
        try:
            h = self._blocks(h, ctx, temb)
        finally:  # a plain call of the transformer afterwards is one group per sample again
            for proc in self.history:
                proc.groups = 1
        h, temb = h.view(b, k, *h.shape[1:]), temb.view(b, k, -1)
        return torch.stack([self._head(d, h[:, d], temb[:, d], states.shape[-2:]) for d in range(k)], 1)

    def step_sizes(self) -> torch.Tensor:
        return self.sigmas[1:] - self.sigmas[:-1]

    def teacher_forced(self, states: torch.Tensor, x0: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The groups' teacher-forced inputs and targets (each (B, K, C, H, W)) from the teacher's kept states
        ``states`` (B, K + 1, ...) and, for the x0 convention, its x0-predictions ``x0`` (B, K, ...): the states
        and the next states, or (the noise, x0_1 .. x0_{K-1}) and (x0_1 .. x0_{K-1}, the final latent)."""
        if self.convention == "state":
            return states[:, :-1], states[:, 1:]
        if x0 is None:
            raise HastenError("an x0-convention student's inputs and targets are the teacher's x0-predictions: "
                              "pass x0")
        return torch.cat([states[:, :1], x0[:, 1:]], 1), torch.cat([x0[:, 1:], states[:, -1:]], 1)

    def loss(self, states: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
             inputs: torch.Tensor | None = None, space: str = "state", x0: torch.Tensor | None = None,
             outputs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Mean over the K steps of the MSE between each group's prediction and its teacher-forced target
        (:meth:`teacher_forced`: the teacher's next state ``states[:, 1:]``, or with the x0 convention its next
        x0-prediction, ``x0`` the teacher's). The groups' inputs are the teacher's (teacher forcing), or
        ``inputs`` (B, K, ...) when given (:func:`own_history_inputs`).

        ``space="x0"`` measures each step's error on the clean image its step implies instead,
        ``x0 = x_k - sigma_k v`` (the step ``x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v`` lands on the teacher's
        state exactly when it does): the same per-step MSE times ``(sigma_k / (sigma_k - sigma_{k+1}))^2``, so
        the early, long steps weigh more (5.8, 7.9, 3.3 and 1 for ``shapes``'s kept sigmas). The public
        re-implementation (Talpa-Grigory/ARD, ``predx0``) regresses each step, with equal weights, onto the
        teacher's own x0-prediction at the kept step, which the stored states do not hold; this option gives the
        steps that x0 weighting on the states' own targets. The default stays the state (this module's convention);
        an x0-convention student's loss is on x0-predictions already, and refuses ``space="x0"``.
        ``outputs``: also return the groups' outputs (B, K, ...), whose last is the student's final latent."""
        check_space("--loss-space", space)
        if space == "x0" and self.convention == "x0":
            raise HastenError("the x0 loss space weights a state-convention student's steps; an x0-convention "
                              "student's loss is on x0-predictions already")
        x, targets = self.teacher_forced(states, x0)
        x = x if inputs is None else inputs
        out = self.next_states(x, text, pooled)
        per_step = ((out - targets) ** 2).mean(dim=(0, 2, 3, 4))
        if space == "x0":
            per_step = per_step * (self.sigmas[:-1] / self.step_sizes()) ** 2
        return (per_step.mean(), out) if outputs else per_step.mean()

    def update(self, x: torch.Tensor, v: torch.Tensor, d: int | None = None) -> torch.Tensor:
        """Group d's output from its input x and head output v: the Euler jump ``x + (sigma_{d+1} - sigma_d) v``
        (state convention) or the clean prediction ``x - l_d v`` at the group's time label (x0 convention).
        ``d=None``: all K groups, x and v (B, K, ...)."""
        coef = -self.labels if self.convention == "x0" else self.step_sizes()
        return x + (coef.view(1, -1, 1, 1, 1) if d is None else coef[d]) * v

    def next_states(self, inputs: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Each group's output from its input, all K at once (B, K, ...): :meth:`update` of the head's output."""
        return self.update(inputs, self(inputs, text, pooled))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
               return_states: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """K sequential passes (KV cache in the lower blocks): the final latent (and all K + 1 groups' inputs and
        the last output: states, or with the x0 convention the noise and the x0-predictions)."""
        x, states = noise.float(), [noise.float()]
        with self.kv_cache():
            for d in range(self.steps):
                x = self.update(x, self(x, text, pooled, group=d).float(), d)
                states.append(x)
        return (x, torch.stack(states, 1)) if return_states else x

    @contextlib.contextmanager
    def kv_cache(self) -> Iterator[None]:
        """Single-group passes (``forward(..., group=d)``) inside this block append to and read the lower blocks'
        KV cache, which starts empty and is dropped on exit."""
        for proc in self.history:
            proc.start_cache()
        try:
            yield
        finally:
            for proc in self.history:
                proc.stop_cache()


def ard_flops(student: ARDStudent, text_tokens: int, height: int, width: int) -> dict:
    """Analytic forward FLOPs per image of K passes, and ARD's extra over the N = 0 student.

    Each pass costs one teacher call (:func:`hasten.methods.flexidit.transformer_flops`; the K heads are
    the teacher's head). History adds attention only: in each of the N lower blocks, the group-d queries
    ((n + m) tokens) also attend to d earlier groups' keys, ``4 (n + m) (d (n + m)) D`` FLOPs (QK^T and AV),
    summed over d = 0..K-1.
    """
    from ..methods.flexidit import transformer_flops

    tr = student.transformer
    cfg = tr.config
    per_pass = transformer_flops(tr, height, width, text_tokens=text_tokens)["total"]
    tokens = (height // cfg.patch_size) * (width // cfg.patch_size) + text_tokens
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    extra = student.layers_with_history * sum(4 * tokens * d * tokens * dim for d in range(student.steps))
    base = student.steps * per_pass
    return {"total": base + extra, "step_distillation": base, "extra": extra, "extra_share": extra / base}


# --------------------------------------------------------------------------- training
@dataclass
class ARDConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 100
    ema_decay: float = 0.999
    layers_with_history: int = 2
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 25
    bf16_autocast: bool | None = None  # CPU bf16 matmuls where native (None: hasten.train.bf16_native); fp32 state
    own_history: float = 0.0  # share of each batch trained on the student's own history (0: the paper's recipe)
    init: str | None = None  # an ARD student folder to start from (a second training stage)
    history_gate: bool = False  # zero-initialised gates on the history attention (not the paper's; ARDStudent)
    trajectories: int | None = None  # how many the run trains on (recorded, so a resume on other data is refused)
    loss_space: str = "state"  # per-step MSE on the next state, or on the clean image each step implies ("x0")
    convention: str = "state"  # what the groups read and predict: states or x0-predictions (ARDStudent)
    gan_weight: float = 0.0  # > 0: the paper's GAN fine-tune (hasten.distill.ard_gan), lambda of the adaptive weight
    gan_start: int = 0  # GAN fine-tune: steps before the adversarial term joins (the discriminator warms up)
    gan_lr: float = 1e-3  # GAN fine-tune: the discriminator's learning rate


def check_space(option: str, value: str) -> None:
    """Refuse a ``--convention`` (what :class:`ARDStudent`'s groups read) or ``--loss-space`` (what
    :meth:`ARDStudent.loss` scores) other than the two both know, ``state`` and ``x0``, before any work."""
    if value not in ("state", "x0"):
        raise HastenError(f"{option} must be state or x0, got {value!r}")


def check_gan(weight: float, start: int, lr: float) -> None:
    """Refuse GAN fine-tune settings :class:`hasten.distill.ard_gan.ARDGan` cannot run (before any work)."""
    if weight < 0 or start < 0 or not lr > 0:
        raise HastenError("--gan-weight and --gan-start must be >= 0 and --gan-lr > 0")


def own_history_inputs(student: ARDStudent, states: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                       rows: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
    """The groups' inputs (B, K, ...) with the samples ``rows`` (bool, B) on the student's own history.

    An extension, not the paper's recipe (which is teacher-forced, ``own_history=0``): at inference every
    group's input and history are the student's own states, in training the teacher's, and the gap
    compounds over the K steps (exposure bias; measured by ``benchmarks/ard_steps.py``). For the chosen
    rows, the student samples its own states from the trajectory's noise without gradient (K cached passes,
    as at inference); the targets stay the teacher's next states on the same noise, so each step learns to
    bring the student's state back onto the teacher's trajectory (DAgger-style, with the trajectory the
    expert gives for that noise). Group 0's input is the noise either way. Measured on ``shapes-ard4`` (400
    more steps at 0.5 against the same fine-tune teacher-forced, ``benchmarks/ard_shapes/own_history``): no
    adherence gain, FD-shapes slightly worse; the shipped student is teacher-forced.
    """
    inputs = student.teacher_forced(states, x0)[0].clone()
    if rows.any():
        _, own = student.sample(states[rows, 0], text[rows], pooled[rows], return_states=True)
        inputs[rows, 1:] = own[:, 1:-1].to(inputs.dtype)
    return inputs


def train_ard(teacher: nn.Module, data: dict, out: str | Path, cfg: ARDConfig, progress: bool = True,
              stop_after: int | None = None, vae_hash: str | None = None, real: dict | None = None) -> dict:
    """Train (or resume) the student on ``data`` (:func:`load_trajectories`); returns the log and the EMA
    student. Checkpoints (atomic) go to ``out/checkpoints``; each step's batch depends only on the seed
    and the step, so a resumed run continues the same sequence. ``cfg.gan_weight > 0`` adds the paper's GAN
    fine-tune (:mod:`hasten.distill.ard_gan`) with the real latents and captions ``real``
    (:func:`hasten.train_shapes.load_data`)."""
    sigmas = data["sigmas"].tolist()
    n = data["states"].shape[0]
    if not 0.0 <= cfg.own_history <= 1.0:
        raise HastenError(f"--own-history must be in [0, 1], got {cfg.own_history}")
    check_space("--loss-space", cfg.loss_space)
    check_space("--convention", cfg.convention)
    if cfg.convention == "x0" and "x0" not in data:
        raise HastenError("--convention x0 trains on the teacher's x0-predictions: these trajectories hold none "
                          "(run hasten distill add-x0 on the folder)")
    if cfg.trajectories not in (None, n):
        raise HastenError(f"the config says {cfg.trajectories} trajectories, the data holds {n}")
    check_gan(cfg.gan_weight, cfg.gan_start, cfg.gan_lr)
    if cfg.gan_weight > 0 and real is None:
        raise HastenError("the GAN fine-tune needs real latents (train_ard(..., real=load_data(...)))")

    def loss(student: ARDStudent, step: int, gen: torch.Generator) -> torch.Tensor:
        rows = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        states, text, pooled = data["states"][rows].float(), data["text"][rows].float(), data["pooled"][rows].float()
        x0 = data["x0"][rows].float() if cfg.convention == "x0" else None
        own = torch.rand(cfg.batch_size, generator=gen) < cfg.own_history
        inputs = own_history_inputs(student, states, text, pooled, own, x0) if cfg.own_history > 0 else None
        if gan is None:
            return student.loss(states, text, pooled, inputs, space=cfg.loss_space, x0=x0)
        mse, out = student.loss(states, text, pooled, inputs, space=cfg.loss_space, x0=x0, outputs=True)
        return gan.student_loss(mse, out[:, -1], text, pooled, student.head_projs[-1].weight, step)

    student = ARDStudent(teacher, sigmas, cfg.layers_with_history, cfg.history_gate, cfg.convention)
    if cfg.init is not None:
        if vae_hash is None:
            raise HastenError("--init needs the teacher's VAE hash (train_ard(..., vae_hash=...))")
        start_from(student, cfg.init, vae_hash)
    gan = None
    if cfg.gan_weight > 0:
        from .ard_gan import ARDGan, GANConfig

        gan = ARDGan(teacher, real, GANConfig(cfg.gan_weight, cfg.gan_start, cfg.gan_lr), cfg.seed, cfg.log_every)
    log = train_student(student, out, cfg, loss, f"ARD N={cfg.layers_with_history}", progress, stop_after,
                        extra=None if gan is None else {"gan": gan})
    if gan is not None:  # the logged loss is MSE + w L_G; the parts, and the discriminator's loss
        log["gan_curve"] = gan.curve
    return {**log, "samples": n, "sigmas": sigmas}


def start_from(student: ARDStudent, folder: str | Path, vae_hash: str) -> None:
    """Load the weights of the ARD student in ``folder`` (an embedded name such as ``shapes-ard4`` or a path)
    into ``student`` (:func:`hasten.distill.student.init_student`: distilled in the latent space of the VAE
    ``vae_hash``); one with other kept noise levels or another N is refused."""
    ours = student.sigmas.cpu()

    def check(cfg: dict) -> str | None:
        theirs = torch.tensor(cfg.get("sigmas", []), dtype=torch.float32)
        gated, convention = bool(cfg.get("history_gate", False)), cfg.get("convention", "state")
        if theirs.shape == ours.shape and torch.allclose(theirs, ours) and convention == student.convention and \
                cfg.get("layers_with_history") == student.layers_with_history and gated == student.history_gate:
            return None
        return (f"kept sigmas {theirs.tolist()}, N = {cfg.get('layers_with_history')}, history gate {gated}, "
                f"convention {convention} there; this run has {ours.tolist()}, N = {student.layers_with_history}, "
                f"history gate {student.history_gate}, convention {student.convention}")

    init_student(student, folder, ARD_CONFIG, "ARD", vae_hash, check)


# --------------------------------------------------------------------------- saving, loading, sampling
def save_ard(student: ARDStudent, folder: str | Path, base: str, meta: dict) -> Path:
    """``folder/ard_config.json`` (base model, kept sigmas, N, ``meta``: it must hold ``base_vae``) and
    ``folder/student.safetensors`` in float16, like the base model's weights (:func:`save_student`)."""
    cfg = {"base": base, "sigmas": student.sigmas.tolist(), "steps": student.steps,
           "layers_with_history": student.layers_with_history, "history_gate": student.history_gate,
           "convention": student.convention, **meta}
    return save_student(student, folder, ARD_CONFIG, cfg, torch.float16)


def load_ard(folder: str | Path) -> StudentPipeline:
    """A :class:`ShapesARDPipeline` from a folder written by :func:`save_ard` (base model loaded by name)."""
    def build(base: Any, cfg: dict) -> ARDStudent:
        try:
            sigmas, layers = [float(s) for s in cfg["sigmas"]], int(cfg["layers_with_history"])
        except (KeyError, TypeError, ValueError) as e:
            raise HastenError(f"cannot load the ARD student in {folder}: bad sigmas or layers_with_history "
                              f"({e})") from None
        return ARDStudent(base.transformer, sigmas, layers, bool(cfg.get("history_gate", False)),
                          str(cfg.get("convention", "state")))

    return load_student(folder, ARD_CONFIG, "ARD", build, ShapesARDPipeline)


class ShapesARDPipeline(StudentPipeline):
    """The ``shapes`` pipeline sampling with an ARD student: same call signature, K steps, guidance
    distilled in (:class:`hasten.distill.student.StudentPipeline`)."""

    method = "ARD"

    def sample_latents(self, noise: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, steps: int
                       ) -> torch.Tensor:
        return self.student.sample(noise, text, pooled)
