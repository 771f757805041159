"""Model adapters: where the blocks of a transformer are and which streams each block carries."""

from .diffusers import BlockSpec, arg_positions, discover_blocks, unwrap

__all__ = ["BlockSpec", "arg_positions", "discover_blocks", "unwrap"]
