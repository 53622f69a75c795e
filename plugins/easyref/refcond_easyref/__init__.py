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
    "EASYREF_RECIPES",
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


def _stage(name: str, train: list[str], learning_rate: float, batch_size: int, accumulation: int, data: dict[str, object]) -> dict[str, object]:
    return {
        "name": name,
        "train": train,
        "steps": 250_000,
        "batch_size": batch_size,
        "gradient_accumulation": accumulation,
        "optimizer": {"learning_rate": learning_rate, "weight_decay": 0.0},
        "lr_schedule": "constant_with_warmup",
        "dropout": {"references": 0.05, "text": 0.05, "both": 0.05},
        "data": data,
        "checkpoint_every": 20_000,
    }


_ALIGNMENT = ["aggregator", "injector.cross-attention"]  # reference tokens, copied last layer, norm; projector, image K/V
_FINETUNING = [*_ALIGNMENT, "encoder", "injector.lora"]  # + the whole MLLM + the UNet LoRA (rank 128)

#: EasyRef's progressive training (arXiv 2412.09618, the official scripts' settings; per-GPU batch and accumulation as
#: there, on 32 GPUs). Only stage 3 shuffles the references, as the official data loader; unshuffled groups also let
#: stage 1 reuse the frozen MLLM's cached encodings. Each stage starts from the previous one's output: --from <previous output>/model.safetensors.
EASYREF_RECIPES = {
    "easyref-stage1": {
        "composition": "easyref",
        "data": {"resolution": 1024, "crop": "center", "shuffle_references": False},
        "stages": [_stage("alignment", _ALIGNMENT, 1e-4, 8, 1, {})],
        "export": ["easyref"],
    },
    "easyref-stage2": {
        "composition": "easyref",
        "data": {"resolution": 1024, "crop": "center", "max_references": 1, "shuffle_references": False},
        "stages": [_stage("single-reference", _FINETUNING, 4e-5, 4, 2, {})],
        "export": ["easyref"],
    },
    "easyref-stage3": {
        "composition": "easyref",
        "data": {"resolution": 1024, "max_references": 28, "shuffle_references": True, "truncate_rate": 0.4},
        "stages": [_stage("multi-reference", _FINETUNING, 2e-5, 1, 4, {})],
        "export": ["easyref"],
    },
}


@hookimpl
def refcond_register_recipes(register: Register) -> None:
    descriptions = {
        "easyref-stage1": "EasyRef stage 1, alignment: reference tokens, the copied last layer, projector and image keys/values train; the MLLM is frozen.",
        "easyref-stage2": "EasyRef stage 2, single-reference fine-tuning: + the MLLM and the rank-128 UNet LoRA (start --from stage 1).",
        "easyref-stage3": "EasyRef stage 3, multi-reference fine-tuning with truncation rate 0.4 (start --from stage 2).",
    }
    for name, recipe in EASYREF_RECIPES.items():
        register(name, recipe, description=descriptions[name])


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
