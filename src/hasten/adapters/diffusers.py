"""Block discovery for diffusers transformers.

A block is ``B_i(x) = x + C_i(x)`` for each stream it carries. :class:`BlockSpec` says which forward
arguments are the block's input streams and, for blocks returning a tuple, which output position holds
which stream. Discovery, in order:

1. ``blocks=[...]`` given to ``hasten.accelerate``: modules (their forward returns one tensor, the
   first argument's stream), dotted names such as ``"layers.3"``, or :class:`BlockSpec` objects.
2. diffusers' own block metadata (``diffusers.hooks._helpers.TransformerBlockRegistry``, what its
   caches use): every top-level ``ModuleList`` of the model whose blocks are instances of a
   registered block class, in the model's order, with the registered return indices and argument
   names. This covers DiT, PixArt, SD3, Flux, CogVideoX, HunyuanVideo, LTX-Video, Mochi, QwenImage,
   Wan and the other families diffusers registers, and any subclass of their blocks.
3. The fallback table :data:`FAMILIES` (model class or a base of it -> ModuleList attributes), for
   models whose blocks diffusers does not register (Sana).

The model is unwrapped first: ``torch.compile`` (``_orig_mod``) and PEFT (``base_model.model``)
wrappers are looked through, and LoRA-injected blocks keep their class.

Streams per family (output order): single-stream blocks return ``hidden_states``; joint blocks
return ``(encoder_hidden_states, hidden_states)`` (SD3, Flux, QwenImage) or ``(hidden_states,
encoder_hidden_states)`` (CogVideoX, HunyuanVideo, Mochi). SD3's and Mochi's last blocks may return
``None`` for the context stream; a reused block returns ``None`` there too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
EH = ("encoder_hidden_states", "hidden_states")  # blocks returning (text stream, image stream)

# Models whose blocks diffusers' registry describes wrongly, checked before it: class name -> (ModuleList
# attribute, outputs). Bria's joint block returns both streams but is registered with one, and its single-stream
# blocks are not registered (without this, Block Caching subtracted a tensor from a tuple).
OVERRIDES: dict[str, list[tuple[str, tuple[str | None, ...]]]] = {
    "BriaTransformer2DModel": [("transformer_blocks", EH), ("single_transformer_blocks", EH)],
}

# Fallback for models whose blocks diffusers' registry lacks: class name -> (ModuleList attribute, outputs)
FAMILIES: dict[str, list[tuple[str, tuple[str | None, ...]]]] = {
    "SanaTransformer2DModel": [("transformer_blocks", HS)],
}

HOW = ("pass blocks explicitly: hasten.accelerate(model, ..., blocks=[model.layers[0], ...]), and the same "
       "blocks= to hasten.calibrate (modules returning one tensor, dotted names, or hasten.adapters.BlockSpec "
       "for tuple outputs)")


def arg_positions(module: nn.Module, names: Sequence[str | None]) -> list[int | None]:
    """Positions of the stream arguments in the block class's forward (instance wrappers are ignored)."""
    import inspect

    params = [p.name for p in inspect.signature(type(module).forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    return [params.index(n) if n in params else None for n in names]


def stream_inputs(names: Sequence[str | None], positions: Sequence[int | None], args: tuple,
                  kwargs: dict) -> list[Any]:
    """The block call's stream arguments, by keyword or at their :func:`arg_positions` (None when absent)."""
    return [kwargs[n] if n in kwargs else (args[p] if p is not None and p < len(args) else None)
            for n, p in zip(names, positions, strict=False)]


def _takes(module: nn.Module, name: str) -> bool:
    """Whether the block class's forward takes an argument ``name`` (or any keyword: ``**kwargs``)."""
    import inspect

    params = inspect.signature(type(module).forward).parameters.values()
    return any(p.name == name or p.kind == p.VAR_KEYWORD for p in params)


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


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` (``_orig_mod``) and PEFT (``base_model.model``) wrappers."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__.startswith("Peft"):
            inner = getattr(getattr(model, "base_model", None), "model", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def _registered_outputs(block: nn.Module) -> tuple[str | None, ...] | None:
    """The block's stream outputs from diffusers' TransformerBlockRegistry (``None``: not registered)."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        TransformerBlockRegistry._register()
        registry = TransformerBlockRegistry._registry
    except Exception:  # an older or newer diffusers without the registry: fall back to the table
        return None
    meta = next((registry[c] for c in type(block).__mro__ if c in registry), None)
    if meta is None:
        return None
    named = {meta.return_hidden_states_index: meta.hidden_states_argument_name}
    if meta.return_encoder_hidden_states_index is not None:
        named[meta.return_encoder_hidden_states_index] = meta.encoder_hidden_states_argument_name
    return tuple(named.get(k) for k in range(max(named) + 1))


def _from_registry(model: nn.Module) -> list[BlockSpec]:
    specs: list[BlockSpec] = []
    for attr, child in model.named_children():
        if not isinstance(child, nn.ModuleList) or len(child) == 0:
            continue
        outs = [_registered_outputs(b) for b in child]
        if any(o is None for o in outs):
            continue
        for b, o in zip(child, outs, strict=True):  # diffusers' metadata can name an argument the block lacks
            missing = [n for n in o if n is not None and not _takes(b, n)]
            if missing:
                raise HastenError(f"diffusers' block metadata for {type(b).__name__} names the argument "
                                  f"{missing[0]!r}, which its forward does not take; {HOW}")
        specs += [BlockSpec(b, f"{attr}.{j}", o) for j, (b, o) in enumerate(zip(child, outs, strict=True))]
    return specs


def discover_blocks(model: nn.Module, explicit: Sequence | None = None) -> list[BlockSpec]:
    """The blocks of ``model`` in execution order (the explicit list if given)."""
    model = unwrap(model)
    if explicit is not None:
        specs = [_resolve(model, item, i) for i, item in enumerate(explicit)]
        if not specs:
            raise HastenError(f"the explicit block list is empty; {HOW}")
        return specs
    specs = _from_table(model, OVERRIDES) or _from_registry(model) or _from_table(model, FAMILIES)
    if not specs:
        raise HastenError(f"hasten does not know the blocks of {type(model).__name__}; {HOW}")
    return specs


def _from_table(model: nn.Module, table: dict) -> list[BlockSpec]:
    """The blocks a table gives for the model's class or its nearest base in it (none: an empty list)."""
    family = next((table[c.__name__] for c in type(model).__mro__ if c.__name__ in table), None)
    return [BlockSpec(module, f"{attr}.{j}", outputs) for attr, outputs in family or []
            for j, module in enumerate(getattr(model, attr))]
