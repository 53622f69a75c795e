"""Injectors for refcond, registered through the ``refcond`` entry-point group.

- ``cross-attention``: decoupled cross-attention with a projector (IP-Adapter, IP-Adapter Plus,
  EasyRef's MLP); imports official IP-Adapter checkpoints (format ``ip-adapter``) and exports a
  composition to that layout (:func:`to_ip_adapter`, :func:`save_ip_adapter`).
- ``lora``: LoRA files (diffusers/PEFT, Kohya/A1111) loaded through diffusers and PEFT, several at
  once with per-LoRA and per-block weights, optionally fused; restores the pipeline exactly.
- composition ``ip-adapter``: ``clip`` + ``mean`` + ``cross-attention``.
- composition ``lora-tuning``: no encoder; ``lora`` with ``tuning``: a LoRA tuned on each call's references.
"""

from __future__ import annotations

from refcond import Register, hookimpl
from refcond_injectors.cross_attention import (
    CrossAttentionConfig,
    CrossAttentionInjector,
)
from refcond_injectors.cross_attention.ip_adapter_export import save_ip_adapter, to_ip_adapter
from refcond_injectors.cross_attention.ip_adapter_format import IPAdapterFormat
from refcond_injectors.cross_attention.layers import describe_layout, family
from refcond_injectors.cross_attention.projectors import MLP_OFFICIAL_NAMES, MLPProjector
from refcond_injectors.lora import LoraInjector, LoraInjectorConfig

__all__ = [
    "IP_ADAPTER_COMPOSITION",
    "LORA_TUNING_COMPOSITION",
    "MLP_OFFICIAL_NAMES",
    "CrossAttentionConfig",
    "CrossAttentionInjector",
    "IPAdapterFormat",
    "LoraInjector",
    "LoraInjectorConfig",
    "MLPProjector",
    "describe_layout",
    "family",
    "save_ip_adapter",
    "to_ip_adapter",
]

#: IP-Adapter: pooled CLIP embeddings of the references, averaged, projected to 4 tokens each.
IP_ADAPTER_COMPOSITION = {
    "encoder": {"name": "clip", "config": {"output": "image_embeds"}},
    "aggregator": "mean",
    "injectors": [{"name": "cross-attention", "config": {"projector": "linear", "num_tokens": 4}}],
}

#: The tuning-based baseline: no encoder; a LoRA fine-tuned on each call's reference group.
LORA_TUNING_COMPOSITION = {"injectors": [{"name": "lora", "config": {"tuning": {}}}]}


@hookimpl
def refcond_register_injectors(register: Register) -> None:
    register(
        "cross-attention",
        CrossAttentionInjector.from_config,
        config=CrossAttentionConfig,
        description="Decoupled cross-attention with a projector (IP-Adapter, IP-Adapter Plus, EasyRef MLP).",
    )
    register(
        "lora",
        LoraInjector.from_config,
        config=LoraInjectorConfig,
        description="LoRA files (diffusers/PEFT, Kohya/A1111) loaded through diffusers and PEFT; several at once, per-block weights, fusing.",
    )


@hookimpl
def refcond_register_compositions(register: Register) -> None:
    register(
        "ip-adapter",
        IP_ADAPTER_COMPOSITION,
        description="IP-Adapter: CLIP image embeddings averaged over the references, decoupled cross-attention.",
    )
    register(
        "lora-tuning",
        LORA_TUNING_COMPOSITION,
        description="LoRA tuned on each reference group (DreamBooth-LoRA), then generation with it: the tuning-based baseline.",
    )


@hookimpl
def refcond_register_checkpoint_formats(register: Register) -> None:
    register(
        "ip-adapter",
        IPAdapterFormat(),
        description="Official IP-Adapter files (image_proj.*, ip_adapter.<N>.to_k_ip.weight): base, Plus, Full.",
    )
