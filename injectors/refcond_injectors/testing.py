"""Test helpers: fabricated IP-Adapter checkpoints in the official layout, for tiny offline models.

>>> from refcond.testing import tiny_sd15_pipeline
>>> pipe = tiny_sd15_pipeline()
>>> sd = fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, variant="plus")
>>> sorted(sd)[:2]
['image_proj.latents', 'image_proj.layers.0.0.norm1.bias']
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from refcond_injectors.cross_attention.layers import cross_attention_layers

Variant = Literal["base", "plus", "full"]


def fabricate_ip_adapter_state_dict(
    unet: Any,
    image_encoder: Any,
    variant: Variant = "base",
    num_tokens: int | None = None,
    seed: int = 0,
    *,
    resampler_dim: int | None = None,
    resampler_heads: int | None = None,
    resampler_depth: int = 4,
) -> dict[str, torch.Tensor]:
    """Random weights laid out exactly as an official IP-Adapter ``.safetensors`` file for ``unet``.

    :param variant: ``"base"`` (``image_proj.proj`` reading pooled ``image_embeds``; diffusers only
        loads 4 tokens), ``"plus"`` (perceiver resampler over CLIP hidden states, 64-d heads, as
        diffusers expects) or ``"full"`` (MLP over CLIP hidden states).
    :param num_tokens: tokens per reference; default 4 (base) or 16 (plus).
    :param resampler_dim: width of the resampler's latents; default the UNet's cross-attention dim.
    :returns: a flat dict (``image_proj.*``, ``ip_adapter.<N>.to_{k,v}_ip.weight``) with random
        values everywhere, LayerNorm weights included, so a parity test checks every parameter.
    """
    gen = torch.Generator().manual_seed(seed)
    layers = cross_attention_layers(unet)
    cross = layers[0].cross_attention_dim

    def linear(out_dim: int, in_dim: int) -> torch.Tensor:
        return torch.randn(out_dim, in_dim, generator=gen) / math.sqrt(in_dim)

    def vector(dim: int, centre: float = 0.0) -> torch.Tensor:
        return centre + 0.1 * torch.randn(dim, generator=gen)

    proj: dict[str, torch.Tensor] = {}
    if variant == "base":
        tokens = num_tokens or 4
        in_dim = image_encoder.config.projection_dim
        proj = {"proj.weight": linear(tokens * cross, in_dim), "proj.bias": vector(tokens * cross)}
        proj |= {"norm.weight": vector(cross, 1.0), "norm.bias": vector(cross)}
    elif variant == "full":
        hidden = image_encoder.config.hidden_size
        proj = {"proj.0.weight": linear(hidden, hidden), "proj.0.bias": vector(hidden)}
        proj |= {"proj.2.weight": linear(cross, hidden), "proj.2.bias": vector(cross)}
        proj |= {"proj.3.weight": vector(cross, 1.0), "proj.3.bias": vector(cross)}
    elif variant == "plus":
        tokens = num_tokens or 16
        in_dim = image_encoder.config.hidden_size
        dim = resampler_dim or cross
        inner = 64 * (resampler_heads or max(1, dim // 64))
        proj["latents"] = torch.randn(1, tokens, dim, generator=gen) / math.sqrt(dim)
        proj |= {"proj_in.weight": linear(dim, in_dim), "proj_in.bias": vector(dim)}
        for i in range(resampler_depth):
            p = f"layers.{i}"
            for norm in ("0.norm1", "0.norm2", "1.0"):
                proj |= {f"{p}.{norm}.weight": vector(dim, 1.0), f"{p}.{norm}.bias": vector(dim)}
            proj[f"{p}.0.to_q.weight"] = linear(inner, dim)
            proj[f"{p}.0.to_kv.weight"] = linear(2 * inner, dim)
            proj[f"{p}.0.to_out.weight"] = linear(dim, inner)
            proj[f"{p}.1.1.weight"] = linear(4 * dim, dim)
            proj[f"{p}.1.3.weight"] = linear(dim, 4 * dim)
        proj |= {"proj_out.weight": linear(cross, dim), "proj_out.bias": vector(cross)}
        proj |= {"norm_out.weight": vector(cross, 1.0), "norm_out.bias": vector(cross)}
    else:
        raise ValueError(f"unknown IP-Adapter variant {variant!r}; use 'base', 'plus' or 'full'.")

    state = {f"image_proj.{k}": v for k, v in proj.items()}
    for layer in layers:
        for name in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{layer.index}.{name}.weight"] = linear(layer.hidden_size, layer.cross_attention_dim)
    return state
