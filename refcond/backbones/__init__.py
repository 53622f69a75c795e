"""Backbones ``sd15`` and ``sdxl``: diffusers Stable Diffusion pipelines, from the hub, a folder or an existing pipeline."""

from __future__ import annotations

from refcond.backbones.diffusers_backbone import (
    BackboneConfig,
    DiffusersBackbone,
    SD15Backbone,
    SDXLBackbone,
)
from refcond.hookspecs import hookimpl
from refcond.registry import Register

__all__ = ["BackboneConfig", "DiffusersBackbone", "SD15Backbone", "SDXLBackbone"]


@hookimpl
def refcond_register_backbones(register: Register) -> None:
    register("sd15", SD15Backbone, config=BackboneConfig)
    register("sdxl", SDXLBackbone, config=BackboneConfig)
