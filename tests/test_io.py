"""Atomic writing: a failed write leaves what was there, and no temporary file behind."""

import pytest

from hasten.errors import HastenError
from hasten.io import atomic_copy, atomic_write, replace_folder, swap_in, write_json


def test_atomic_write_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})

    def fail(tmp: str) -> None:
        open(tmp, "w").write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_refuses_a_missing_folder(tmp_path):
    with pytest.raises(HastenError, match="does not exist"):
        write_json(tmp_path / "no" / "a.json", {})


def test_atomic_copy(tmp_path):
    (tmp_path / "src").write_bytes(b"\x00weights")
    atomic_copy(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == b"\x00weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_replace_folder_swaps_in_a_complete_folder(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    replace_folder(dest, lambda tmp: (tmp / "sub").mkdir() or (tmp / "sub" / "new.txt").write_text("new"))
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["sub", "sub/new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replace_folder_failure_keeps_the_old_folder(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "old.txt").write_text("old")

    def fail(tmp):
        (tmp / "half.bin").write_bytes(b"12")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_folder(dest, fail)
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_swap_in_a_new_folder(tmp_path):
    built = tmp_path / "built"
    built.mkdir()
    (built / "x").write_text("x")
    swap_in(built, tmp_path / "model")
    assert (tmp_path / "model" / "x").read_text() == "x" and not built.exists()
