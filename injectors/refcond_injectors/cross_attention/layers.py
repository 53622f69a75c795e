"""Where a UNet's cross-attention layers are, and how wide they are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROCESSOR_SUFFIX = ".processor"


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
        return self.name[: -len(PROCESSOR_SUFFIX)]


def cross_attention_layers(unet: Any) -> list[CrossAttentionLayer]:
    """Every cross-attention layer of ``unet``, in ``unet.attn_processors`` order."""
    layers = []
    for index, name in enumerate(unet.attn_processors):
        if not name.endswith("attn2" + PROCESSOR_SUFFIX):
            continue
        attn = unet.get_submodule(name[: -len(PROCESSOR_SUFFIX)])
        if not getattr(attn, "is_cross_attention", True):
            continue
        layers.append(CrossAttentionLayer(name, index, attn.to_k.out_features, attn.to_k.in_features, attn.heads))
    return layers


def describe_layout(layers: list[CrossAttentionLayer]) -> str:
    """``cross-attention dim 768, 16 cross-attention layers`` (for error messages)."""
    dims = sorted({layer.cross_attention_dim for layer in layers})
    dim = dims[0] if len(dims) == 1 else dims
    return f"cross-attention dim {dim}, {len(layers)} cross-attention layers"


#: Cross-attention dims of the released Stable Diffusion families, to name them in messages.
KNOWN_FAMILIES = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "Stable Diffusion XL"}


def family(cross_attention_dim: int) -> str:
    """A readable name for the backbone family with that cross-attention dim."""
    return KNOWN_FAMILIES.get(cross_attention_dim, "a different UNet")
