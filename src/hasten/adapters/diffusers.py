"""Block discovery for diffusers transformers.

A block is ``B_i(x) = x + C_i(x)`` for each stream it carries. :class:`BlockSpec` says which forward
arguments are the block's input streams and, for blocks returning a tuple, which output position holds
which stream. Known families:

| model class | blocks | outputs |
|---|---|---|
| DiTTransformer2DModel, PixArtTransformer2DModel | ``transformer_blocks`` | hidden_states |
| SD3Transformer2DModel (joint) | ``transformer_blocks`` | (encoder_hidden_states, hidden_states) [1] |
| FluxTransformer2DModel | ``transformer_blocks`` + ``single_transformer_blocks`` | (encoder_hs, hs) |
| CogVideoXTransformer3DModel | ``transformer_blocks`` | (hidden_states, encoder_hidden_states) |
| WanTransformer3DModel | ``blocks`` | hidden_states |

[1] SD3's last joint block returns ``None`` for the context stream; a reused block returns ``None`` there too.
Flux's single-stream blocks take and return both streams separately (they concatenate inside).

Limitation: caches are per row of the transformer batch, so pipelines that batch classifier-free
guidance into one call (hasten, DiT, PixArt, SD3, CogVideoX, Wan) keep conditional and unconditional
residuals apart; a pipeline that sends the two branches as separate calls with the same rows (Flux's
``true_cfg_scale``) would share one cache between branches and is not supported by Block Caching.

Any other model: pass the blocks explicitly, ``hasten.accelerate(model, ..., blocks=[...])``, as
modules (their forward returns one tensor, the first argument's stream), dotted names such as
``"layers.3"``, or :class:`BlockSpec` objects for tuple-returning blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import HastenError


@dataclass
class BlockSpec:
    """One block: its module, a name, and the stream arguments in output order.

    ``outputs`` names, for each element of the block's output (a single tensor counts as one element),
    the forward argument that holds the same stream on input. ``None`` marks an output position that
    is not a stream.
    """

    module: nn.Module
    name: str = ""
    outputs: tuple[str | None, ...] = ("hidden_states",)

    @property
    def single(self) -> bool:
        return len(self.outputs) == 1


HS = ("hidden_states",)
ENC_HS = ("encoder_hidden_states", "hidden_states")
HS_ENC = ("hidden_states", "encoder_hidden_states")

# class name -> list of (ModuleList attribute, outputs)
FAMILIES: dict[str, list[tuple[str, tuple[str | None, ...]]]] = {
    "DiTTransformer2DModel": [("transformer_blocks", HS)],
    "PixArtTransformer2DModel": [("transformer_blocks", HS)],
    "SD3Transformer2DModel": [("transformer_blocks", ENC_HS)],
    "FluxTransformer2DModel": [("transformer_blocks", ENC_HS), ("single_transformer_blocks", ENC_HS)],
    "CogVideoXTransformer3DModel": [("transformer_blocks", HS_ENC)],
    "WanTransformer3DModel": [("blocks", HS)],
}

HOW = ("pass blocks explicitly: hasten.accelerate(model, ..., blocks=[model.layers[0], ...]) "
       "(modules returning one tensor, dotted names, or hasten.adapters.BlockSpec for tuple outputs)")


def _first_param(module: nn.Module) -> str:
    import inspect

    params = [p for p in inspect.signature(type(module).forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    if not params:
        raise HastenError(f"block {type(module).__name__} takes no positional input; {HOW}")
    return params[0].name


def _resolve(model: nn.Module, item: object, i: int) -> BlockSpec:
    if isinstance(item, BlockSpec):
        return item
    if isinstance(item, str):
        try:
            module = model.get_submodule(item)
        except AttributeError:
            raise HastenError(f"model {type(model).__name__} has no submodule {item!r}") from None
        return BlockSpec(module, item, (_first_param(module),))
    if isinstance(item, nn.Module):
        return BlockSpec(item, f"block{i}", (_first_param(item),))
    raise HastenError(f"cannot use {item!r} as a block; {HOW}")


def discover_blocks(model: nn.Module, explicit: Sequence | None = None) -> list[BlockSpec]:
    """The blocks of ``model`` in execution order (the explicit list if given)."""
    if explicit is not None:
        specs = [_resolve(model, item, i) for i, item in enumerate(explicit)]
        if not specs:
            raise HastenError(f"the explicit block list is empty; {HOW}")
        return specs
    # The class or its nearest known base (a subclass such as hasten's ShapesTransformer2DModel of SD3).
    family = next((FAMILIES[c.__name__] for c in type(model).__mro__ if c.__name__ in FAMILIES), None)
    if family is None:
        raise HastenError(f"hasten does not know the blocks of {type(model).__name__}; {HOW}")
    specs: list[BlockSpec] = []
    for attr, outputs in family:
        for j, module in enumerate(getattr(model, attr)):
            specs.append(BlockSpec(module, f"{attr}.{j}", outputs))
    return specs
