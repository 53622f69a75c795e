"""Naming a UNet's cross-attention layout in messages. The layers themselves: :func:`refcond.cross_attention_layers`."""

from __future__ import annotations

from collections.abc import Sequence

from refcond import CrossAttentionLayer, cross_attention_layers

__all__ = ["KNOWN_FAMILIES", "CrossAttentionLayer", "cross_attention_layers", "describe_layout", "family"]

#: Cross-attention dims of the released Stable Diffusion families, to name them in messages.
KNOWN_FAMILIES = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "Stable Diffusion XL"}


def describe_layout(layers: Sequence[CrossAttentionLayer]) -> str:
    """``cross-attention dim 768, 16 cross-attention layers`` (for error messages)."""
    dims = sorted({layer.cross_attention_dim for layer in layers})
    dim = dims[0] if len(dims) == 1 else dims
    return f"cross-attention dim {dim}, {len(layers)} cross-attention layers"


def family(cross_attention_dim: int) -> str:
    """A readable name for the backbone family with that cross-attention dim."""
    return KNOWN_FAMILIES.get(cross_attention_dim, "a different UNet")
