"""The shipped decoding models: ``hasten/models/lm/{target,draft}``, ``judge.safetensors``, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import HastenError

__all__ = ["LM_DIR", "Shipped", "load_shipped"]

LM_DIR = Path(__file__).resolve().parent.parent / "models" / "lm"


@dataclass
class Shipped:
    tokenizer: object
    target: object
    draft: object
    judge: object


def load_shipped(folder: str | Path | None = None, threads: int | None = None) -> Shipped:
    """Load target, draft (float32, eval), judge head and tokenizer from ``folder`` (default: shipped)."""
    import torch

    from .judge import JudgeHead
    from .train import load_lm, load_tokenizer

    folder = Path(folder) if folder is not None else LM_DIR
    for part in ("target/config.json", "draft/config.json", "judge.safetensors"):
        if not (folder / part).is_file():
            raise HastenError(f"decoding models are missing: {folder / part} does not exist "
                              "(train them with `python -m hasten.decoding.train --what all`)")
    if threads is not None:
        torch.set_num_threads(threads)
    return Shipped(tokenizer=load_tokenizer(folder), target=load_lm(folder / "target"),
                   draft=load_lm(folder / "draft"), judge=JudgeHead.load(folder / "judge.safetensors"))
