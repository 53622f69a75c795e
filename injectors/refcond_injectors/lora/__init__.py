"""LoRA for refcond: the ``lora`` injector loads LoRA files (diffusers/PEFT, diffusers' older
attn-procs layout, Kohya/A1111) into the backbone pipeline through diffusers and PEFT, and
detaches restoring the UNet and text encoders exactly.

Modules: ``config`` (the injector's options), ``files`` (finding and reading a LoRA file with
diffusers' reader), ``checks`` (a file against the backbone, before loading), ``state`` (PEFT's
changes and how to undo them), ``injector`` (the injector and its attachments), ``tuning`` and
``saving`` (a LoRA tuned on one reference group, saved as a diffusers LoRA file).
"""

from refcond_injectors.lora.config import LoraInjectorConfig, LoraSource
from refcond_injectors.lora.injector import LoraAttachment, LoraInjector, TunedLoraAttachment
from refcond_injectors.lora.tuning import TuningConfig, TuningResult, tune_lora

__all__ = [
    "LoraAttachment",
    "LoraInjector",
    "LoraInjectorConfig",
    "LoraSource",
    "TunedLoraAttachment",
    "TuningConfig",
    "TuningResult",
    "tune_lora",
]
