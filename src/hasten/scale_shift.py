"""Scale-shift training for Block Caching (paper Sec. 3.3): distil the per-block, per-stream scale and shift
of reused residuals from the uncached model.

Two drivers, one loss family: :func:`train_scale_shift_any` runs on any pipeline through the
calibration runner (``hasten.api.calibration_run``: prompts or labels, any scheduler); on hasten's own
class-conditional pipeline :func:`train_scale_shift` distils the guided velocity instead (and offers the
block-level least-squares fit). ``hasten calibrate --method block-cache --scale-shift`` and
``block-cache:scale_shift=1`` use them. Outside the core: the drivers run pipelines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import HastenError
from .methods.block_cache import (
    BlockCache,
    ScaleShift,
    load_block_cache_plan,
    schedule_from_changes,
    time_features,
)
from .plans import check_plan

SS_TRAIN_STEPS = 1000  # Adam updates (see train_scale_shift)
SS_LR = 1e-4


class _LstsqFit:
    """Sufficient statistics for the least-squares scale-shift fit of every reused block and stream.

    On a reused call the block also runs (teacher = the uncached block at the student's input x); with
    cached residual r, true residual y - x and error e = (y - x) - r, the per-channel model
    e ~ s(t) r + b(t), s = W_s phi(t), b = W_b phi(t), is linear in (W_s, W_b): per channel c the
    normal equations are accumulated from per-row sums (sum r^2, sum r, count, sum r e, sum e) and
    outer products phi phi^T; ``solve`` returns the ridge solution.
    """

    def __init__(self, feat_dim: int = 64):
        self.f = feat_dim
        self.stats: dict[tuple[int, int], list[torch.Tensor]] = {}

    def __call__(self, blk, orig, args, kwargs, rows) -> None:
        true = orig(*args, **kwargs)
        trues = (true,) if blk.single else true
        phi = time_features(blk.row_timesteps(rows), self.f).double()  # (B, F)
        outer = phi[:, :, None] * phi[:, None, :]  # (B, F, F)
        for k, x in enumerate(blk.inputs(args, kwargs)):
            c = blk.slot.cache[k]
            y = trues[k]
            if c is None or y is None or x is None or blk.ss is None or blk.ss[k] is None:
                continue
            r = (c if rows is None else c.index_select(0, rows)).double()
            e = (y - x).double() - r
            dims = tuple(range(1, r.dim() - 1))
            r2, r1, re, e1 = ((r * r).sum(dims), r.sum(dims), (r * e).sum(dims), e.sum(dims))  # (B, C)
            n = torch.full_like(r1, float(math.prod(r.shape[1:-1])))
            key = (blk.index, k)
            new = [torch.einsum("bc,bfg->cfg", w, outer) for w in (r2, r1, n)]
            new += [torch.einsum("bc,bf->cf", w, phi) for w in (re, e1)]
            acc = self.stats.get(key)
            self.stats[key] = new if acc is None else [a + b for a, b in zip(acc, new, strict=True)]

    def solve(self, states, ridge: float = 1e-3) -> None:
        """Write the ridge solution into the blocks' ScaleShift modules (proj.weight; bias stays 0)."""
        f = self.f
        for (i, k), (arr, ar, an, vr, ve) in self.stats.items():
            m = torch.cat([torch.cat([arr, ar], 2), torch.cat([ar, an], 2)], 1)  # (C, 2F, 2F)
            v = torch.cat([vr, ve], 1)  # (C, 2F)
            scale = m.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)  # (C,)
            m = m + ridge * scale[:, None, None] * torch.eye(2 * f, dtype=m.dtype)
            w = torch.linalg.solve(m, v)  # (C, 2F)
            mod = states[i].ss[k]
            with torch.no_grad():
                mod.proj.weight.copy_(torch.cat([w[:, :f], w[:, f:]], 0).to(mod.proj.weight.dtype))


def train_scale_shift(pipe, plan: dict, delta: float | None = None, train_steps: int = SS_TRAIN_STEPS,
                      labels: Sequence[int] | None = None, seed: int = 3000, lr: float = SS_LR,
                      progress=None, method: str = "adam", run=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Distil scale-shift parameters for ``plan`` (at ``delta``) (paper Sec. 3.3). Any other pipeline than
    hasten's own goes to :func:`train_scale_shift_any` (``run``: its calibration runner, optional).

    Student: the pipeline with Block Caching + scale-shift (zero-initialised = plain caching);
    teacher: the same transformer without caching. Trajectories are always the student's own (its
    output advances x); only the scale-shift parameters change (the transformer is frozen).

    - ``method="adam"`` (default, the paper's output-level distillation): at each call that reuses a
      block, the loss is the MSE between the student's and the teacher's guided velocity at the
      student's x, and one Adam step (``lr``) updates the parameters; ``train_steps`` counts these
      updates. On the digits model at delta 0.15, lr 1e-4 and 1000 updates (21 trajectories, 3.5 min
      on one core) lower the held-out velocity error by 47%; lr 3e-4 and above diverge.
    - ``method="lstsq"``: block-level distillation. At every reused block the uncached block is the
      teacher at the student's input; the per-channel scale/shift maps are the ridge least-squares
      solution (:class:`_LstsqFit`), refitted after each trajectory. ``train_steps`` counts trajectories
      (capped at 8). It lowers each block's own error but, on the digits model, not the output error
      (block errors partly cancel under plain caching), so it is not the default.

    ``val_loss_before/after``: the velocity MSE against the teacher over one held-out trajectory (seed
    ``seed - 1``) at the zero init (= plain caching) and after training; parameters that do not lower
    it are not kept (zeros are returned, ``kept: false``). Returns (state dict, training info).
    """
    import copy
    import time

    from .api import accelerate
    from .pipeline import SOLVERS, HastenPipeline, make_schedule

    if not isinstance(pipe, HastenPipeline):
        if method != "adam":
            raise HastenError("the least-squares scale-shift fit runs on hasten's own pipeline; use method='adam'")
        return train_scale_shift_any(pipe, plan, delta=delta, train_steps=train_steps, seed=seed, lr=lr,
                                     progress=progress, run=run)
    if train_steps < 1:
        raise HastenError(f"--train-steps must be >= 1, got {train_steps}")
    plan = load_block_cache_plan(plan)
    check_plan(plan, pipe.transformer)
    delta = plan["delta"] if delta is None else float(delta)
    masks = schedule_from_changes(plan["l1rel"], delta)
    state = zero_state(plan, masks)
    if method not in ("lstsq", "adam"):
        raise HastenError(f"unknown scale-shift training method {method!r}: lstsq | adam")
    info = {"method": method, "train_steps": int(train_steps), "lr": lr if method == "adam" else None,
            "delta": delta, "seed": seed, "val_seed": seed - 1, "val_loss_before": None, "val_loss_after": None}
    if not state:
        return state, info
    teacher = HastenPipeline(copy.deepcopy(pipe.transformer).requires_grad_(False), num_classes=pipe.num_classes,
                             guidance_scale=pipe.default_guidance_scale)
    grads = {n: p.requires_grad for n, p in pipe.transformer.named_parameters()}
    handle = accelerate(pipe, BlockCache(plan=plan, delta=delta, scale_shift=state))  # first: it may refuse
    pipe.transformer.requires_grad_(False)
    try:
        mods = [m for st in handle.block_cache_states if st.ss for m in st.ss if m is not None]
        params = [p for m in mods for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        labs = torch.as_tensor(list(range(pipe.num_classes)) if labels is None else list(labels))
        scale = plan.get("guidance_scale") or pipe.default_guidance_scale
        ts = make_schedule(plan.get("time_schedule") or "linear", plan["steps"])
        losses: list[float] = []

        def trajectory(traj_seed: int, train: bool) -> list[float]:
            """One student trajectory; at calls that reuse a block: loss (and an update if ``train``)."""
            g = torch.Generator().manual_seed(traj_seed)
            v_s = pipe.velocity_fn(labs, scale, {"calls": 0, "rows": 0})
            v_t = teacher.velocity_fn(labs, scale, {"calls": 0, "rows": 0})
            calls, seen = [0], []

            def velocity(x, t):
                n = calls[0]
                calls[0] += 1
                if n >= len(masks[0]) or all(m[n] for m in masks) or (train and len(losses) >= train_steps):
                    return v_s(x, t)
                with torch.enable_grad() if train else torch.no_grad():
                    out = v_s(x, t)
                    with torch.no_grad():
                        target = v_t(x, t)
                    loss = torch.nn.functional.mse_loss(out, target)
                    if train:
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        losses.append(float(loss.detach()))
                seen.append(float(loss.detach()))
                return out.detach()

            with torch.no_grad():
                SOLVERS[plan["solver"]](velocity, pipe.initial_noise(len(labs), g), ts)
            return seen

        t0, traj = time.perf_counter(), 0
        val = trajectory(seed - 1, False)  # the loss at every call that reuses a block
        val_before = sum(val) / max(1, len(val))
        if method == "lstsq":
            for p in params:
                p.requires_grad_(False)
            fit = _LstsqFit(mods[0].feat_dim)
            handle.block_cache_states[0].shared["fit"] = fit
            for traj in range(1, min(train_steps, 8) + 1):
                g = torch.Generator().manual_seed(seed + traj - 1)
                with torch.no_grad():
                    pipe(labs, num_inference_steps=plan["steps"], guidance_scale=scale, generator=g,
                         schedule=plan.get("time_schedule") or "linear", solver=plan["solver"])
                fit.solve(handle.block_cache_states)
                if progress is not None:
                    progress(f"scale-shift: {traj} trajectories fitted")
            handle.block_cache_states[0].shared["fit"] = None
        while method == "adam" and len(losses) < train_steps:
            trajectory(seed + traj, True)
            traj += 1
            if progress is not None:
                progress(f"scale-shift: {len(losses)}/{train_steps} updates, loss {losses[-1]:.3g}")
        val = trajectory(seed - 1, False)
        val_after = sum(val) / max(1, len(val))
        info.update(trajectories=traj, seconds=round(time.perf_counter() - t0, 1))
        return _keep_if_better(handle.block_cache_states, val_before, val_after, info)
    finally:
        handle.disable()
        for n, p in pipe.transformer.named_parameters():
            p.requires_grad_(grads[n])


def _keep_if_better(states, val_before: float, val_after: float, info: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained parameters of every block and stream, or zeros (plain caching) when they did not lower the
    held-out loss: parameters that do worse than plain caching are never shipped."""
    trained = {}
    for i, st in enumerate(states):
        for k, m in enumerate(st.ss or []):
            if m is not None:
                trained[f"{i}.{k}.proj.weight"] = m.proj.weight.detach().clone().contiguous()
                trained[f"{i}.{k}.proj.bias"] = m.proj.bias.detach().clone().contiguous()
    kept = val_after < val_before
    if not kept:
        trained = {k: torch.zeros_like(v) for k, v in trained.items()}
    info.update(val_loss_before=round(val_before, 8), val_loss_after=round(val_after, 8), kept=kept)
    return trained, info


def zero_state(plan: dict, masks: list[list[bool]]) -> dict[str, torch.Tensor]:
    """Zero-initialised (= plain caching) scale-shift parameters for every block and stream that is reused."""
    state: dict[str, torch.Tensor] = {}
    for i, chans in enumerate(plan["channels"]):
        if all(masks[i]):
            continue  # never reused: nothing to align
        for k, c in enumerate(chans):
            if c is not None:
                m = ScaleShift(int(c))
                state[f"{i}.{k}.proj.weight"] = m.proj.weight.detach().clone()
                state[f"{i}.{k}.proj.bias"] = m.proj.bias.detach().clone()
    return state


def train_scale_shift_any(target, plan: dict, delta: float | None = None, train_steps: int = SS_TRAIN_STEPS,
                          seed: int = 3000, lr: float = SS_LR, progress=None, run=None,
                          **run_kwargs) -> tuple[dict[str, torch.Tensor], dict]:
    """Distil scale-shift parameters for ``plan`` (at ``delta``) on any pipeline (paper Sec. 3.3).

    The pipeline runs with Block Caching + scale-shift (the student, its own trajectories). At every
    denoiser call where a block is reused, the same call is run again with every block computed (the
    teacher: the uncached model at the student's input, no copy of the model needed), the loss is the
    MSE between the two transformer outputs (all rows of the call: both guidance branches), and one Adam
    step (``lr``) updates the scale-shift parameters only; ``train_steps`` counts updates. Runs come
    from ``run`` or ``hasten.api.calibration_run(target, seeds=..., steps=plan's, **run_kwargs)``, one
    seed per trajectory from ``seed`` on; seed ``seed - 1`` is held out: ``val_loss_before/after`` is
    the mean loss over its reused calls at the zero init and after training, and parameters that do not
    lower it are not kept (zeros, ``kept: false``). Returns (state dict, training info).
    """
    import time

    from .api import accelerate, calibration_run
    from .methods.guidance import unwrap_output

    if train_steps < 1:
        raise HastenError(f"--train-steps must be >= 1, got {train_steps}")
    plan = load_block_cache_plan(plan)
    delta = plan["delta"] if delta is None else float(delta)
    masks = schedule_from_changes(plan["l1rel"], delta)
    state = zero_state(plan, masks)
    info = {"method": "adam-output", "train_steps": int(train_steps), "lr": lr, "delta": delta, "seed": seed,
            "val_seed": seed - 1, "val_loss_before": None, "val_loss_after": None}
    if not state:
        return state, info
    if run is None:
        run = calibration_run(target, seeds=(seed - 1, seed), steps=plan["steps"], **run_kwargs)
    transformer = run.transformer
    grads = {n: p.requires_grad for n, p in transformer.named_parameters()}
    handle = accelerate(target, BlockCache(plan=plan, delta=delta, scale_shift=state))  # first: it may refuse
    transformer.requires_grad_(False)
    try:
        states = handle.block_cache_states
        shared = states[0].shared
        params = [p for st in states if st.ss for m in st.ss if m is not None for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        mode = {"train": False, "losses": [], "updates": 0}

        def distil(inner, *args, **kwargs):
            n = handle.call_index
            if not handle.primary or n >= len(masks[0]) or all(m[n] for m in masks) or (
                    mode["train"] and mode["updates"] >= train_steps):
                return inner(*args, **kwargs)
            with torch.enable_grad():
                out = inner(*args, **kwargs)
                pred, rebuild = unwrap_output(out)
                shared["bypass"] = True
                try:
                    with torch.no_grad():
                        teacher = unwrap_output(inner(*args, **kwargs))[0]
                finally:
                    shared["bypass"] = False
                loss = torch.nn.functional.mse_loss(pred.float(), teacher.float())
                if mode["train"]:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    mode["updates"] += 1
            mode["losses"].append(float(loss.detach()))
            return rebuild(pred.detach())

        handle.wrap_call(distil, "scale-shift-training")

        def trajectory(traj_seed: int, train: bool) -> list[float]:
            mode["train"], mode["losses"] = train, []
            handle.reset()
            run.run(traj_seed)
            return mode["losses"]

        t0, traj = time.perf_counter(), 0
        val = trajectory(seed - 1, False)
        val_before = sum(val) / max(1, len(val))
        while mode["updates"] < train_steps:
            before = mode["updates"]
            trajectory(seed + traj, True)
            traj += 1
            if mode["updates"] == before:
                raise HastenError("no denoiser call reused a block: nothing to train at this delta")
            if progress is not None:
                progress(f"scale-shift: {mode['updates']}/{train_steps} updates")
        val = trajectory(seed - 1, False)
        val_after = sum(val) / max(1, len(val))
        info.update(trajectories=traj, seconds=round(time.perf_counter() - t0, 1))
        return _keep_if_better(states, val_before, val_after, info)
    finally:
        handle.disable()
        for n, p in transformer.named_parameters():
            p.requires_grad_(grads[n])
