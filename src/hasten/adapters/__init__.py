"""Model adapters: where the blocks of a transformer are and which streams each block carries."""

from .diffusers import BlockSpec, discover_blocks

__all__ = ["BlockSpec", "discover_blocks"]
