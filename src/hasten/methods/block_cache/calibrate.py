"""Block Caching calibration: record each block's relative change per call (Eq. 6) on full-compute
runs and derive the schedule for a threshold (Eq. 7)."""

from __future__ import annotations

from ...errors import HastenError
from ...hooks import attach
from ...plans import new_plan
from .record import _Recorder, trajectory_timesteps
from .schedule import CONVENTION, METHOD, BlockCache, ideal_speedup, schedule_from_changes


# --------------------------------------------------------------------------- calibration (Eq. 6)
def record_changes(run) -> tuple[list[list[float | None]], list[float], list[str], list, set]:
    """Full-compute runs over every seed: (L1rel curves [block][call], timesteps, block names, channels, the
    guidance scales the runs used as far as the handle could read them)."""
    handle = attach(run.target, run.blocks)
    scales: set = set()
    try:
        blocks = handle.blocks()
        rec = _Recorder(handle, blocks)
        handle.on_run_start(rec.reset)
        handle.on_run_start(lambda: scales.add(handle.guidance_scale))
        for i, spec in enumerate(blocks):
            handle.wrap_block(spec.module, rec.hook(i), spec.name)
        for seed in run.seeds:
            handle.reset()
            run.run(seed)
        log = handle.report()["log"]
    finally:
        handle.disable()
    per_run = trajectory_timesteps(log)
    lengths = {len(v) for v in per_run.values()}
    if len(lengths) != 1:
        raise HastenError(f"calibration runs made different numbers of denoiser calls: {sorted(lengths)}")
    timesteps = per_run[min(per_run)]
    return rec.curves(len(timesteps)), timesteps, [b.name for b in blocks], rec.channels, scales


def calibrate(run, cfg: BlockCache) -> dict:
    """Record L1rel (Eq. 6) on full-compute runs and derive the schedule (Eq. 7) for ``cfg.delta``."""
    if cfg.delta is None:
        raise HastenError("calibration needs a threshold: BlockCache(delta=0.5)")
    curves, timesteps, names, channels, scales = record_changes(run)
    fields = run.plan_fields()
    if fields["guidance_scale"] is None and len(scales) == 1:  # not given: the scale the runs used
        fields["guidance_scale"] = next(iter(scales))
    return plan_from_changes(run.transformer, curves, timesteps, cfg.delta, names, channels, **fields)


def plan_from_changes(model, curves: list[list[float | None]], timesteps: list, delta: float, names: list[str],
                      channels: list, **fields) -> dict:
    """The Block Caching plan for recorded L1rel ``curves`` (Eq. 6): the schedule for ``delta`` (Eq. 7),
    the curves themselves (to re-derive it for another delta) and ``fields`` (solver, steps, ...)."""
    masks = schedule_from_changes(curves, delta)
    return new_plan(METHOD, model, timesteps=timesteps, **fields, delta=delta, blocks=names, channels=channels,
                    index_convention=CONVENTION, ideal_speedup=round(ideal_speedup(masks), 4),
                    schedule=[[int(v) for v in m] for m in masks],
                    l1rel=[[None if v is None else round(v, 6) for v in c] for c in curves])
