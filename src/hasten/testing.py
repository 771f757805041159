"""Helpers for hasten's own tests (and users' tests of scripts built on hasten)."""

from __future__ import annotations

import sys


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``hasten ARGS`` in-process through the real entry point; returns (exit code, stdout, stderr).

    ``capsys`` is pytest's fixture; the console entry point is used so that the one-line error and
    exit-code-2 path is the one users get.
    """
    from .cli import main

    old = sys.argv
    sys.argv = ["hasten", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err
