"""refcond-easyref: EasyRef (arXiv 2412.09618) for refcond.

It registers, through the ``refcond`` entry point in ``pyproject.toml``:

- the aggregator ``reference-tokens``: learnable reference tokens appended to the ``mllm``
  encoder's output and run through a copy of the MLLM's last decoder layer;
- the composition ``easyref``: ``mllm`` + ``reference-tokens`` + ``cross-attention`` (``mlp``
  projector) + ``lora`` (rank-128 LoRA layers on every UNet attention layer);
- the checkpoint format ``easyref``: official ``TempleX98/EasyRef`` files (:mod:`refcond_easyref.official`,
  which also writes them back: :func:`save_official`).
"""

from __future__ import annotations

from refcond import Register, hookimpl
from refcond_easyref.official import EasyRefFormat, save_official, to_official
from refcond_easyref.reference_tokens import (
    ReferenceTokensAggregator,
    ReferenceTokensConfig,
)

__all__ = [
    "EASYREF_COMPOSITION",
    "EasyRefFormat",
    "ReferenceTokensAggregator",
    "ReferenceTokensConfig",
    "save_official",
    "to_official",
]

#: EasyRef as released: Qwen2-VL-2B reads the references and the instruction; 64 reference tokens;
#: an MLP projector and decoupled cross-attention; rank-128 LoRA on every UNet attention layer.
EASYREF_COMPOSITION = {
    "encoder": {"name": "mllm"},
    "aggregator": {"name": "reference-tokens", "config": {"num_tokens": 64}},
    "injectors": [
        {"name": "cross-attention", "config": {"projector": "mlp"}},
        {"name": "lora", "config": {"layers": {"rank": 128}}},
    ],
}


@hookimpl
def refcond_register_aggregators(register: Register) -> None:
    register(
        "reference-tokens",
        ReferenceTokensAggregator.from_config,
        config=ReferenceTokensConfig,
        description=ReferenceTokensAggregator.__doc__.splitlines()[0],
    )


@hookimpl
def refcond_register_compositions(register: Register) -> None:
    register(
        "easyref",
        EASYREF_COMPOSITION,
        description="EasyRef: Qwen2-VL reads all references at once, 64 reference tokens, MLP projector, decoupled cross-attention and UNet LoRA.",
    )


@hookimpl
def refcond_register_checkpoint_formats(register: Register) -> None:
    register(
        "easyref",
        EasyRefFormat(),
        description="Official EasyRef files (image_proj_model.*, mllm_final_layer.*, unet.*.processor.*, optional multimodal_llm.*).",
    )
