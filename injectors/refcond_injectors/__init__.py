"""Injectors for refcond, registered through the ``refcond`` entry-point group.

- ``cross-attention``: decoupled cross-attention with a projector (IP-Adapter, IP-Adapter Plus,
  EasyRef's MLP); imports official IP-Adapter checkpoints (format ``ip-adapter``) and exports a
  composition to that layout (:func:`to_ip_adapter`, :func:`save_ip_adapter`).
- ``lora``: LoRA files (diffusers/PEFT, Kohya/A1111) loaded through diffusers and PEFT, several at
  once with per-LoRA and per-block weights, optionally fused; restores the pipeline exactly.
- compositions ``ip-adapter`` (``clip`` + ``mean`` + ``cross-attention``) and ``ip-adapter-plus``
  (penultimate CLIP tokens + a resampler), and their training recipes (``refcond train --recipe``).
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
    "IP_ADAPTER_PLUS_COMPOSITION",
    "IP_ADAPTER_RECIPES",
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

#: IP-Adapter Plus: the penultimate CLIP layer's tokens, averaged over the references, through a 16-query resampler.
IP_ADAPTER_PLUS_COMPOSITION = {
    "encoder": {"name": "clip", "config": {"output": "hidden_states", "hidden_layer": -2}},
    "aggregator": "mean",
    "injectors": [{"name": "cross-attention", "config": {"projector": "resampler", "num_tokens": 16}}],
}


def _ip_adapter_recipe(composition: dict[str, object], name: str) -> dict[str, object]:
    """IP-Adapter's own training (paper and tutorial_train*.py): projector + image K/V, AdamW 1e-4, wd 0.01, 512 px.

    It trains on image-caption pairs, the image being both the reference and the target: self-reconstruction.
    """
    return {
        "composition": composition,
        "data": {"resolution": 512, "crop": "center", "max_references": 1, "self_reconstruction": 1.0},
        "stages": [
            {
                "name": name,
                "train": ["injector.cross-attention"],
                "steps": 1_000_000,
                "batch_size": 8,
                "optimizer": {"learning_rate": 1e-4, "weight_decay": 0.01},
                "lr_schedule": "constant",
                "dropout": {"references": 0.05, "text": 0.05, "both": 0.05},
                "checkpoint_every": 2000,
            }
        ],
        "export": ["ip-adapter"],
    }


#: Training recipes: `refcond train --recipe NAME --data FILE --model MODEL`.
IP_ADAPTER_RECIPES = {
    "ip-adapter": _ip_adapter_recipe(IP_ADAPTER_COMPOSITION, "ip-adapter"),
    "ip-adapter-plus": _ip_adapter_recipe(IP_ADAPTER_PLUS_COMPOSITION, "ip-adapter-plus"),
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
        "ip-adapter-plus",
        IP_ADAPTER_PLUS_COMPOSITION,
        description="IP-Adapter Plus: the penultimate CLIP layer's tokens averaged over the references, a 16-query resampler.",
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


@hookimpl
def refcond_register_recipes(register: Register) -> None:
    register(
        "ip-adapter",
        IP_ADAPTER_RECIPES["ip-adapter"],
        description="IP-Adapter's training: the linear projector and image keys/values train on 512 px images; exports the official layout.",
    )
    register(
        "ip-adapter-plus",
        IP_ADAPTER_RECIPES["ip-adapter-plus"],
        description="IP-Adapter Plus' training: the resampler and image keys/values train; exports the official layout.",
    )
