"""``hasten bench`` results: the record schema, validation, the quality-level comparison, JSON I/O.

The schema (``schema: "hasten-bench/1"``) is documented in ``benchmarks/README_bench.md``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import HastenError
from ..io import write_json

SCHEMA = "hasten-bench/1"
FAMILIES = ("baseline", "hasten", "peer")
RECORD_FIELDS = ("name", "family", "params", "wall_s_median", "speedup", "nfe", "block_evals", "peak_rss_mb",
                 "psnr", "ssim", "fd_digits", "class_accuracy", "fd_shapes", "adherence",
                 "denoiser_s_median", "denoiser_share", "denoiser_speedup", "transformer_flops_share",
                 "setup_s", "error")
NUMERIC_FIELDS = RECORD_FIELDS[3:-1]
# text-to-image quality, the denoiser's part of the end-to-end time, setup seconds: absent in older results
OPTIONAL_FIELDS = ("fd_shapes", "adherence", "denoiser_s_median", "denoiser_share", "denoiser_speedup",
                   "transformer_flops_share", "setup_s")
ADHERENCE_TOLERANCE = 0.01  # text-to-image gates: adherence at most 1 point below the reference
TOP_FIELDS = ("schema", "date", "machine", "model", "protocol", "records", "quality_levels", "realistic")
MACHINE_FIELDS = ("cpu", "cores", "torch")
PSNR_LEVELS = (40.0, 35.0, 30.0)
FD_TOLERANCE = 0.05
TARGET_RATIO = 1.3  # hasten's fastest against every other family's fastest, at each level


def new_record(name: str, family: str, params: dict, **values: Any) -> dict:
    """A record with every field present (missing values are ``None``)."""
    if family not in FAMILIES:
        raise HastenError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")
    rec = {"name": name, "family": family, "params": dict(params)}
    for f in RECORD_FIELDS[3:]:
        rec[f] = values.pop(f, None)
    if values:
        raise HastenError(f"unknown record field {sorted(values)[0]!r}")
    return rec


def _check_number(where: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HastenError(f"{where} must be a finite number or null, got {value!r}")


def validate_record(rec: Any, where: str = "record") -> None:
    if not isinstance(rec, dict):
        raise HastenError(f"{where} must be an object")
    missing = [f for f in RECORD_FIELDS if f not in rec and f not in OPTIONAL_FIELDS]
    if missing:
        raise HastenError(f"{where} lacks field {missing[0]!r}")
    extra = sorted(set(rec) - set(RECORD_FIELDS))
    if extra:
        raise HastenError(f"{where} has unknown field {extra[0]!r}")
    if not isinstance(rec["name"], str) or not rec["name"]:
        raise HastenError(f"{where}: name must be a non-empty string")
    if rec["family"] not in FAMILIES:
        raise HastenError(f"{where} ({rec['name']}): family must be one of {', '.join(FAMILIES)}")
    if not isinstance(rec["params"], dict):
        raise HastenError(f"{where} ({rec['name']}): params must be an object")
    for f in NUMERIC_FIELDS:
        _check_number(f"{where} ({rec['name']}).{f}", rec.get(f))
    if rec["error"] is not None and not isinstance(rec["error"], str):
        raise HastenError(f"{where} ({rec['name']}): error must be a string or null")


def validate_results(obj: Any) -> dict:
    """Check ``obj`` against the schema; returns it. Raises :class:`HastenError` naming the first problem."""
    if not isinstance(obj, dict):
        raise HastenError("bench results must be a JSON object")
    missing = [f for f in TOP_FIELDS if f not in obj]
    if missing:
        raise HastenError(f"bench results lack field {missing[0]!r}")
    if obj["schema"] != SCHEMA:
        raise HastenError(f"bench results have schema {obj['schema']!r}; this hasten reads {SCHEMA!r}")
    machine = obj["machine"]
    if not isinstance(machine, dict) or any(f not in machine for f in MACHINE_FIELDS):
        raise HastenError(f"bench results: machine must name {', '.join(MACHINE_FIELDS)}")
    if not isinstance(obj["records"], list):
        raise HastenError("bench results: records must be a list")
    names = set()
    for i, rec in enumerate(obj["records"]):
        validate_record(rec, f"records[{i}]")
        if rec["name"] in names:
            raise HastenError(f"bench results: two records are named {rec['name']!r}")
        names.add(rec["name"])
    if not isinstance(obj["quality_levels"], list):
        raise HastenError("bench results: quality_levels must be a list")
    realistic = obj["realistic"]
    if realistic is not None:
        if not isinstance(realistic, dict) or not isinstance(realistic.get("records"), list):
            raise HastenError("bench results: realistic must be null or an object with records")
        for i, rec in enumerate(realistic["records"]):
            validate_record(rec, f"realistic.records[{i}]")
    return obj


def write_results(path: str | os.PathLike, obj: dict) -> Path:
    """Validate, then write atomically."""
    return write_json(path, validate_results(obj))


def load_results(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise HastenError(f"no bench results at {p}")
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise HastenError(f"{p} is not valid JSON: {e.msg} (line {e.lineno})") from None
    return validate_results(obj)


# --------------------------------------------------------------------------- quality levels
def adherence_tolerance(samples: int | None) -> float:
    """How far below the reference's adherence a configuration may score and pass the 1-point gate: at least one
    caption (1 / ``samples``, the least adherence can move), plus float rounding."""
    return max(ADHERENCE_TOLERANCE, 1.0 / samples if samples else 0.0) + 1e-9


def quality_levels(records: list[dict], reference: str, samples: int | None = None) -> list[dict]:
    """For each quality level, the fastest configuration of each group that reaches it.

    ``reference`` is the quality reference: the run the records' PSNR was measured against (on shapes the
    converged solve, not the 50-step Euler speed reference).
    Levels: PSNR against the reference run >= 40, 35, 30 dB; FD (FD-shapes where the reference has it,
    else FD-digits) within 5 % of the reference's. On a text-to-image model (the reference has an
    adherence) every level also requires adherence at most 1 point below the reference's and the PSNR
    levels FD within 5 % too: the gates of a text-to-image bench. With ``samples`` captions, one caption
    (1 / samples) is the least adherence can move, so the tolerance is at least one caption.
    Groups: ``hasten``; ``peer``; ``fewer_steps`` (the baseline family: every solver, step count and
    guidance schedule; the speed reference itself counts, at speedup 1, but a separate converged quality
    reference (``params.role == "quality-reference"``) does not: it is the yardstick, at PSNR 100 by
    construction, and no user's fast option). ``hasten_fastest`` is true when
    hasten's fastest is faster than both others' (a group with no configuration at the level counts as
    beaten); ``None`` when hasten has none. ``hasten_vs_best_other`` is hasten's speed-up over the faster
    of the other two groups, and ``target_met`` whether it reaches ``TARGET_RATIO`` (1.3x).
    """
    ref = next((r for r in records if r["name"] == reference), None)
    if ref is None:
        raise HastenError(f"no reference record {reference!r}")
    fd_key = "fd_shapes" if ref.get("fd_shapes") is not None else "fd_digits"
    fd_bound = None if ref[fd_key] is None else ref[fd_key] * (1 + FD_TOLERANCE)
    text = ref.get("adherence") is not None
    tolerance = adherence_tolerance(samples)

    def gate(r: dict) -> bool:
        if not text:
            return True
        return (r.get("adherence") is not None and r["adherence"] >= ref["adherence"] - tolerance
                and r.get(fd_key) is not None and fd_bound is not None and r[fd_key] <= fd_bound)

    suffix = " + adherence, FD" if text else ""
    levels: list[tuple[str, Any]] = [
        (f"psnr>={lv:g}{suffix}", lambda r, lv=lv: r["psnr"] is not None and r["psnr"] >= lv and gate(r))
        for lv in PSNR_LEVELS]
    if fd_bound is not None:
        label = "fd" if fd_key == "fd_digits" else fd_key
        levels.append((f"{label}<={fd_bound:.4g} (reference +{FD_TOLERANCE:.0%}){suffix}",
                       lambda r, b=fd_bound: r.get(fd_key) is not None and r[fd_key] <= b and gate(r)))
    groups = {"hasten": "hasten", "peer": "peer", "fewer_steps": "baseline"}
    out = []
    for label, ok in levels:
        row: dict[str, Any] = {"level": label}
        for key, fam in groups.items():
            cands = [r for r in records if r["family"] == fam and r["error"] is None and r["speedup"] is not None
                     and r["params"].get("role") != "quality-reference" and ok(r)]
            best = max(cands, key=lambda r: r["speedup"], default=None)
            row[key] = None if best is None else {"name": best["name"], "speedup": best["speedup"],
                                                  "psnr": best["psnr"], fd_key: best.get(fd_key)}
        h = row["hasten"]
        others = [row[k]["speedup"] for k in ("peer", "fewer_steps") if row[k] is not None]
        row["hasten_fastest"] = None if h is None else all(h["speedup"] > s for s in others)
        row["hasten_vs_peer"] = _ratio(h, row["peer"])
        row["hasten_vs_fewer_steps"] = _ratio(h, row["fewer_steps"])
        best_other = max((row[k] for k in ("peer", "fewer_steps") if row[k] is not None),
                         key=lambda b: b["speedup"], default=None)
        row["hasten_vs_best_other"] = _ratio(h, best_other)
        row["target_met"] = None if row["hasten_vs_best_other"] is None else row["hasten_vs_best_other"] >= TARGET_RATIO
        out.append(row)
    return out


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if a is None or b is None or not b["speedup"]:
        return None
    return round(a["speedup"] / b["speedup"], 4)
