"""Configuration of the ``lora`` injector: which LoRA files to load, at which strength."""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from refcond import ComponentConfig
from refcond_injectors.lora.layers import MAX_LORA_SCALE, LoraLayersConfig
from refcond_injectors.lora.tuning import TuningConfig, check_file_name

#: What PEFT accepts as an adapter name (it becomes a key of ``torch.nn.ModuleDict``: no dots).
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
#: The top-level keys of diffusers' per-block LoRA scales (``pipe.set_adapters`` on a UNet).
BLOCK_KEYS = ("down", "mid", "up")

#: A UNet LoRA weight: one number, or per block as ``pipe.set_adapters`` takes it, e.g.
#: ``{"down": 0.5, "mid": 1.0, "up": {"block_0": 0.0, "block_1": [0.0, 1.0, 0.5]}}``.
BlockScale = float | dict[str, Any]
#: The most LoRA files one injector loads.
MAX_LORAS = 64


class LoraSource(ComponentConfig):
    """One LoRA file and its strength."""

    path: str = Field(
        description="A LoRA .safetensors file, or a folder or Hugging Face hub id holding one (then name the file "
        "with weight_name, unless the folder has only one). Pickle files (.bin, .pt) need allow_pickle."
    )
    weight_name: str | None = Field(default=None, description="The file inside a folder or hub repository given as path.")
    adapter_name: str | None = Field(
        default=None,
        description="The PEFT adapter name to load it under (letters, digits, '_' and '-'). None derives it from the "
        "file name, made unique among the adapters already in the pipeline.",
    )
    scale: BlockScale = Field(
        default=1.0,
        description="Weight of the LoRA in the UNet: a number, or per block in diffusers' set_adapters format "
        "({'down': ..., 'mid': ..., 'up': {'block_0': [...]}}; unlisted blocks get 1.0). Every number finite, "
        f"from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}.",
    )
    text_encoder_scale: float | None = Field(
        default=None,
        ge=-MAX_LORA_SCALE,
        le=MAX_LORA_SCALE,
        description="Weight of the LoRA in the text encoder(s). None = scale when scale is a number, else 1.0. "
        f"A finite number from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}.",
    )

    @field_validator("path", "weight_name")
    @classmethod
    def _a_file_name(cls, value: str | None) -> str | None:
        return check_file_name(value)

    @field_validator("adapter_name")
    @classmethod
    def _valid_adapter_name(cls, value: str | None) -> str | None:
        if value is not None and not ADAPTER_NAME.fullmatch(value):
            raise ValueError(f"adapter name {value!r} may only hold letters, digits, '_' and '-' (PEFT keys cannot contain dots)")
        return value

    @field_validator("scale")
    @classmethod
    def _block_keys(cls, value: BlockScale) -> BlockScale:
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(BLOCK_KEYS))
            if unknown:
                hint = " Set text-encoder weights with text_encoder_scale." if any(k.startswith("text_encoder") for k in unknown) else ""
                raise ValueError(f"per-block scale keys must be among {list(BLOCK_KEYS)}, got {unknown}.{hint}")
        _check_weights(value, "scale", depth=0)
        return value

    @property
    def text_scale(self) -> float:
        """The text encoders' weight: ``text_encoder_scale``, else ``scale`` if it is a number, else 1.0."""
        if self.text_encoder_scale is not None:
            return self.text_encoder_scale
        return float(self.scale) if not isinstance(self.scale, dict) else 1.0


class LoraInjectorConfig(ComponentConfig):
    """Options of the ``lora`` injector: LoRA files loaded into the pipeline's UNet and text encoders.

    Loading goes through diffusers' ``load_lora_weights`` (PEFT), so every layout it reads works:
    diffusers/PEFT, diffusers' older attention-processor layout, and Kohya/A1111. Each LoRA is
    checked against the backbone before anything is loaded. The LoRAs ignore the call's
    ``reference_scale``: set their weights here.
    """

    loras: list[LoraSource] = Field(
        default=[],  # pydantic copies it per instance
        max_length=MAX_LORAS,
        description=f"The LoRA files, applied together with their weights (diffusers' set_adapters); at most {MAX_LORAS}.",
    )
    fuse: bool = Field(
        default=False,
        description="Fuse the LoRAs into the base weights (faster steps; detach copies the original weights back).",
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow pickle LoRA files (.bin, .pt, .ckpt): they can run code when read, so only for files you trust.",
    )
    tuning: TuningConfig | None = Field(
        default=None,
        description="Tune a LoRA on each call's reference group (DreamBooth-LoRA) and generate with it, beside the "
        "files in loras. None = no tuning: the references are not read.",
    )
    layers: LoraLayersConfig | None = Field(
        default=None,
        description="LoRA layers with weights of the composition's own, on every UNet attention layer (EasyRef's UNet LoRA): "
        "loaded from the composition's checkpoint (injector.<i>.unet.<module>.lora_A.weight / lora_B.weight) or fresh "
        "(lora_B zero: no change until trained). None = only the files in loras.",
    )

    @model_validator(mode="after")
    def _distinct_adapter_names(self) -> LoraInjectorConfig:
        names = [source.adapter_name for source in self.loras if source.adapter_name is not None]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"adapter names must be distinct, but {repeated} is used more than once")
        return self


def _check_weights(value: Any, where: str, depth: int) -> None:
    """Per-block weights are finite numbers within the bounds, in tables and lists at most three levels deep."""
    if isinstance(value, bool):
        raise ValueError(f"{where} is {value}, not a number")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or abs(value) > MAX_LORA_SCALE:
            raise ValueError(f"{where} is {value}; LoRA weights are finite numbers from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}")
        return
    if depth >= 3 or not isinstance(value, (dict, list)):
        raise ValueError(
            f"{where} must be a number, or per block as {{'down': 0.5, 'up': {{'block_0': [0.0, 1.0]}}}} (numbers in tables and lists), "
            f"not {type(value).__name__}"
        )
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        _check_weights(item, f"{where}.{key}", depth + 1)
