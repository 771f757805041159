"""The core (hooks, plans, methods, adapters, api) is a library for any diffusers pipeline: it imports none of
hasten's own pipelines, models, training, evaluation, benchmarks or command line."""

from __future__ import annotations

import ast
from pathlib import Path

import hasten

ROOT = Path(hasten.__file__).parent
CORE = ["hooks.py", "plans.py", "api.py", "errors.py", "io.py", "adapters", "methods"]
OUTSIDE = {"pipeline", "pipelines", "models", "data", "train", "train_shapes", "scale_shift", "eval", "decoding",
           "specs", "cli", "testing"}


def imported_modules(path: Path) -> set[str]:
    """First component below ``hasten`` of every hasten module that ``path`` imports (any depth)."""
    pkg = path.relative_to(ROOT).parent.parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[: len(pkg) - (node.level - 1)]) if node.level > 1 else list(pkg)
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts] if node.module else [base + [a.name] for a in node.names]
            elif node.module and node.module.split(".")[0] == "hasten":
                names = [node.module.split(".")[1:]]
            else:
                continue
            found |= {n[0] for n in names if n}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hasten.")}
    return found


def test_core_imports_nothing_outside_the_core():
    files = [p for c in CORE for p in ([ROOT / c] if c.endswith(".py") else sorted((ROOT / c).rglob("*.py")))]
    assert len(files) >= 10
    bad = {str(p.relative_to(ROOT)): sorted(imported_modules(p) & OUTSIDE) for p in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_check_sees_a_forbidden_import(tmp_path):
    probe = ROOT / "methods" / "_probe_for_test.py"
    probe.write_text("from ..pipeline import HastenPipeline\nfrom hasten.eval import bench\n")
    try:
        assert imported_modules(probe) == {"pipeline", "eval"}
    finally:
        probe.unlink()
