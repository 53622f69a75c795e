"""What injectors need to know about a diffusers UNet: where its attention layers are, and per-block strengths.

- :func:`cross_attention_layers` lists the cross-attention (``attn2``) layers in
  ``unet.attn_processors`` order: the order official IP-Adapter files number their layers in, and
  the order an injector's per-layer weights should follow.
- :func:`layer_scales` turns a strength given as a number or per block — the InstantStyle format
  of diffusers' ``set_ip_adapter_scale`` and ``set_adapters`` — into one number per layer, so a
  third-party injector reads ``reference_scale`` exactly as the built-in ones do.

The per-block format::

    {"down": 0.5,                                 # every transformer of every down block
     "mid": 1.0,                                  # the mid block
     "up": {"block_0": [0.0, 1.0, 0.0],           # one value per transformer (attentions.k) of the block
            "block_1": 0.8}}                      # or one for the whole block

Blocks and sides that are not listed get ``default`` (0.0 for reference strength, as diffusers'
IP-Adapter; 1.0 for LoRA weights, as diffusers' ``set_adapters``). A block without attention
layers, an unknown side, a list of the wrong length, or a value that is not a finite number is a
:class:`refcond.ConfigError` naming it: diffusers would silently ignore some of these.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from refcond.errors import ConfigError

PROCESSOR_SUFFIX = ".processor"
#: The largest strength in magnitude: beyond it attention outputs overflow (to inf, then NaN images).
MAX_STRENGTH = 1000.0
#: The sides of a per-block strength.
BLOCK_SIDES = ("down", "mid", "up")

_TRANSFORMER = re.compile(r"^(?:(?P<side>down|up)_blocks\.(?P<block>\d+)|mid_block)\.attentions\.(?P<index>\d+)(?:\.|$)")


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention (``attn2``) layer of a UNet.

    :ivar name: its key in ``unet.attn_processors`` (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor``).
    :ivar index: its position in ``unet.attn_processors`` (the ``N`` of official IP-Adapter files).
    :ivar hidden_size: output size of its ``to_k``/``to_v`` (heads * head_dim).
    :ivar cross_attention_dim: input size of its ``to_k``/``to_v`` (the text token size).
    :ivar heads: its number of attention heads.
    """

    name: str
    index: int
    hidden_size: int
    cross_attention_dim: int
    heads: int

    @property
    def module_path(self) -> str:
        """The dotted path of the ``Attention`` module inside the UNet."""
        return self.name.removesuffix(PROCESSOR_SUFFIX)


def cross_attention_layers(unet: Any) -> list[CrossAttentionLayer]:
    """Every cross-attention layer of ``unet``, in ``unet.attn_processors`` order."""
    layers = []
    for index, name in enumerate(unet.attn_processors):
        if not name.endswith("attn2" + PROCESSOR_SUFFIX):
            continue
        attn = unet.get_submodule(name.removesuffix(PROCESSOR_SUFFIX))
        if not getattr(attn, "is_cross_attention", True):
            continue
        layers.append(CrossAttentionLayer(name, index, attn.to_k.out_features, attn.to_k.in_features, attn.heads))
    return layers


def transformer_blocks(unet: Any) -> dict[str, dict[str, int]]:
    """How many transformers (``attentions.k``) each block with attention layers has, by side.

    ``{"down": {"block_1": 2, "block_2": 2}, "mid": {"mid": 1}, "up": {"block_0": 3, ...}}``; blocks
    without attention layers are left out.
    """
    out: dict[str, dict[str, int]] = {"down": {}, "mid": {}, "up": {}}
    for side, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        for i, block in enumerate(blocks):
            attentions = getattr(block, "attentions", None)
            if attentions is not None and len(attentions):
                out[side][f"block_{i}"] = len(attentions)
    mid = getattr(unet, "mid_block", None)
    if mid is not None and len(getattr(mid, "attentions", None) or []):
        out["mid"]["mid"] = len(mid.attentions)
    return out


def layer_scales(
    unet: Any,
    layers: Sequence[str],
    scale: float | Mapping[str, Any] | None,
    *,
    default: float = 0.0,
    base: float = 1.0,
    what: str = "reference_scale",
) -> list[float]:
    """One strength per layer, from a number or a per-block dict (see the module docstring).

    :param layers: the layers' names: module paths or ``unet.attn_processors`` keys. A layer outside
        any transformer block gets ``base * default`` under a per-block dict.
    :param scale: ``None`` (``base`` everywhere), a number for every layer, or a per-block dict.
    :param default: the value of blocks and sides a per-block dict does not list.
    :param base: a factor applied to every value (an injector's configured strength).
    :param what: how error messages name the argument.
    """
    if scale is None:
        return [float(base)] * len(layers)
    if not isinstance(scale, Mapping):
        return [float(base) * _number(scale, what)] * len(layers)
    per_transformer = _expand(unet, scale, default, what)
    out = []
    for name in layers:
        match = _TRANSFORMER.match(name)
        key = None if match is None else ("mid" if match["side"] is None else f"{match['side']}.block_{match['block']}", int(match["index"]))
        out.append(float(base) * per_transformer.get(key, float(default)))
    return out


def _expand(unet: Any, scale: Mapping[str, Any], default: float, what: str) -> dict[tuple[str, int], float]:
    """``{("down.block_1", 0): 0.5, ("mid", 0): 1.0, ...}`` for every transformer of every block."""
    unknown = sorted(set(map(str, scale)) - set(BLOCK_SIDES))
    if unknown:
        raise ConfigError(f"{what}: unknown block group(s) {unknown}; a per-block strength has the keys 'down', 'mid' and 'up'.")
    blocks = transformer_blocks(unet)
    out: dict[tuple[str, int], float] = {}
    for side in BLOCK_SIDES:
        given = scale.get(side, default)
        if side == "mid":
            given = {"mid": given}
        elif not isinstance(given, Mapping):
            given = {block: given for block in blocks[side]}
        else:
            missing = sorted(set(map(str, given)) - set(blocks[side]))
            if missing:
                raise ConfigError(
                    f"{what}: {side} has no block(s) with attention layers named {missing} in this UNet; "
                    f"its {side} blocks with attention layers are {sorted(blocks[side]) or 'none'}."
                )
        for block, count in blocks[side].items():
            value = given.get(block, default)
            where = side if side == "mid" else f"{side}.{block}"
            values = _per_transformer(value, count, f"{what} {where}")
            for index, v in enumerate(values):
                out[(where, index)] = v
    return out


def _per_transformer(value: Any, count: int, where: str) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = list(value) * count
        if len(value) != count:
            raise ConfigError(f"{where}: the block has {count} transformer(s), so give 1 or {count} values, got {len(value)}: {list(value)}.")
        return [_number(v, where) for v in value]
    return [_number(value, where)] * count


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{where} must be a number or a per-block dict like {{'up': {{'block_0': [0.0, 1.0, 0.0]}}}}, got {value!r}.")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{where} must be a finite number, got {number}: NaN or infinite strengths turn the image into NaN (negative strengths are allowed).")
    if abs(number) > MAX_STRENGTH:
        raise ConfigError(f"{where} is {number:g}; strengths lie within ±{MAX_STRENGTH:g} (beyond that the attention overflows). Typical values are 0 to 1.5.")
    return number
