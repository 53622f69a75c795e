"""Per-layer strengths from a float or an InstantStyle per-block dict, as diffusers' ``set_ip_adapter_scale`` reads them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

from refcond import ConfigError
from refcond_injectors.blocks import unknown_blocks
from refcond_injectors.cross_attention.layers import CrossAttentionLayer


def layer_scales(unet: Any, layers: list[CrossAttentionLayer], scale: float | Mapping[str, Any] | None, base: float = 1.0) -> list[float]:
    """One strength per cross-attention layer.

    :param scale: ``None`` (1.0), a float for every layer, or a dict such as
        ``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}, "mid": 0.5}``: one
        value per transformer (``attentions.k``) of a block, or one for the whole block; blocks
        not listed get 0.0, as in diffusers.
    :param base: the injector's configured strength, multiplied into every value.
    """
    if scale is None:
        return [float(base)] * len(layers)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return [float(base) * float(scale)] * len(layers)
    if not isinstance(scale, Mapping):
        raise ConfigError(
            f"reference_scale must be a number or a per-block dict like {{'up': {{'block_0': [0.0, 1.0, 0.0]}}}}, got {type(scale).__name__}."
        )
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise ConfigError(f"reference_scale: unknown block group(s) {sorted(unknown)}; use 'down', 'mid' and 'up'.")
    _check_blocks(unet, scale)
    try:
        (expanded,) = _maybe_expand_lora_scales(unet, [dict(scale)], default_scale=0.0)
    except (ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"reference_scale {dict(scale)!r} does not fit this UNet: {exc}") from None
    out = []
    for layer in layers:
        value = 0.0
        for prefix, s in expanded.items():  # the last matching prefix wins, as in set_ip_adapter_scale
            if layer.name.startswith(prefix):
                value = s
        if isinstance(value, (list, tuple)):
            raise ConfigError(f"reference_scale: per-image scale lists are not supported (got {value!r} for {layer.name}).")
        out.append(float(base) * float(value))
    return out


def _check_blocks(unet: Any, scale: Mapping[str, Any]) -> None:
    """Name the blocks diffusers would silently ignore."""
    found = unknown_blocks(unet, scale)
    if found:
        group, unknown, valid = found
        raise ConfigError(
            f"reference_scale {dict(scale)!r} does not fit this UNet: {group} has no cross-attention block(s) "
            f"{unknown}; its blocks with cross-attention are {valid}."
        )
