"""The Judge Decoding head (Bachmann et al. 2025, arXiv 2501.19309, Sec. 4).

A logistic unit on the FROZEN target's last-layer hidden state ``h_i`` at each drafted token's own
position (the state the target computes after reading ``d_i``):

    s_i = w . h_i + b          (a logit; P(token i is acceptable) = sigmoid(s_i))

``hidden_size + 1`` parameters. During decoding a drafted token is accepted when standard
verification accepts it OR ``s_i > threshold`` (see ``speculative.verify``). The paper thresholds the
probability at ``delta`` in [0.5, 1]; we store the equivalent logit ``log(delta / (1 - delta))`` so that
``+inf`` (``delta = 1``) means "judge off" and ``-inf`` means "accept everything drafted".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import HastenError

__all__ = ["JudgeHead", "prob_to_logit"]


def prob_to_logit(delta: float) -> float:
    """The paper's probability threshold ``delta`` as a logit threshold (1 -> +inf, 0 -> -inf)."""
    if delta >= 1:
        return math.inf
    if delta <= 0:
        return -math.inf
    return math.log(delta / (1 - delta))


class JudgeHead(nn.Module):
    """Linear judge ``s = w . h + b`` on the target's last hidden state; ``threshold`` is a logit."""

    def __init__(self, hidden_size: int, threshold: float = 0.0, meta: dict | None = None):
        super().__init__()
        if hidden_size < 1:
            raise HastenError(f"JudgeHead hidden_size must be >= 1, got {hidden_size}")
        self.hidden_size = int(hidden_size)
        self.threshold = float(threshold)
        self.meta = dict(meta or {})
        self.linear = nn.Linear(self.hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden_size) -> (...,) logits."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of the hidden states (m, hidden_size), with the input size checked."""
        if hidden.shape[-1] != self.hidden_size:
            raise HastenError(
                f"judge head expects hidden states of size {self.hidden_size}, got {hidden.shape[-1]}")
        return self(hidden).float()

    def check_model(self, target: nn.Module) -> None:
        """Raise a clear error when the target's hidden size is not the one this head was trained for."""
        size = getattr(target.config, "hidden_size", None) or getattr(target.config, "n_embd", None)
        if size is None:
            size = target.get_output_embeddings().weight.shape[1]
        if int(size) != self.hidden_size:
            raise HastenError(f"judge head was made for hidden size {self.hidden_size}, "
                              f"but the target model has hidden size {size}")

    # ---- persistence: safetensors weights + the threshold and metadata in the header
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (a .safetensors file) atomically; the threshold and meta go in its header."""
        from safetensors.torch import save_file

        from ..io import atomic_write

        meta = {"hidden_size": str(self.hidden_size), "threshold": repr(self.threshold),
                "meta": json.dumps(self.meta)}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> JudgeHead:
        """Read a head written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise HastenError(f"judge head file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - any unreadable file becomes one clear message
            raise HastenError(f"cannot read judge head {path}: {e}") from None
        if "hidden_size" not in header or "linear.weight" not in tensors:
            raise HastenError(f"{path} is not a hasten judge head (missing hidden_size or linear.weight)")
        try:
            head = cls(int(header["hidden_size"]), float(header.get("threshold", "0.0")),
                       json.loads(header.get("meta", "{}")))
            head.load_state_dict({k: v.float() for k, v in tensors.items()})
        except (ValueError, RuntimeError, TypeError) as e:
            raise HastenError(f"{path} is not a valid hasten judge head: {str(e).splitlines()[0]}") from None
        return head.eval()
