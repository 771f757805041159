"""Acceleration methods: each is a config dataclass plus an ``install(handle, config)`` function.

Every method module registers a :class:`MethodInfo` here under its spec/CLI name (``block-cache``,
``adaptive-guidance``, ``linear-ag``, ...). ``hasten.accelerate`` finds the installer by the config's
type; ``hasten generate --accel NAME:k=v`` and ``hasten calibrate --method NAME`` find it by name.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import HastenError


@dataclass(frozen=True)
class MethodInfo:
    """How hasten drives one method.

    - ``install(handle, config)``: install the method through the handle (see ``hasten.hooks``).
    - ``level``: "call" (whole denoiser calls: guidance), "block" or "token"; ``accelerate`` installs
      call-level methods first, so they are the outermost wrappers.
    - ``from_spec(options: dict[str, str], ctx: SpecContext) -> config``: build a config from a CLI spec
      (may calibrate on the fly; ``ctx`` names the pipeline, steps, solver, schedule, guidance scale).
    - ``calibrate(run: CalibrationRun, config) -> plan dict``: calibrate on a pipeline.
    - ``from_options(options: dict) -> config``: build a config from ``hasten calibrate`` options.
    - ``plot(plan, path)``: draw a calibrated plan.
    - ``cli_calibrate(run, options, out) -> plan``: what ``hasten calibrate`` does (default: build the
      config with ``from_options`` and call ``calibrate``); lets a method write files beside the plan.
    """

    name: str
    config: type
    install: Callable[[Any, Any], None]
    level: str = "block"
    from_spec: Callable[..., Any] | None = None
    calibrate: Callable[..., dict] | None = None
    from_options: Callable[[dict], Any] | None = None
    plot: Callable[[dict, Any], Any] | None = None
    extra: dict = field(default_factory=dict)
    cli_calibrate: Callable[..., dict] | None = None


REGISTRY: dict[str, MethodInfo] = {}
LEVELS = {"call": 0, "block": 1, "token": 2}

# Method modules imported on first use (a module that exists but fails to import raises normally).
METHOD_MODULES = ("block_cache", "guidance", "flexidit")


def register(info: MethodInfo) -> MethodInfo:
    REGISTRY[info.name] = info
    return info


def load_all() -> dict[str, MethodInfo]:
    for mod in METHOD_MODULES:
        if importlib.util.find_spec(f"{__name__}.{mod}") is not None:
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
