"""Atomic file writing: nothing on disk is ever half-written (write a temporary file, then rename)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import HastenError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise HastenError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise HastenError(f"cannot write {path}: folder {parent} is not writable")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    return atomic_write(path, _write)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy the file ``src`` to ``dst``, atomically."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def replace_folder(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp)`` beside ``path``, then swap it in: a reader finds the old folder or the
    complete new one, never a half-written one (between the two renames ``path`` is briefly absent). A failed
    ``fill`` leaves the old folder as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return swap_in(tmp, path)


def swap_in(built: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename the complete folder ``built`` to ``path``, replacing the folder there (two renames, then the old
    folder is removed)."""
    built, path = Path(built), Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)
    built.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any expensive work) when ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise HastenError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise HastenError(f"cannot write {path}: permission denied")
    if path.is_dir():
        raise HastenError(f"cannot write {path}: it is a folder")
    return path


def read_model_folder(folder: str | os.PathLike, config_name: str, weights_name: str, error: str
                      ) -> tuple[Any, dict[str, Any]]:
    """The JSON config and the safetensors weights of a saved model folder (a student, a FlexiDiT fine-tune);
    a missing or unreadable file is the one-line ``HastenError`` "``error``: reason"."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        return json.loads((folder / config_name).read_text()), load_file(str(folder / weights_name))
    except (OSError, ValueError) as e:
        raise HastenError(f"{error}: {e}") from None


def check_out_folder(path: str | os.PathLike) -> Path:
    """Fail early (before any expensive work) when the output folder ``path`` cannot be created or written:
    it exists as a file, or its nearest existing ancestor is a file or not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HastenError(f"--out {path} exists and is not a folder")
    anc = path
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK):
        raise HastenError(f"cannot create --out {path}: {anc} is not a writable folder")
    return path
