"""Adaptive Guidance (AG) and LinearAG (Castillo et al., "Adaptive Guidance: Training-free Acceleration of
Conditional Diffusion Models", arXiv 2312.12487): cut the unconditional denoiser calls of classifier-free
guidance.

Classifier-free guidance combines two predictions per sample and step,

    eps_cfg = eps(x_t, null) + s (eps(x_t, c) - eps(x_t, null)),                        (CFG)

and every diffusers-style pipeline computes both in ONE transformer call on a doubled batch. hasten
intercepts that call, so the user changes nothing in the pipeline.

**AG.** Per sample and denoiser call, gamma_t = cos(eps(x_t, c), eps(x_t, null)) (flattened). While
gamma_t < gamma_bar the sample is guided; once gamma_t >= gamma_bar at call j, the sample is switched:
from call j + 1 on, its unconditional row is no longer sent to the transformer (the batch shrinks) and it
uses its conditional prediction only (sticky: gamma cannot be measured without eps(x_t, null)). The call
j that measured gamma has already paid for both rows, so it keeps its guided output. A sample whose last
guided call is j = k - 1 therefore costs 2k + (T - k) rows over T calls.

**Which gamma, which threshold.** The paper computes gamma on the network's output, the noise
prediction of an epsilon-prediction LDM, and uses gamma_bar = 0.991 there (swept 0.991-0.996;
about 25 % of NFEs saved at 20 steps). hasten computes gamma on the transformer's output as well,
whatever it predicts (velocity for flow-matching models). A fixed number does not transfer: on
velocity models gamma starts near 0.97 and saturates near 0.997 (the digits model at guidance 3), so
0.991 switches after a few calls and changes the image a lot (26 dB against CFG). Two alternatives
were considered. The epsilon estimates eps = x + (1 - sigma) v of both branches are dominated by the
shared x at high noise, so their cosine is near 1 from the first call and would switch at once (by
construction; a third-party SDXL node reports the same in epsilon space). The clean-image estimates
(x0 = x - sigma v, what that node uses) we measured on digits at guidance 3, 40 samples: their cosine
spans a wider range, but at equal NFE AG on it was as good at 65 NFE and about 2 dB worse at 74 NFE
than AG on the model output. So the quantity stays the paper's (the model output) and the *threshold* is chosen
per model and guidance scale by calibration (:func:`calibrate_ag`): the smallest gamma_bar whose
AG images stay within a PSNR target (default 35 dB) of the CFG images on calibration conditions.
``AdaptiveGuidance()`` without a threshold uses the plan shipped with the model for the run's
guidance scale (``<model folder>/plans/ag-*.json``) and says so clearly when there is none.

**Exactness trick.** For a switched sample the pipeline's own guidance formula still runs: hasten returns
the conditional output in the unconditional slot, so u + s (c - u) = c + s * 0 = c exactly. The pipelines
covered here use exactly (CFG) (no guidance rescale), so this is bitwise the conditional prediction.

**LinearAG.** In the first half of the calls (j < T // 2) real CFG calls (even j) alternate with calls
(odd j) where eps(x_t, null) is not computed but regressed on past and present estimates (1 row per sample):

    eps_hat(x_j, null) = b0 eps(x_j, c) + b1 eps(x_{j-1}, c) + b2 eps(x_{j-1}, null) + b3,      (LinearAG)

with scalar coefficients b^(j) per regressed call, fitted by ordinary least squares over every element of
>= 200 full-CFG trajectories. The second half runs AG (AG's switch is also allowed on the first half's real
calls). Choice of regressors (the paper says "affine transformations of past score estimates"; the exact
lags are not stated in the material we could read): the conditional and unconditional estimates of the
previous (real) call are the paper's "past score estimates"; we add the current conditional estimate
because it is computed at this call anyway (free) and is by far the most correlated with the target, and
an intercept because the paper speaks of *affine* maps. One scalar per regressor keeps the fit cheap,
well-posed (N * D rows, 4 unknowns) and model-size independent.

**Separate branch calls.** Pipelines that call the transformer once per branch inside diffusers'
``cache_context("cond")`` / ``("uncond")`` (Wan, Flux with ``true_cfg_scale``, QwenImage,
HunyuanVideo) are handled per step: the conditional call runs and its prediction is kept; the
unconditional call sends only the samples still guided, and is skipped outright once every sample
has switched (the kept conditional prediction is returned in its place, so the pipeline's formula
gives c exactly). This needs the conditional call first, as those pipelines make it.

Covered pipelines (batch layout, see ``LAYOUTS``; subclasses too): hasten's ``HastenPipeline`` ([uncond; cond]),
diffusers ``DiTPipeline`` ([cond; uncond], learned sigma), ``PixArtAlphaPipeline``,
``PixArtSigmaPipeline`` and ``StableDiffusion3Pipeline`` ([uncond; cond], negative prompts in the
unconditional half). SD3's skip-layer guidance calls are single-branch calls and pass through unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import HastenError
from ..hooks import SEPARATE_BRANCHES, attach, is_batched_guidance, select_rows
from ..plans import check_call_timestep, check_plan, check_run, load_plan, new_plan, same_guidance, shipped_plans

# --------------------------------------------------------------------------- batch layouts


@dataclass(frozen=True)
class GuidanceLayout:
    """How a pipeline lays out its guidance batch of 2B rows (B samples)."""

    pipeline: str
    uncond_first: bool  # rows [uncond; cond] (most pipelines) or [cond; uncond] (diffusers DiTPipeline)
    null_label: int | None = None  # class-label models: the class id of the unconditional half
    learned_sigma: bool = False  # output has 2C channels; gamma uses the first C (the prediction)
    separate: bool = False  # the branches are separate calls in cache_context("cond") / ("uncond")
    unit_time: bool = False  # the transformer gets t / 1000, in [0, 1] (Flux, QwenImage), not t in [0, 1000]

    def halves(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uncond row indices, cond row indices) into the guidance batch, each of length b."""
        first, second = torch.arange(b), torch.arange(b, 2 * b)
        return (first, second) if self.uncond_first else (second, first)


LAYOUTS: dict[str, dict[str, Any]] = {
    "HastenPipeline": {"uncond_first": True},
    "DiTPipeline": {"uncond_first": False},
    "PixArtAlphaPipeline": {"uncond_first": True},
    "PixArtSigmaPipeline": {"uncond_first": True},
    "StableDiffusion3Pipeline": {"uncond_first": True},
    "ShapesPipeline": {"uncond_first": True},
    "LTXPipeline": {"uncond_first": True},
    # one call per branch, the conditional first, inside cache_context("cond") / ("uncond")
    "WanPipeline": {"uncond_first": True, "separate": True},
    "FluxPipeline": {"uncond_first": True, "separate": True, "unit_time": True},
    "QwenImagePipeline": {"uncond_first": True, "separate": True, "unit_time": True},
    "HunyuanVideoPipeline": {"uncond_first": True, "separate": True},
}


def layout_for(pipe: Any) -> GuidanceLayout:
    """The guidance layout of a supported pipeline (hasten's or a covered diffusers pipeline)."""
    name = next((c.__name__ for c in type(pipe).__mro__ if c.__name__ in LAYOUTS), None)  # or a subclass
    if name is None:
        raise HastenError(f"guidance methods do not know how {type(pipe).__name__} batches classifier-free "
                          f"guidance; supported pipelines: {', '.join(LAYOUTS)}; for another pipeline that "
                          "batches [uncond; cond] pass uncond_first=True")
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise HastenError(f"{name} has no transformer to intercept")
    if getattr(pipe, "transformer_2", None) is not None:  # Wan 2.2: the second expert runs the low-noise steps
        raise HastenError(f"guidance methods intercept pipe.transformer only, and this {name} has a second expert "
                          "(transformer_2) that would run its steps with full guidance, uncounted")
    cfg = transformer.config
    null = None
    if name == "HastenPipeline":
        null = int(pipe.null_class)
    elif name == "DiTPipeline":
        null = int(cfg.num_embeds_ada_norm)
    out_ch = getattr(cfg, "out_channels", None)
    in_ch = getattr(cfg, "in_channels", None)
    learned = out_ch is not None and in_ch is not None and out_ch == 2 * in_ch
    return GuidanceLayout(name, null_label=null, learned_sigma=learned, **LAYOUTS[name])


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The transformer's latent input: the first positional argument or ``hidden_states=``."""
    x = args[0] if args else kwargs.get("hidden_states")
    if not torch.is_tensor(x):
        raise HastenError("cannot find the transformer's hidden_states input to intercept")
    return x


def is_guidance_call(layout: GuidanceLayout, args: tuple, kwargs: dict) -> bool:
    """True when this transformer call carries a guidance batch: an even batch whose two halves of the
    latent input are identical (every covered pipeline builds it as ``cat([latents] * 2)``) and, for
    class-label models, whose unconditional half holds the null class."""
    x = hidden_states_of(args, kwargs)
    if not is_batched_guidance(x):
        return False
    n = x.shape[0]
    if layout.null_label is not None:
        labels = kwargs.get("class_labels", args[2] if len(args) > 2 else None)
        if not torch.is_tensor(labels) or labels.shape[0] != n:
            return False
        uncond, _ = layout.halves(n // 2)
        return bool((labels[uncond] == layout.null_label).all())
    return True


# --------------------------------------------------------------------------- plain tensor functions


def cosine_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gamma_i = <a_i, b_i> / (|a_i| |b_i|) over each sample's flattened prediction (float64, (B,))."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def rows_to_send(need_uncond: torch.Tensor, layout: GuidanceLayout) -> torch.Tensor:
    """Sorted indices into the 2B guidance batch: every conditional row plus the unconditional rows of
    the samples in ``need_uncond`` (bool, (B,))."""
    b = need_uncond.shape[0]
    uncond, cond = layout.halves(b)
    return torch.cat([uncond[need_uncond.cpu()], cond]).sort().values


def unwrap_output(out: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """(prediction tensor, rebuild) for a transformer output: a tensor, a tuple or a ``*.sample`` object."""
    if torch.is_tensor(out):
        return out, lambda t: t
    if isinstance(out, tuple):
        return out[0], lambda t: (t, *out[1:])
    if hasattr(out, "sample") and dataclasses.is_dataclass(out):
        def rebuild(t: torch.Tensor) -> Any:
            values = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
            values["sample"] = t
            return type(out)(**values)
        return out.sample, rebuild
    raise HastenError(f"cannot read the transformer output of type {type(out).__name__}")


def scatter_rows(sub: torch.Tensor, sent: torch.Tensor, n: int) -> torch.Tensor:
    """A (n, ...) tensor whose rows ``sent`` are ``sub``; the other rows are filled later by the caller."""
    full = sub.new_empty((n, *sub.shape[1:]))
    full[sent.to(sub.device)] = sub
    return full


def ag_switch(switched: torch.Tensor, measured: torch.Tensor, gamma: torch.Tensor,
              threshold: float) -> torch.Tensor:
    """AG's sticky switch: a measured sample switches once gamma >= threshold; switched samples stay."""
    return switched | (measured & (gamma >= threshold))


def regressed_calls(total_calls: int) -> list[int]:
    """LinearAG's regressed calls: the odd calls of the first half, j = 1, 3, ... < T // 2."""
    return list(range(1, total_calls // 2, 2))


REGRESSORS = ("cond", "cond_prev", "uncond_prev", "one")


def linear_ag_design(cond: torch.Tensor, cond_prev: torch.Tensor, uncond_prev: torch.Tensor) -> torch.Tensor:
    """The (N * D, 4) design matrix of (LinearAG) with columns ``REGRESSORS``, in float64."""
    cols = [cond.flatten().double(), cond_prev.flatten().double(), uncond_prev.flatten().double()]
    cols.append(torch.ones_like(cols[0]))
    return torch.stack(cols, 1)


def regress_uncond(beta: Sequence[float], cond: torch.Tensor, cond_prev: torch.Tensor,
                   uncond_prev: torch.Tensor) -> torch.Tensor:
    """eps_hat(x_j, null) = b0 eps_c(j) + b1 eps_c(j-1) + b2 eps_null(j-1) + b3, in the prediction dtype."""
    b0, b1, b2, b3 = (float(v) for v in beta)
    out = b0 * cond.double() + b1 * cond_prev.double() + b2 * uncond_prev.double() + b3
    return out.to(cond.dtype)


class NormalEquations:
    """Streaming ordinary least squares: accumulate X^T X and X^T y in float64, then solve
    beta = argmin ||X beta - y||^2 = (X^T X)^-1 X^T y (via lstsq on the small system, robust when
    X^T X is near-singular)."""

    def __init__(self, k: int):
        self.k = k
        self.xtx: torch.Tensor | None = None  # on the device of the data (created by the first ``add``)
        self.xty: torch.Tensor | None = None
        self.yty = 0.0
        self.ysum = 0.0
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.flatten().double()
        if self.xtx is None:
            self.xtx = x.new_zeros(self.k, self.k)
            self.xty = x.new_zeros(self.k)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yty = self.yty + (y @ y)  # tensors on the data's device: no sync per call
        self.ysum = self.ysum + y.sum()
        self.rows += y.numel()

    def solve(self) -> torch.Tensor:
        """The coefficients on the CPU (a 4-vector: what plans store); the small solve runs on the CPU
        because ``gelsd`` is a CPU driver."""
        if self.rows == 0:
            raise HastenError("no calibration data was recorded for a regressed step")
        xtx, xty = self.xtx.cpu(), self.xty.cpu()
        return torch.linalg.lstsq(xtx, xty.unsqueeze(1), driver="gelsd").solution.squeeze(1)

    def sse(self, beta: torch.Tensor) -> float:
        """Sum of squared residuals of ``beta`` on the accumulated data."""
        beta = beta.to(self.xtx.device, torch.float64)
        return float(self.yty) - 2 * float(beta @ self.xty) + float(beta @ self.xtx @ beta)

    def r2(self, beta: torch.Tensor) -> float:
        """Coefficient of determination of ``beta`` on the accumulated data."""
        sse = self.sse(beta)
        sst = float(self.yty) - float(self.ysum) ** 2 / max(self.rows, 1)
        return 1.0 - sse / sst if sst > 0 else 1.0


def least_squares(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """beta = argmin ||x beta - y||^2 for a (N, K) design ``x`` and targets ``y`` (N,), float64."""
    eq = NormalEquations(x.shape[1])
    eq.add(x, y)
    return eq.solve()


# --------------------------------------------------------------------------- method configs

LINEAR_AG = "linear-ag"
MIN_TRAJECTORIES = 200


def _check_threshold(value: Any) -> float:
    try:
        thr = float(value)
    except (TypeError, ValueError):
        raise HastenError(f"the guidance threshold must be a number, got {value!r}") from None
    if math.isnan(thr):
        raise HastenError("the guidance threshold must be a number, got nan")
    return thr


def _check_target(value: Any) -> float:
    try:
        db = float(value)
    except (TypeError, ValueError):
        raise HastenError(f"min_psnr must be a number of dB, got {value!r}") from None
    if not (0 < db < 100):
        raise HastenError(f"min_psnr must be between 0 and 100 dB, got {value!r}")
    return db


DEFAULT_MIN_PSNR = 35.0
AG = "ag"
GUIDANCE_INTERVAL = "guidance-interval"


@dataclass
class AdaptiveGuidance:
    """Adaptive Guidance: per sample, stop the unconditional branch once cos(eps_c, eps_null) >= threshold.

    ``threshold`` fixed (``> 1`` never switches: bitwise classifier-free guidance; ``-1`` switches every
    sample after its first call), or ``plan`` from ``hasten calibrate --method ag`` (the calibrated
    threshold, refused for another model or guidance scale), or neither: the plan shipped with the model
    for the run's guidance scale. ``min_psnr`` is the calibration target (dB against CFG, pooled over
    the calibration images). ``uncond_first`` overrides the batch layout for pipelines hasten does not
    list (``True``: rows [uncond; cond]).
    """

    threshold: float | None = None
    plan: str | os.PathLike | dict | None = None
    min_psnr: float = DEFAULT_MIN_PSNR
    uncond_first: bool | None = None
    level = "call"

    def __post_init__(self) -> None:
        if self.threshold is not None:
            self.threshold = _check_threshold(self.threshold)
            if self.plan is not None:
                raise HastenError("give AdaptiveGuidance a threshold or a plan, not both")
        self.min_psnr = _check_target(self.min_psnr)


@dataclass
class LinearAG:
    """LinearAG: regress eps(x_t, null) on alternate calls of the first half, AG in the second half.

    ``plan``: a plan file (or dict) from ``hasten calibrate --method linear-ag`` /
    ``hasten.calibrate(pipe, LinearAG(), ...)``. ``threshold``: AG's threshold (default: the plan's;
    when calibrating, a fixed threshold instead of the search for ``min_psnr``).
    """

    plan: str | os.PathLike | dict | None = None
    threshold: float | None = None
    min_psnr: float = DEFAULT_MIN_PSNR
    uncond_first: bool | None = None
    level = "call"

    def __post_init__(self) -> None:
        if self.threshold is not None:
            self.threshold = _check_threshold(self.threshold)
        self.min_psnr = _check_target(self.min_psnr)


@dataclass
class GuidanceInterval:
    """Guidance in a limited interval (Kynkaenniemi et al. 2024, "Applying Guidance in a Limited Interval
    Improves Sample and Distribution Quality in Diffusion Models", arXiv 2404.07724): classifier-free
    guidance only at the calls whose noise level lies in ``(sigma_lo, sigma_hi]``; every other call sends
    the conditional rows only and the pipeline's own formula gives ``u + s (c - u) = c`` exactly (u := c).

    The paper writes the interval in EDM noise levels sigma; hasten reads the noise level of a call from
    the timestep the transformer receives (:func:`noise_level`): in diffusers' flow-matching convention
    that is the scheduler's sigma in [0, 1] (1 = pure noise), for DDPM-type models the fraction of the
    diffusion still to run. The paper's
    finding, guidance harmful at high noise and unnecessary at low noise, maps to an interval strictly
    inside (0, 1]; ``GuidanceInterval(0, 1)`` guides every call (bitwise CFG) and an empty interval
    none (bitwise the conditional prediction). It composes with Block Caching; not with AG or LinearAG,
    which also decide the unconditional rows.
    """

    sigma_lo: float = 0.0
    sigma_hi: float = 1.0
    uncond_first: bool | None = None
    level = "call"

    def __post_init__(self) -> None:
        try:
            self.sigma_lo, self.sigma_hi = float(self.sigma_lo), float(self.sigma_hi)
        except (TypeError, ValueError):
            raise HastenError(f"GuidanceInterval needs numbers, got {self.sigma_lo!r}, {self.sigma_hi!r}") from None
        if math.isnan(self.sigma_lo) or math.isnan(self.sigma_hi) or self.sigma_lo < 0 or self.sigma_lo > self.sigma_hi:
            raise HastenError(f"GuidanceInterval needs 0 <= sigma_lo <= sigma_hi, got {self.sigma_lo}, {self.sigma_hi}")


# --------------------------------------------------------------------------- LinearAG plans


def load_linear_ag_plan(plan: str | os.PathLike | dict) -> dict:
    """Read and check a LinearAG plan: the generic plan checks plus one finite coefficient per regressor
    for every regressed call."""

    p = load_plan(plan, LINEAR_AG)
    where = "plan" if isinstance(plan, dict) else str(plan)
    coefs = p.get("coefficients")
    if not isinstance(coefs, dict) or p.get("regressors") != list(REGRESSORS):
        raise HastenError(f"{where} is corrupt: it has no LinearAG coefficients for {list(REGRESSORS)}")
    for j in regressed_calls(int(p["calls"])):
        beta = coefs.get(str(j))
        if (not isinstance(beta, list) or len(beta) != len(REGRESSORS)
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in beta)):
            raise HastenError(f"{where} is corrupt: call {j} needs {len(REGRESSORS)} finite coefficients")
    thr = p.get("threshold")
    if not isinstance(thr, (int, float)) or math.isnan(thr):
        raise HastenError(f"{where} is corrupt: its AG threshold is missing")
    return p


# --------------------------------------------------------------------------- the call wrapper


def _layout(handle: Any, uncond_first: bool | None) -> GuidanceLayout:
    if uncond_first is not None:
        known = any(c.__name__ in LAYOUTS for c in type(handle.pipeline).__mro__)
        base = layout_for(handle.pipeline) if known and handle.pipeline is not None else None
        if base is None:
            return GuidanceLayout(type(handle.target).__name__, bool(uncond_first))
        return replace(base, pipeline=type(handle.target).__name__, uncond_first=bool(uncond_first))
    if handle.pipeline is None:
        raise HastenError("guidance methods need the pipeline (they read its guidance batch layout): pass "
                          "the pipeline to accelerate, or uncond_first=True/False for a bare transformer")
    return layout_for(handle.pipeline)


def noise_level(handle: Any, unit_time: bool = False) -> float:
    """The noise level sigma in [0, 1] of the current transformer call (1 = pure noise): the pipeline's own
    ``noise_level(timestep)`` when it has one (hasten's ``HastenPipeline``: Movie Gen time, 0 = noise), else
    ``t / T`` with the scheduler's ``num_train_timesteps`` T (diffusers' convention, default 1000); with
    ``unit_time`` (pipelines that call the transformer with t / 1000: Flux, QwenImage) ``t`` itself."""
    if handle.t is None:
        raise HastenError("GuidanceInterval needs the transformer's timestep, and this call passed none it can "
                          "read (an argument named timestep)")
    own = getattr(handle.pipeline, "noise_level", None)
    if callable(own):
        return float(own(float(handle.t)))
    if unit_time:
        return float(handle.t)
    sched = getattr(getattr(handle.pipeline, "scheduler", None), "config", None)
    return float(handle.t) / float(getattr(sched, "num_train_timesteps", None) or 1000)


class GuidanceRuntime:
    """The per-handle state of AG / LinearAG and the transformer-call wrapper (``handle.wrap_call``)."""

    def __init__(self, handle: Any, name: str, layout: GuidanceLayout, threshold: float | None,
                 plan: dict | None = None, resolve: Callable[[Any], tuple[float, str]] | None = None,
                 interval: tuple[float, float] | None = None):
        """``threshold`` fixed, or ``None`` with ``resolve(handle) -> (threshold, source)`` called at the
        start of every run (a calibrated plan chosen for, or checked against, the run's guidance scale and
        scheduler). ``interval``: (sigma_lo, sigma_hi) of :class:`GuidanceInterval` instead of AG's switch
        (then ``threshold`` is +inf: no sample ever switches)."""
        self.handle, self.name, self.layout, self.threshold, self.plan = handle, name, layout, threshold, plan
        self.interval = interval
        self.resolve = resolve
        self.source = "fixed" if resolve is None else None
        self.regressed = set(regressed_calls(int(plan["calls"]))) if plan else set()
        self.skipped_rows = 0
        self.runs = 0
        self.new_run()

    def new_run(self) -> None:
        self.b: int | None = None
        self.j = 0  # guidance calls so far in this run
        self.switched = self.rows = self.guided = self.switch_call = None
        self.prev_c = self.prev_u = None
        self.kept_cond: tuple[int, torch.Tensor, Callable] | None = None
        self.regressed_done = 0

    def _start(self, b: int) -> None:
        if self.resolve is not None:
            self.threshold, self.source = self.resolve(self.handle)
        self.b = b
        self.switched = torch.zeros(b, dtype=torch.bool)
        self.rows = torch.zeros(b, dtype=torch.long)
        self.guided = torch.zeros(b, dtype=torch.long)
        self.switch_call = torch.full((b,), -1, dtype=torch.long)
        self.runs += 1

    def _need_uncond(self, regress: bool) -> torch.Tensor:
        """Which samples send their unconditional row at this call."""
        if self.interval is None:
            return ~self.switched & (not regress)
        inside = self.interval[0] < noise_level(self.handle, self.layout.unit_time) <= self.interval[1]
        return torch.full((self.b,), inside, dtype=torch.bool)

    def _check_batch(self, b: int) -> None:
        """The first guidance call of a run fixes the number of samples; a later one may not change it."""
        if self.b is None:
            self._start(b)
        elif b != self.b:
            raise HastenError(f"the guidance batch changed from {self.b} to {b} samples within one run")

    def _regressed_call(self, j: int) -> bool:
        """Whether guidance call ``j`` regresses its unconditional prediction (LinearAG), after checking that
        the call is at the timestep the plan was calibrated for."""
        if self.plan is None:
            return False
        check_call_timestep(self.plan, j, self.handle.t)
        return j in self.regressed

    def _regress(self, j: int, c_rows: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """(LinearAG) eps_hat(x_j, null) of the samples ``r`` still guided, from their conditional prediction
        ``c_rows`` and the previous call's estimates."""
        self.regressed_done += 1
        return regress_uncond(self.plan["coefficients"][str(j)], c_rows, self.prev_c[r], self.prev_u[r])

    def __call__(self, inner: Callable, *args: Any, **kwargs: Any) -> Any:
        layout = self.layout
        if self.handle.branch in SEPARATE_BRANCHES:
            return self.separate_call(inner, *args, **kwargs)
        if not is_guidance_call(layout, args, kwargs):
            n = hidden_states_of(args, kwargs).shape[0]
            if self.rows is not None and n == self.b:
                self.rows += 1  # a single-branch call of the same samples (e.g. SD3 skip-layer guidance)
            return inner(*args, **kwargs)
        x = hidden_states_of(args, kwargs)
        n = x.shape[0]
        b = n // 2
        self._check_batch(b)
        h = self.handle
        j = self.j
        self.j += 1
        regress = self._regressed_call(j)
        need_u = self._need_uncond(regress)
        uncond, cond = layout.halves(b)
        if bool(need_u.all()):
            out = inner(*args, **kwargs)
            full, rebuild = unwrap_output(out)
        else:
            sent = rows_to_send(need_u, layout)
            h.active_rows = sent.to(x.device)
            try:
                out = inner(*select_rows(args, sent, n), **select_rows(kwargs, sent, n))
            finally:
                h.active_rows = None
            sub, rebuild = unwrap_output(out)
            full = scatter_rows(sub, sent, n)
            dev = full.device
            sw = (~need_u).to(dev)  # rows that sent no u (switched; regressed ones are overwritten below)
            full[uncond.to(dev)[sw]] = full[cond.to(dev)[sw]]  # u := c, so u + s (c - u) = c exactly
            if regress:
                r = (~self.switched).to(dev)
                full[uncond.to(dev)[r]] = self._regress(j, full[cond.to(dev)[r]], r)
        self.rows += 1  # the conditional row of every sample
        dev = full.device
        self._measure(j, need_u, regress, full[uncond.to(dev)], full[cond.to(dev)])
        return rebuild(full)

    def separate_call(self, inner: Callable, *args: Any, **kwargs: Any) -> Any:
        """A pipeline that sends each branch as its own call (Wan, Flux true CFG, QwenImage): the
        conditional call runs and its prediction is kept; the unconditional call of the same step sends
        only the samples still guided (none: the call is skipped) and hands the kept conditional
        prediction back for the others (u := c, so u + s (c - u) = c exactly)."""
        h = self.handle
        x = hidden_states_of(args, kwargs)
        b = x.shape[0]
        self._check_batch(b)
        j = h.call_index  # the step: each branch is its own stream
        if h.branch == "cond":
            out = inner(*args, **kwargs)
            pred, rebuild = unwrap_output(out)
            self.kept_cond = (j, pred.detach(), rebuild)
            self.rows += 1
            return out
        if self.kept_cond is None or self.kept_cond[0] != j:
            raise HastenError("guidance on a pipeline with separate branch calls needs the conditional call of a "
                              "step before its unconditional one")
        _, c, rebuild = self.kept_cond
        self.j = j + 1
        regress = self._regressed_call(j)
        need_u = self._need_uncond(regress)
        sent = need_u.nonzero().flatten()
        if bool(need_u.all()):
            u = unwrap_output(inner(*args, **kwargs))[0]
        else:
            u = c.clone()  # u := c for switched samples
            if sent.numel():
                h.active_rows = sent.to(x.device)
                try:
                    sub = unwrap_output(inner(*select_rows(args, sent, b), **select_rows(kwargs, sent, b)))[0]
                finally:
                    h.active_rows = None
                u[sent.to(u.device)] = sub
            if regress:
                r = (~self.switched).to(u.device)
                u[r] = self._regress(j, c[r], r)
        self._measure(j, need_u, regress, u, c)  # the conditional row was counted at the conditional call
        return rebuild(u)

    @torch.no_grad()
    def _measure(self, j: int, need_u: torch.Tensor, regress: bool, u_rows: torch.Tensor,
                 c_rows: torch.Tensor) -> None:
        """After guidance call ``j`` (both layouts): count the unconditional rows sent, measure gamma on the
        samples that sent theirs, switch (AG), keep the estimates a next regressed call needs (LinearAG) and
        log the decision. ``u_rows`` / ``c_rows``: the (B, ...) predictions handed back to the pipeline."""
        h, layout = self.handle, self.layout
        self.rows += need_u.long()
        self.guided += need_u.long()
        self.skipped_rows += int((~need_u).sum())
        self.switch_call[self.switched & (self.switch_call < 0)] = j  # first call run conditional-only by AG
        entry = {"uncond_rows": int(need_u.sum()), "switched": int(self.switched.sum()), "regressed": regress}
        if bool(need_u.any()):
            c_pred = c_rows[:, : c_rows.shape[1] // 2] if layout.learned_sigma else c_rows
            u_pred = u_rows[:, : u_rows.shape[1] // 2] if layout.learned_sigma else u_rows
            m = need_u.to(u_rows.device)
            gamma = cosine_per_sample(u_pred[m], c_pred[m]).cpu()
            gamma_full = torch.full((need_u.shape[0],), float("nan"), dtype=torch.float64)
            gamma_full[need_u] = gamma
            self.switched = ag_switch(self.switched, need_u, gamma_full, self.threshold)
            entry["gamma_min"] = round(float(gamma.min()), 6)
            entry["gamma_max"] = round(float(gamma.max()), 6)
            # per sample: gamma measured at this call (None: not measured) and whether it is switched now
            entry["gamma"] = [None if math.isnan(g) else round(g, 6) for g in gamma_full.tolist()]
            entry["switched_after"] = self.switched.tolist()
            if self.plan is not None and (j + 1) in self.regressed:
                if self.prev_c is None:  # the estimates the next (regressed) call regresses on
                    self.prev_c, self.prev_u = c_rows.detach().clone(), u_rows.detach().clone()
                else:
                    self.prev_c[m] = c_rows[m].detach()
                    self.prev_u[m] = u_rows[m].detach()
        if h.log_entry is not None:
            h.log_entry[self.name] = entry

    def report(self) -> dict:
        """Per-sample switch calls and NFE of the last run; rows skipped over all runs."""
        order = "uncond_first" if self.layout.uncond_first else "cond_first"
        rep: dict[str, Any] = {"threshold": self.threshold, "threshold_source": self.source, "layout": order,
                               "runs": self.runs, "uncond_rows_skipped": self.skipped_rows}
        if self.b is not None:
            switch = [None if k < 0 else k for k in self.switch_call.tolist()]
            rep.update({"samples": self.b, "guidance_calls": self.j,
                        "guided_calls_per_sample": self.guided.tolist(), "ag_switch_call": switch,
                        "nfe_per_sample": self.rows.tolist(), "nfe_mean": float(self.rows.double().mean())})
        if self.plan is not None:
            rep["regressed_calls"] = self.regressed_done
        if self.interval is not None:
            guided = int(self.guided.max()) if self.b is not None else 0  # the same for every sample
            rep.update({"interval": list(self.interval), "guided_calls": guided,
                        "unguided_calls": self.j - guided})
            for key in ("threshold", "threshold_source", "ag_switch_call"):
                rep.pop(key, None)
        return rep


# --------------------------------------------------------------------------- install


def load_ag_plan(plan: str | os.PathLike | dict) -> dict:
    """Read and check an AG plan (``hasten calibrate --method ag``): the generic checks and a threshold."""

    p = load_plan(plan, AG)
    thr = p.get("threshold")
    if not isinstance(thr, (int, float)) or math.isnan(thr):
        where = "plan" if isinstance(plan, dict) else str(plan)
        raise HastenError(f"{where} is corrupt: its AG threshold is missing")
    return p


def _plan_resolver(plan: dict, threshold: float | None = None) -> Callable[[Any], tuple[float, str]]:
    """Each run: check its guidance scale and scheduler against the plan's, then use ``threshold`` or the
    plan's."""

    def resolve(handle: Any) -> tuple[float, str]:
        check_run(plan, handle)
        if threshold is not None:
            return threshold, "fixed"
        return float(plan["threshold"]), plan.get("_path", "plan")

    return resolve


def _shipped_resolver(handle: Any) -> Callable[[Any], tuple[float, str]]:
    """``AdaptiveGuidance()``: the AG plan shipped with the model for the run's guidance scale."""

    plans = shipped_plans(handle.pipeline, AG, handle.transformer) if handle.pipeline is not None else []
    plans = [p for p in plans if isinstance(p.get("guidance_scale"), (int, float))]  # a plan of unknown scale

    def resolve(handle: Any) -> tuple[float, str]:
        guidance_scale = handle.guidance_scale
        for p in plans:
            if guidance_scale is not None and same_guidance(p["guidance_scale"], guidance_scale):
                return float(p["threshold"]), p.get("_path", "shipped plan")
        have = ", ".join(f"{float(p['guidance_scale']):g}" for p in plans) or "none"
        at = "an unknown guidance scale" if guidance_scale is None else f"guidance {guidance_scale:g}"
        raise HastenError(f"AdaptiveGuidance() has no calibrated threshold for this model at {at} (shipped: "
                          f"{have}): pass threshold=..., or a plan from `hasten calibrate --method ag`")

    return resolve


def _install_runtime(handle: Any, rt: GuidanceRuntime) -> None:
    if getattr(handle, "_guidance_runtime", None) is not None:
        raise HastenError(f"{rt.name} cannot be combined with {handle._guidance_runtime}: both shrink the "
                          "guidance batch; choose one")
    handle.set_attr(handle, "_guidance_runtime", rt.name)
    handle.on_run_start(rt.new_run)
    handle.wrap_call(rt, rt.name)
    handle.add_report(rt.name, rt.report)


def install_adaptive_guidance(handle: Any, config: AdaptiveGuidance) -> None:
    """Install AG through the handle: one call-level wrapper, a run-start reset and a report."""

    layout = _layout(handle, config.uncond_first)
    if config.threshold is not None:
        rt = GuidanceRuntime(handle, "adaptive-guidance", layout, config.threshold)
    elif config.plan is not None:
        plan = load_ag_plan(config.plan)
        check_plan(plan, handle.transformer, scheduler=getattr(handle.pipeline, "scheduler", None))
        rt = GuidanceRuntime(handle, "adaptive-guidance", layout, None, resolve=_plan_resolver(plan))
    else:
        rt = GuidanceRuntime(handle, "adaptive-guidance", layout, None, resolve=_shipped_resolver(handle))
    _install_runtime(handle, rt)


def install_linear_ag(handle: Any, config: LinearAG) -> None:
    """Install LinearAG: check the plan against the model (and each run's guidance), then wrap calls."""

    if config.plan is None:
        raise HastenError("LinearAG needs a plan: make one with `hasten calibrate --method linear-ag`")
    plan = load_linear_ag_plan(config.plan)
    check_plan(plan, handle.transformer, scheduler=getattr(handle.pipeline, "scheduler", None))
    thr = float(plan["threshold"]) if config.threshold is None else config.threshold
    rt = GuidanceRuntime(handle, LINEAR_AG, _layout(handle, config.uncond_first), thr, plan,
                         resolve=_plan_resolver(plan, config.threshold))
    _install_runtime(handle, rt)


def install_guidance_interval(handle: Any, config: GuidanceInterval) -> None:
    """Install guidance in a limited interval: the guidance wrapper with the interval rule, no switching."""
    rt = GuidanceRuntime(handle, GUIDANCE_INTERVAL, _layout(handle, config.uncond_first), math.inf,
                         interval=(config.sigma_lo, config.sigma_hi))
    _install_runtime(handle, rt)


# --------------------------------------------------------------------------- LinearAG calibration


class LinearAGRecorder:
    """A call wrapper for full-CFG calibration runs: accumulates the normal equations of (LinearAG) for
    every odd call and records each run's timesteps (the plan keeps the calls of the first half)."""

    def __init__(self, handle: Any, layout: GuidanceLayout):
        self.handle, self.layout = handle, layout
        self.eqs: dict[int, NormalEquations] = {}
        self.held: dict[int, NormalEquations] = {}  # held-out runs: the regression's error, not its fit
        self.held_cond: dict[int, list[float]] = {}  # held-out [sum (u - c)^2, sum u^2]: AG's u := c
        self.holdout = False  # set by the caller for each run
        self.run_timesteps: list[list[float | None]] = []
        self.trajectories = 0
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pending_cond: torch.Tensor | None = None  # separate-branch pipelines: this step's conditional call

    def new_run(self) -> None:
        self.run_timesteps.append([])
        self.prev = self.pending_cond = None

    def __call__(self, inner: Callable, *args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        branch = self.handle.branch
        if branch in SEPARATE_BRANCHES:  # Wan, Flux, ...: the conditional call of a step, then the unconditional
            pred, _ = unwrap_output(out)
            if branch == "cond":
                self.pending_cond = pred
            elif self.pending_cond is not None:
                self._add(self.pending_cond, pred)
                self.pending_cond = None
            return out
        if not is_guidance_call(self.layout, args, kwargs):
            return out
        pred, _ = unwrap_output(out)
        uncond, cond = self.layout.halves(pred.shape[0] // 2)
        self._add(pred[cond.to(pred.device)], pred[uncond.to(pred.device)])
        return out

    def _add(self, c: torch.Tensor, u: torch.Tensor) -> None:
        """One guidance call's conditional and unconditional predictions (B, ...)."""
        if self.layout.learned_sigma:  # only the prediction channels are guided; the variance ones are dropped
            c, u = c[:, :c.shape[1] // 2], u[:, :u.shape[1] // 2]
        b = c.shape[0]
        ts = self.run_timesteps[-1]
        j = len(ts)
        ts.append(self.handle.t)
        if j == 0 and not self.holdout:
            self.trajectories += b
        if j % 2 == 1 and self.prev is not None:
            eqs = self.held if self.holdout else self.eqs
            eqs.setdefault(j, NormalEquations(len(REGRESSORS))).add(linear_ag_design(c, *self.prev), u)
            if self.holdout:
                acc = self.held_cond.setdefault(j, [0.0, 0.0])
                acc[0] += float((u.double() - c.double()).pow(2).sum())
                acc[1] += float(u.double().pow(2).sum())
        self.prev = (c.detach(), u.detach())

    def held_out_errors(self, coefs: dict[str, list[float]]) -> dict[str, dict[str, float]]:
        """Per regressed call on the held-out runs: R^2 and relative error |u_hat - u| / |u| of the
        regression, and the relative error of AG's stand-in u := c for comparison."""
        errs = {}
        for key, beta in coefs.items():
            j = int(key)
            if j not in self.held:
                continue
            eq, b = self.held[j], torch.tensor(beta, dtype=torch.float64)
            diff, norm = self.held_cond[j]
            errs[key] = {"r2": round(eq.r2(b), 6), "rel_err": round(math.sqrt(max(eq.sse(b), 0.0) / float(eq.yty)), 6),
                         "rel_err_cond_only": round(math.sqrt(diff / norm), 6)}
        return errs

    def fit(self) -> tuple[dict[str, list[float]], dict[str, float], list[float]]:
        """(coefficients per regressed call, R^2 per regressed call, the run's timesteps)."""
        runs = [ts for ts in self.run_timesteps if ts]
        if not runs:
            raise HastenError("the calibration runs made no guidance calls: is the guidance scale above 1?")
        if any(ts != runs[0] for ts in runs):
            raise HastenError("the calibration runs did not all make the same denoiser calls")
        coefs, r2 = {}, {}
        for j in regressed_calls(len(runs[0])):
            beta = self.eqs[j].solve()
            coefs[str(j)] = [float(v) for v in beta]
            r2[str(j)] = round(self.eqs[j].r2(beta), 6)
        return coefs, r2, runs[0]


def pooled_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of the mean squared error over all images (data range 1), capped at 100 dB. Lower than or
    equal to the mean of per-image PSNRs (Jensen), so a target met here is met by the bench's figure;
    unlike that mean it is not inflated by images that AG never switched (identical: 100 dB)."""
    mse = float((images.double() - reference.double()).pow(2).mean())
    return 100.0 if mse <= 1e-10 else min(100.0, 10 * math.log10(1.0 / mse))


def _candidates(gammas: Sequence[float], max_points: int = 256) -> list[float]:
    """Distinct thresholds worth trying: the measured gammas (a threshold between two of them behaves
    like the upper one), thinned to at most ``max_points`` quantiles, ascending."""
    vals = torch.tensor(sorted({round(g, 6) for g in gammas}), dtype=torch.float64)
    if vals.numel() > max_points:
        vals = vals[torch.linspace(0, vals.numel() - 1, max_points).round().long()].unique()
    return [float(v) for v in vals]


def search_threshold(run: Any, make_config: Callable[[float], Any], name: str, min_psnr: float,
                     seeds: Sequence[int], never_is_cfg: bool = False) -> dict:
    """The smallest AG threshold (most calls saved) whose images on ``seeds`` stay within ``min_psnr`` dB
    (pooled) of plain CFG's, by bisection over the gammas the method measures when it never switches.

    PSNR falls as the threshold falls (earlier switches) up to noise; bisection finds a feasible point
    on that boundary with about log2(#candidates) runs. ``never_is_cfg``: the never-switching run is
    bitwise CFG (AG), so it serves as the reference instead of separate CFG runs. Returns the threshold,
    the search log and the transformer's timesteps in one run.
    """
    def evaluate(threshold: float) -> tuple[torch.Tensor, float, list[dict]]:
        with _accelerate(run.target, make_config(threshold)) as h, torch.no_grad():
            imgs = torch.cat([run.images(s) for s in seeds])
            rep = h.report()
        return imgs, float(rep["nfe"]), rep["log"]

    never = 2.0
    imgs_never, nfe_never, calls = evaluate(never)
    if never_is_cfg:
        ref = imgs_never
    else:
        with torch.no_grad():
            ref = torch.cat([run.images(s) for s in seeds])
    # the newest run: the log keeps the newest LOG_LIMIT calls, so the first run may be cut at its start
    timesteps = [e["t"] for e in calls if e["run"] == calls[-1]["run"]]
    psnr_never = pooled_psnr(imgs_never, ref)
    log = [{"threshold": never, "psnr_db": round(psnr_never, 3), "nfe": round(nfe_never, 3)}]
    found = {"threshold": never, "psnr_db": psnr_never, "nfe": nfe_never, "search": log, "met": False,
             "timesteps": timesteps}
    if psnr_never < min_psnr:
        return found
    gammas = [g for e in calls for g in (e.get(name, {}).get("gamma") or []) if g is not None]
    cand = _candidates(gammas)
    lo, hi = 0, len(cand)
    while lo < hi:
        mid = (lo + hi) // 2
        imgs, nfe, _ = evaluate(cand[mid])
        psnr = pooled_psnr(imgs, ref)
        log.append({"threshold": cand[mid], "psnr_db": round(psnr, 3), "nfe": round(nfe, 3)})
        if psnr >= min_psnr:
            hi = mid
            found.update(threshold=cand[mid], psnr_db=psnr, nfe=nfe)
        else:
            lo = mid + 1
    found["met"] = True
    return found


def _search_summary(found: dict, min_psnr: float, seeds: Sequence[int]) -> dict:
    return {"min_psnr_db": min_psnr, "seeds": list(seeds), "met": found["met"],
            "psnr_db": round(found["psnr_db"], 3), "nfe": round(found["nfe"], 3), "search": found["search"]}


def calibrate_ag(run: Any, config: AdaptiveGuidance) -> dict:
    """The AG plan: the threshold that keeps ``config.min_psnr`` dB against CFG on the calibration runs
    (:func:`search_threshold` over every seed of ``run``), with the search and its cost recorded."""
    import time


    t0 = time.perf_counter()
    found = search_threshold(run, lambda thr: AdaptiveGuidance(threshold=thr, uncond_first=config.uncond_first),
                             "adaptive-guidance", config.min_psnr, run.seeds, never_is_cfg=True)
    if not found["timesteps"] or any(t is None for t in found["timesteps"]):
        raise HastenError("the calibration runs sent no readable timestep to the transformer")
    return new_plan(AG, run.transformer, timesteps=found["timesteps"], **run.plan_fields(),
                    threshold=found["threshold"], calibration=_search_summary(found, config.min_psnr, run.seeds),
                    calibration_s=round(time.perf_counter() - t0, 1))


def calibrate_linear_ag(run: Any, config: LinearAG) -> dict:
    """Fit LinearAG's coefficients by least squares on full-CFG trajectories (>= 200, the last sixth of
    the seeds held out to measure the regression's error), then choose the second half's AG threshold
    for ``config.min_psnr`` (or keep ``config.threshold``) and return the plan."""
    import time

    t0 = time.perf_counter()
    seeds = list(run.seeds)
    n_held = max(1, len(seeds) // 6)
    fit_seeds, held_seeds = seeds[:-n_held], seeds[-n_held:]
    n = len(run.conditions) * len(fit_seeds)
    if n < MIN_TRAJECTORIES or not fit_seeds:
        per = max(len(run.conditions), 1)
        need = -(-MIN_TRAJECTORIES // per)
        need += max(1, (need + 1) // 5)
        raise HastenError(f"LinearAG calibration needs at least {MIN_TRAJECTORIES} fitting trajectories plus "
                          f"held-out ones, got {len(run.conditions)} conditions x {len(seeds)} seeds "
                          f"({len(fit_seeds)} fitting): use at least {need} seeds "
                          f"(e.g. --seeds {','.join(str(1000 + s) for s in range(need))})")
    handle = attach(run.target, run.blocks)
    try:
        rec = LinearAGRecorder(handle, _layout(handle, config.uncond_first))
        handle.on_run_start(rec.new_run)
        handle.wrap_call(rec, "linear-ag-calibration")
        with torch.no_grad():
            for seed in seeds:
                handle.reset()
                rec.holdout = seed in held_seeds
                run.run(seed)
    finally:
        handle.disable()
    coefs, r2, timesteps = rec.fit()
    if any(t is None for t in timesteps):
        raise HastenError("the calibration runs sent no readable timestep to the transformer")
    fields = dict(run.plan_fields(), seeds=fit_seeds)
    plan = new_plan(LINEAR_AG, run.transformer, timesteps=timesteps, **fields, regressors=list(REGRESSORS),
                    coefficients=coefs, r2=r2, held_out=rec.held_out_errors(coefs), held_out_seeds=held_seeds,
                    threshold=2.0, trajectories=rec.trajectories)
    if config.threshold is not None:
        plan["threshold"] = config.threshold
    else:
        search_seeds = fit_seeds[:2]
        found = search_threshold(run, lambda thr: LinearAG(plan=plan, threshold=thr, uncond_first=config.uncond_first),
                                 LINEAR_AG, config.min_psnr, search_seeds)
        plan["threshold"] = found["threshold"]
        plan["calibration"] = _search_summary(found, config.min_psnr, search_seeds)
    plan["calibration_s"] = round(time.perf_counter() - t0, 1)
    return plan


# --------------------------------------------------------------------------- registry


def _accelerate(target: Any, config: AdaptiveGuidance | LinearAG) -> Any:
    """A handle on ``target`` with one guidance method (what calibration's searches run)."""
    handle = attach(target)
    try:
        install = install_adaptive_guidance if isinstance(config, AdaptiveGuidance) else install_linear_ag
        install(handle, config)
        handle.methods.append(config)
    except BaseException:
        handle.disable()
        raise
    return handle


def _register() -> None:
    from . import MethodInfo, register

    for name in ("ag", "adaptive-guidance"):
        register(MethodInfo(name, AdaptiveGuidance, install_adaptive_guidance, level="call", calibrate=calibrate_ag))
    register(MethodInfo(LINEAR_AG, LinearAG, install_linear_ag, level="call", calibrate=calibrate_linear_ag))
    register(MethodInfo(GUIDANCE_INTERVAL, GuidanceInterval, install_guidance_interval, level="call"))


_register()
