"""A backbone is a diffusers pipeline plus what refcond needs to know about its UNet."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from pydantic import Field

from refcond.config import ComponentConfig
from refcond.sources import DeviceName, check_device, load_pretrained
from refcond.contracts import BuildContext
from refcond.errors import ConfigError, IncompatibleBackboneError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BackboneConfig(ComponentConfig):
    """How to obtain the diffusers pipeline when refcond builds it (``refcond.load``, the CLI)."""

    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Hugging Face hub id or local folder of the diffusers pipeline; a folder must exist when the pipeline loads.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(default=None, description="Weights dtype; default float32.")
    variant: str | None = Field(default=None, max_length=64, description="Weights variant on the hub, e.g. 'fp16'.")
    device: DeviceName | None = Field(default=None, description="Device to move the pipeline to, e.g. 'cuda', 'cuda:1', 'mps', 'cpu'.")


class DiffusersBackbone:
    """Wraps a diffusers text-to-image pipeline whose denoiser is a ``UNet2DConditionModel``."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]

    def __init__(self, config: BackboneConfig, context: BuildContext):
        pipeline = context.extras.get("pipeline")
        if pipeline is None:
            if config.model is None:
                raise ConfigError(
                    f"backbone {self.name!r} needs a pipeline and has no model to load one from: pass the pipeline "
                    "(refcond.from_pipe(pipe, ...); for a checkpoint saved from a pipeline built in memory, refcond.load(path, pipe)), "
                    "or set backbone.config.model to a hub id or local folder."
                )
            if config.device:
                check_device(config.device, f"backbone {self.name!r}: config device")
            pipeline = load_pretrained(
                self.pipeline_class,
                config.model,
                f"backbone {self.name!r}",
                dtype=DTYPES[config.dtype] if config.dtype else None,
                variant=config.variant,
            )
            if config.device:
                pipeline.to(config.device)
        elif not self.accepts(pipeline):
            raise IncompatibleBackboneError(
                f"backbone {self.name!r} cannot drive a {type(pipeline).__name__} "
                f"(UNet cross-attention dim {getattr(getattr(pipeline, 'unet', None), 'config', {}).get('cross_attention_dim')}). "
                "Drop the backbone override to let refcond infer it from the pipeline."
            )
        self.pipeline = pipeline
        self.config = config

    @classmethod
    def accepts(cls, pipeline: Any) -> bool:
        """Whether ``pipeline`` is of this backbone's kind."""
        unet = getattr(pipeline, "unet", None)
        return isinstance(unet, UNet2DConditionModel) and cls._is_xl(unet) == (cls.name == "sdxl")

    @staticmethod
    def _is_xl(unet: UNet2DConditionModel) -> bool:
        return unet.config.addition_embed_type == "text_time"

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipeline.unet

    @property
    def cross_attention_dim(self) -> int:
        dim = self.unet.config.cross_attention_dim
        return int(dim if isinstance(dim, int) else dim[0])

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def model_id(self) -> str | None:
        """Where the pipeline was loaded from (hub id or folder), if diffusers recorded it; ``None`` when built in memory."""
        return self.config.model or getattr(self.pipeline, "name_or_path", None) or None

    def describe(self) -> str:
        return f"{self.name} ({type(self.pipeline).__name__}, cross-attention dim {self.cross_attention_dim})"


class SD15Backbone(DiffusersBackbone):
    """Stable Diffusion 1.x / 2.x pipelines (one text encoder, no added conditions)."""

    name = "sd15"
    pipeline_class = StableDiffusionPipeline


class SDXLBackbone(DiffusersBackbone):
    """Stable Diffusion XL pipelines (two text encoders, text-and-time added conditions)."""

    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
