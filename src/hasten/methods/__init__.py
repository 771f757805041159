"""Acceleration methods: each is a config dataclass plus an ``install(handle, config)`` function.

Every method module registers a :class:`MethodInfo` here under its name (``block-cache``,
``adaptive-guidance``, ``linear-ag``, ...). ``hasten.accelerate`` finds the installer by the config's
type; the CLI (``hasten.specs``) finds it by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import HastenError


@dataclass(frozen=True)
class MethodInfo:
    """How hasten drives one method.

    - ``install(handle, config)``: install the method through the handle (see ``hasten.hooks``).
    - ``level``: "call" (whole denoiser calls: guidance), "block" or "token"; ``accelerate`` installs
      call-level methods first, so they are the outermost wrappers.
    - ``calibrate(run: CalibrationRun, config) -> plan dict``: calibrate on a pipeline.
    - ``plot(plan, path)``: draw a calibrated plan.

    How the CLI spells a method (``--accel NAME:k=v``, ``hasten calibrate`` options) is the CLI's
    business: :mod:`hasten.specs`.
    """

    name: str
    config: type
    install: Callable[[Any, Any], None]
    level: str = "block"
    calibrate: Callable[..., dict] | None = None
    plot: Callable[[dict, Any], Any] | None = None


REGISTRY: dict[str, MethodInfo] = {}
LEVELS = {"call": 0, "block": 1, "token": 2}

METHOD_MODULES = ("block_cache", "guidance", "flexidit")  # imported on first use (they register themselves)


def register(info: MethodInfo) -> MethodInfo:
    REGISTRY[info.name] = info
    return info


def load_all() -> dict[str, MethodInfo]:
    for mod in METHOD_MODULES:
        importlib.import_module(f"{__name__}.{mod}")
    return REGISTRY


def info_for(config: Any) -> MethodInfo:
    """The registered method whose config class ``config`` is an instance of."""
    for info in load_all().values():
        if isinstance(config, info.config):
            return info
    raise HastenError(f"{config!r} is not an acceleration method: use e.g. hasten.BlockCache(delta=0.5)")


def by_name(name: str) -> MethodInfo:
    reg = load_all()
    if name not in reg:
        raise HastenError(f"unknown method {name!r}; choose one of {', '.join(sorted(reg))}")
    return reg[name]
