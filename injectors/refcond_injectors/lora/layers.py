"""LoRA layers whose weights belong to the composition, not to a LoRA file (EasyRef's UNet LoRA).

The ``lora`` injector with ``layers`` set owns one LoRA per targeted projection of every UNet
attention layer (self- and cross-attention). Its weights are in diffusers' LoRA layout,
``unet.<module>.lora_A.weight`` ``[rank, in]`` and ``unet.<module>.lora_B.weight`` ``[out, rank]``,
so a refcond checkpoint stores them as ``injector.<i>.unet.<module>.lora_{A,B}.weight`` and they
load into the UNet through ``pipeline.load_lora_weights`` like any LoRA file.

Fresh weights start as a LoRA that changes nothing: ``lora_A`` from ``N(0, 1/rank)``, ``lora_B``
zero (the initialisation EasyRef trained from). ``lora_alpha`` equals the rank, so the LoRA's
output is added unscaled, ``W x + B A x``: the official ``LoRALinearLayer`` without
``network_alpha``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from pydantic import Field, field_validator
from torch import nn

from refcond import ComponentConfig, ConfigError

#: Where diffusers' LoRA layout puts the UNet's weights.
UNET_PREFIX = "unet."
_PROCESSOR_SUFFIX = ".processor"


#: The largest LoRA rank (EasyRef: 128; a rank above a layer's width adds nothing).
MAX_RANK = 1024
#: The most projections per attention layer that get a LoRA (diffusers' Attention has four).
MAX_TARGETS = 64
#: The largest LoRA weight in magnitude (1.0 is the trained strength).
MAX_LORA_SCALE = 100.0


class LoraLayersConfig(ComponentConfig):
    """LoRA layers on every UNet attention layer, with weights of their own (checkpoint or fresh)."""

    rank: int = Field(gt=0, le=MAX_RANK, description=f"Rank of every LoRA (EasyRef: 128), 1 to {MAX_RANK}.")
    targets: list[str] = Field(
        default=["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        max_length=MAX_TARGETS,
        description="Projections of each attention layer (attn1 and attn2) that get a LoRA, as named in diffusers' Attention "
        f"(at most {MAX_TARGETS}).",
    )
    scale: float = Field(
        default=1.0,
        ge=-MAX_LORA_SCALE,
        le=MAX_LORA_SCALE,
        description=f"Weight of the LoRA in the UNet (diffusers' set_adapters weight): a finite number from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}.",
    )

    @field_validator("targets")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        repeated = sorted({t for t in value if value.count(t) > 1})
        if repeated:
            raise ValueError(f"targets must be distinct, but {repeated} is listed more than once")
        return value


@dataclass(frozen=True)
class TargetLayer:
    """One linear projection that gets a LoRA: its dotted path in the UNet and its sizes."""

    path: str
    in_features: int
    out_features: int

    def keys(self) -> tuple[str, str]:
        """``(lora_A key, lora_B key)`` in diffusers' LoRA layout."""
        return f"{UNET_PREFIX}{self.path}.lora_A.weight", f"{UNET_PREFIX}{self.path}.lora_B.weight"


def target_layers(unet: nn.Module, targets: list[str]) -> list[TargetLayer]:
    """Every ``<attention>.<target>`` linear of ``unet``, attention layers in ``unet.attn_processors`` order."""
    layers = []
    for name in unet.attn_processors:
        attention = name.removesuffix(_PROCESSOR_SUFFIX)
        for target in targets:
            path = f"{attention}.{target}"
            try:
                module = unet.get_submodule(path)
            except AttributeError:
                raise ConfigError(
                    f"injector 'lora': layers.targets names {target!r}, but the UNet's attention layer {attention} has no such "
                    "module. Targets are projections of diffusers' Attention: to_q, to_k, to_v, to_out.0."
                ) from None
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # a user's PEFT wrapper
            if not isinstance(base, nn.Linear):
                raise ConfigError(f"injector 'lora': layers.targets {target!r} is a {type(base).__name__} in {attention}, not a Linear layer.")
            layers.append(TargetLayer(path, base.in_features, base.out_features))
    return layers


class LoraLayerWeights:
    """The weights of the injector's own LoRA layers, in diffusers' LoRA layout (see the module docstring)."""

    def __init__(self, layers: list[TargetLayer], rank: int, *, device: torch.device | str | None, dtype: torch.dtype | None):
        self.tensors: dict[str, torch.Tensor] = {}
        for layer in layers:
            a, b = layer.keys()
            self.tensors[a] = torch.randn(rank, layer.in_features, device=device, dtype=dtype) / rank
            self.tensors[b] = torch.zeros(layer.out_features, rank, device=device, dtype=dtype)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state_dict`` in (same keys, same shapes: the caller has checked), keeping device and dtype."""
        for key, value in state_dict.items():
            self.tensors[key] = value.detach().to(device=self.tensors[key].device, dtype=self.tensors[key].dtype).clone()


def peft_weight(unet: nn.Module, key: str, adapter_name: str) -> torch.Tensor:
    """The live tensor behind a diffusers-layout key in a UNet that holds the adapter ``adapter_name``."""
    path, _, kind = key.removeprefix(UNET_PREFIX).rpartition(".lora_")
    layer = unet.get_submodule(path)
    table = layer.lora_A if kind == "A.weight" else layer.lora_B
    return table[adapter_name].weight
