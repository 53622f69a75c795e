"""Decoupled cross-attention (IP-Adapter family): projectors, the attention processor, the injector
and the importer of official IP-Adapter checkpoints."""

from refcond_injectors.cross_attention.config import CrossAttentionConfig
from refcond_injectors.cross_attention.injector import (
    CrossAttentionAttachment,
    CrossAttentionInjector,
    DecoupledKV,
)
from refcond_injectors.cross_attention.processor import DecoupledCrossAttnProcessor
from refcond_injectors.cross_attention.projectors import (
    LinearProjector,
    MLPProjector,
    ResamplerProjector,
    project_condition,
)

__all__ = [
    "CrossAttentionAttachment",
    "CrossAttentionConfig",
    "CrossAttentionInjector",
    "DecoupledCrossAttnProcessor",
    "DecoupledKV",
    "LinearProjector",
    "MLPProjector",
    "ResamplerProjector",
    "project_condition",
]
