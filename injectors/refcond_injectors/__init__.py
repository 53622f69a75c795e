"""Injectors for refcond, registered through the ``refcond`` entry-point group.

- ``cross-attention``: decoupled cross-attention with a projector (IP-Adapter, IP-Adapter Plus,
  EasyRef's MLP); imports official IP-Adapter checkpoints (format ``ip-adapter``).
- composition ``ip-adapter``: ``clip`` + ``mean`` + ``cross-attention``.
"""

from __future__ import annotations

from refcond import hookimpl
from refcond.registry import Register
from refcond_injectors.cross_attention import (
    CrossAttentionConfig,
    CrossAttentionInjector,
)
from refcond_injectors.cross_attention.ip_adapter_format import IPAdapterFormat

__all__ = ["IP_ADAPTER_COMPOSITION", "CrossAttentionConfig", "CrossAttentionInjector", "IPAdapterFormat"]

#: IP-Adapter: pooled CLIP embeddings of the references, averaged, projected to 4 tokens each.
IP_ADAPTER_COMPOSITION = {
    "encoder": {"name": "clip", "config": {"output": "image_embeds"}},
    "aggregator": "mean",
    "injectors": [{"name": "cross-attention", "config": {"projector": "linear", "num_tokens": 4}}],
}


@hookimpl
def refcond_register_injectors(register: Register) -> None:
    register(
        "cross-attention",
        CrossAttentionInjector.from_config,
        config=CrossAttentionConfig,
        description="Decoupled cross-attention with a projector (IP-Adapter, IP-Adapter Plus, EasyRef MLP).",
    )


@hookimpl
def refcond_register_compositions(register: Register) -> None:
    register(
        "ip-adapter",
        IP_ADAPTER_COMPOSITION,
        description="IP-Adapter: CLIP image embeddings averaged over the references, decoupled cross-attention.",
    )


@hookimpl
def refcond_register_checkpoint_formats(register: Register) -> None:
    register(
        "ip-adapter",
        IPAdapterFormat(),
        description="Official IP-Adapter files (image_proj.*, ip_adapter.<N>.to_k_ip.weight): base, Plus, Full.",
    )
