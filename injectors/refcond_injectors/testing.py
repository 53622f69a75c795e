"""Test helpers: fabricated IP-Adapter checkpoints in the official layout and LoRA files in the
diffusers/PEFT, attn-procs and Kohya layouts, for tiny offline models.

>>> from refcond.testing import tiny_sd15_pipeline
>>> pipe = tiny_sd15_pipeline()
>>> sd = fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, variant="plus")
>>> sorted(sd)[:2]
['image_proj.latents', 'image_proj.layers.0.0.norm1.bias']
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import torch
from torch import nn

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


# -- LoRA files -------------------------------------------------------------------------------------

LoraLayout = Literal["diffusers", "attn-procs", "kohya"]

#: The UNet modules every layout can address (the attention projections of every transformer block).
_UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
#: Extra modules the diffusers/PEFT and Kohya layouts also reach (a 1x1 conv in SD1.5, a Linear in SDXL).
_UNET_EXTRA = ("proj_in", "ff.net.2")
_TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
_TEXT_EXTRA = ("mlp.fc1",)
#: The attn-procs layout's names for the attention projections.
_ATTN_PROCS = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
_ATTN_PROCS_TEXT = {name: f"{name}.lora_linear_layer" for name in _TEXT_ATTENTION}


def fabricate_lora_state_dict(
    pipeline: Any,
    layout: LoraLayout = "diffusers",
    rank: int = 4,
    seed: int = 0,
    text_encoders: bool = True,
) -> dict[str, torch.Tensor]:
    """Random LoRA weights for ``pipeline``'s UNet (and text encoders), laid out as a LoRA file of that kind.

    :param layout:
        - ``"diffusers"``: diffusers/PEFT (``unet.<module>.lora_A.weight`` / ``lora_B``,
          ``text_encoder.text_model.<module>.lora_A.weight``, ``text_encoder_2.*`` for SDXL);
        - ``"attn-procs"``: diffusers' older attention-processor layout
          (``unet.<...>.attn1.processor.to_q_lora.down.weight`` / ``.up``,
          ``text_encoder.<...>.q_proj.lora_linear_layer.down.weight``);
        - ``"kohya"``: Kohya / A1111 (``lora_unet_<module_with_underscores>.lora_down.weight`` /
          ``lora_up`` / ``alpha``, ``lora_te_*`` or, for SDXL, ``lora_te1_*`` / ``lora_te2_*``; SDXL
          UNet modules under the SGM names ``input_blocks_<n>_1_*`` kohya-ss trains with).
    :param rank: the LoRA rank. Kohya files carry ``alpha = rank / 2`` (a 0.5 scaling).
    :param text_encoders: also target the text encoders' attention (and, except attn-procs, MLP) layers.
    :returns: every ``B``/``up`` weight non-zero, so each targeted layer changes the output.

    Targets: every transformer block's ``to_q``/``to_k``/``to_v``/``to_out.0`` (plus ``proj_in`` and
    ``ff.net.2`` outside the attn-procs layout, which cannot address them).
    """
    if layout not in ("diffusers", "attn-procs", "kohya"):
        raise ValueError(f"unknown LoRA layout {layout!r}; use 'diffusers', 'attn-procs' or 'kohya'.")
    gen = torch.Generator().manual_seed(seed)
    xl = getattr(pipeline, "text_encoder_2", None) is not None
    state: dict[str, torch.Tensor] = {}

    def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(path, layer)`` of the model as it was before any PEFT wrapping (a user may have loaded a LoRA)."""
        out = []
        for path, module in model.named_modules():
            if ".base_layer" in path or ".lora_" in path:
                continue
            out.append((path, module.get_base_layer() if hasattr(module, "get_base_layer") else module))
        return out

    def pair(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(module, nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen) / math.sqrt(module.in_channels)
            up = 0.5 * torch.randn(module.out_channels, rank, 1, 1, generator=gen) / math.sqrt(rank)
        else:
            down = torch.randn(rank, module.in_features, generator=gen) / math.sqrt(module.in_features)
            up = 0.5 * torch.randn(module.out_features, rank, generator=gen) / math.sqrt(rank)
        return down, up

    unet = pipeline.unet
    unet_names = _UNET_ATTENTION if layout == "attn-procs" else _UNET_ATTENTION + _UNET_EXTRA
    for path, module in layers(unet):
        if not any(path.endswith(f".{name}") for name in unet_names) or ".attentions." not in path:
            continue
        if ".transformer_blocks." not in path and not path.endswith(".proj_in"):
            continue
        down, up = pair(module)
        if layout == "diffusers":
            state[f"unet.{path}.lora_A.weight"], state[f"unet.{path}.lora_B.weight"] = down, up
        elif layout == "attn-procs":
            attention, _, projection = path.rpartition(".to_")
            old = _ATTN_PROCS[f"to_{projection}"]
            state[f"unet.{attention}.processor.{old}.down.weight"], state[f"unet.{attention}.processor.{old}.up.weight"] = down, up
        else:
            name = "lora_unet_" + (_sgm_path(path, unet.config.layers_per_block) if xl else path).replace(".", "_")
            state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(rank / 2)}

    if text_encoders:
        encoders = [("text_encoder", pipeline.text_encoder, "lora_te1_" if xl else "lora_te_")]
        if xl:
            encoders.append(("text_encoder_2", pipeline.text_encoder_2, "lora_te2_"))
        text_names = _TEXT_ATTENTION if layout == "attn-procs" else _TEXT_ATTENTION + _TEXT_EXTRA
        for prefix, encoder, kohya_prefix in encoders:
            for path, module in layers(encoder):
                if not isinstance(module, nn.Linear) or not any(path.endswith(f".{name}") for name in text_names):
                    continue
                # LoRA files name CLIP's modules as transformers always used to: under `text_model.`.
                path = path if path.startswith("text_model.") else f"text_model.{path}"
                down, up = pair(module)
                if layout == "diffusers":
                    state[f"{prefix}.{path}.lora_A.weight"], state[f"{prefix}.{path}.lora_B.weight"] = down, up
                elif layout == "attn-procs":
                    layer, _, projection = path.rpartition(".")
                    old = _ATTN_PROCS_TEXT[projection]
                    state[f"{prefix}.{layer}.{old}.down.weight"], state[f"{prefix}.{layer}.{old}.up.weight"] = down, up
                else:
                    name = kohya_prefix + path.replace(".", "_")
                    state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(rank / 2)}
    return state


def _sgm_path(path: str, layers_per_block: int) -> str:
    """The name kohya-ss (SGM's UNet) gives a diffusers UNet module inside an ``attentions`` block."""
    parts = path.split(".")
    if parts[0] == "mid_block":
        return ".".join(["middle_block", "1", *parts[3:]])
    block, layer = int(parts[1]), int(parts[3])
    if parts[0] == "down_blocks":
        index = 1 + block * (layers_per_block + 1) + layer
        return ".".join(["input_blocks", str(index), "1", *parts[4:]])
    index = block * (layers_per_block + 1) + layer
    return ".".join(["output_blocks", str(index), "1", *parts[4:]])


def fabricate_lora_metadata(state_dict: dict[str, torch.Tensor], lora_alpha: float) -> dict[str, str]:
    """safetensors metadata in diffusers' ``lora_adapter_metadata`` form for a ``"diffusers"``-layout dict.

    diffusers builds each component's ``LoraConfig`` from it instead of from the tensors, so a file
    with it loads with this ``lora_alpha`` (not the rank, the tensors' implied default) only if
    the loader reads the file's metadata.
    """
    names = _UNET_ATTENTION + _UNET_EXTRA + _TEXT_ATTENTION + _TEXT_EXTRA
    metadata: dict[str, Any] = {}
    for prefix in sorted({key.split(".", 1)[0] for key in state_dict}):
        modules = {k[len(prefix) + 1 :].split(".lora_A.")[0]: v for k, v in state_dict.items() if k.startswith(f"{prefix}.") and ".lora_A." in k}
        ranks = {int(v.shape[0]) for v in modules.values()}
        if len(ranks) != 1:
            raise ValueError(f"{prefix}: one rank per component expected, got {sorted(ranks)}")
        targets = sorted(name for name in names if any(path.endswith(f".{name}") for path in modules))
        metadata |= {f"{prefix}.r": ranks.pop(), f"{prefix}.lora_alpha": lora_alpha, f"{prefix}.target_modules": targets}
    return {"lora_adapter_metadata": json.dumps(metadata, sort_keys=True)}
