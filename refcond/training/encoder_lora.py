"""Train an encoder through a LoRA (PEFT), then fold it into the encoder's weights.

A stage with ``encoder_lora`` trains low-rank updates of the encoder's linear layers instead of
the encoder itself: far fewer optimizer states than full fine-tuning (EasyRef's stages 2 and 3
fine-tune the whole 2B MLLM). When the stage ends the updates are merged into the weights and the
LoRA layers removed, so the encoder is a plain fine-tuned encoder again: checkpoints store it as
such and nothing downstream needs PEFT.
"""

from __future__ import annotations

import torch

from refcond.errors import ConfigError
from refcond.training.config import EncoderLoraConfig

#: The adapter name the LoRA layers carry while a stage trains them.
ADAPTER = "refcond"


def add_encoder_lora(encoder: torch.nn.Module, config: EncoderLoraConfig, seed: int) -> list[tuple[str, torch.nn.Parameter]]:
    """Add LoRA layers to ``encoder``'s target modules; returns their parameters, trainable, by name.

    The fresh ``lora_A`` weights are drawn from ``seed`` (the global generator is left alone), so
    a resumed run rebuilds the same layers before loading their trained values.
    """
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha or config.rank, lora_dropout=config.dropout, target_modules=list(config.targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(lora, encoder, adapter_name=ADAPTER)
        except ValueError:  # PEFT: no module matches the targets
            linear = sorted({name.rpartition(".")[2] for name, module in encoder.named_modules() if isinstance(module, torch.nn.Linear)})
            raise ConfigError(
                f"encoder_lora: no module of the encoder ({type(encoder).__name__}) matches targets {list(config.targets)}. "
                f"Its linear layers are named: {', '.join(linear[:30]) or 'none (it holds its model outside its module tree)'}."
            ) from None
    named = [(name, parameter) for name, parameter in encoder.named_parameters() if f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name]
    for _, parameter in named:
        parameter.requires_grad_(True)
    return named


def merge_encoder_lora(encoder: torch.nn.Module) -> int:
    """Fold every LoRA layer of ``encoder`` into its base layer and put the base layer back; returns how many."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, module) for name, module in encoder.named_modules() if isinstance(module, LoraLayer)]
    with torch.no_grad():
        for name, module in layers:
            module.merge(adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            parent = encoder.get_submodule(parent_name) if parent_name else encoder
            setattr(parent, child, module.get_base_layer())
    return len(layers)
