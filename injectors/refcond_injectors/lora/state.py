"""What PEFT changes in a pipeline when LoRA adapters come and go, and how to put it back exactly.

Loading a LoRA wraps target layers in PEFT ``LoraLayer`` modules, adds ``peft_config`` and a few
attributes to the model, and makes the new adapter the only active one in the layers it targets
(a user's own adapters there go inactive). :class:`PeftSnapshot` records, before refcond loads
anything, each component's PEFT layers with their active adapters, scalings and flags, the
``requires_grad`` of every parameter and the attributes loading touches, so that

- :meth:`PeftSnapshot.reactivate` can put a user's adapters back to work next to refcond's, with
  their exact per-layer scalings (``set_adapters`` would recompute them from a weight);
- :meth:`PeftSnapshot.remove_added` can take away exactly what refcond added: layers PEFT wrapped
  for refcond's adapters only, and, in a component that had no adapters, everything PEFT added.

:class:`FusedWeights` keeps the original weights of the layers a fused adapter changed: copying
them back is exact, where unfusing by subtraction is not in floating point.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import recurse_remove_peft_layers
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from refcond import compat
from refcond_injectors.lora.checks import loadable_components

#: Attributes diffusers, transformers and PEFT set on a model while loading or fusing LoRA (the
#: private ones are listed in refcond.compat).
MODEL_ATTRIBUTES = ("peft_config", "lora_scale", *compat.PEFT_MODEL_ATTRIBUTES)
#: Attributes diffusers sets on the pipeline while fusing.
PIPELINE_ATTRIBUTES = compat.LORA_PIPELINE_ATTRIBUTES


@dataclass
class LayerState:
    """One PEFT layer's adapter state."""

    active: list[str]
    scaling: dict[str, float]
    disabled: bool
    merged: list[str]


@dataclass
class ComponentState:
    """One pipeline component (``unet``, ``text_encoder``, ...) as PEFT left it."""

    adapters: list[str]
    layers: dict[str, LayerState]
    requires_grad: dict[str, bool]
    attributes: dict[str, Any]


def adapters_of(model: nn.Module) -> list[str]:
    """The adapter names loaded in ``model`` (its ``peft_config``)."""
    return list(getattr(model, "peft_config", None) or {})


def peft_layers(model: nn.Module) -> Iterator[tuple[str, BaseTunerLayer]]:
    """``(path, layer)`` for every PEFT layer of ``model``."""
    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield path, module


@dataclass
class PeftSnapshot:
    """The PEFT state of a pipeline's LoRA-loadable components at one moment."""

    components: dict[str, ComponentState]
    pipeline_attributes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def take(cls, pipeline: Any) -> PeftSnapshot:
        components = {}
        for name in loadable_components(pipeline):
            model = getattr(pipeline, name)
            layers = {
                path: LayerState(list(layer.active_adapters), dict(layer.scaling), bool(layer.disable_adapters), list(layer.merged_adapters))
                for path, layer in peft_layers(model)
            }
            components[name] = ComponentState(
                adapters_of(model),
                layers,
                {path: p.requires_grad for path, p in model.named_parameters()},
                compat.instance_attributes(model, MODEL_ATTRIBUTES),
            )
        return cls(components, compat.instance_attributes(pipeline, PIPELINE_ATTRIBUTES))

    @property
    def adapters(self) -> set[str]:
        """Every adapter name loaded in some component."""
        return {name for state in self.components.values() for name in state.adapters}

    def reactivate(self, pipeline: Any, added: list[str]) -> None:
        """Give every layer that existed at snapshot time its adapter state back, plus the ``added`` adapters it holds.

        ``set_adapters(added)`` activates ``added`` and nothing else; this turns the adapters that
        were active before back on, with the scalings and flags they had, and restores
        ``requires_grad`` of the parameters that existed then.
        """
        for name, state in self.components.items():
            model = getattr(pipeline, name)
            for path, saved in state.layers.items():
                try:
                    layer = model.get_submodule(path)
                except AttributeError:  # the user removed it meanwhile: nothing to give back
                    continue
                if not isinstance(layer, BaseTunerLayer):
                    continue
                layer.set_adapter(saved.active + [a for a in added if a in layer.lora_A and a not in saved.active])
                layer.scaling.update({a: s for a, s in saved.scaling.items() if a in layer.scaling})
                if saved.disabled != bool(layer.disable_adapters):
                    layer.enable_adapters(not saved.disabled)
            _restore_requires_grad(model, state.requires_grad)

    def remove_added(self, pipeline: Any) -> None:
        """Take away PEFT layers added since the snapshot that hold no adapter any more.

        A component back to the adapters it had (none: diffusers' unload; some: only the empty
        new layers unwrapped) also gets its attributes back. Call after deleting the adapters.
        """
        for name, state in self.components.items():
            model = getattr(pipeline, name)
            if not state.adapters and not adapters_of(model):
                recurse_remove_peft_layers(model)  # what unload_lora_weights does to each component
            else:
                for path, layer in list(peft_layers(model)):
                    if path not in state.layers and not layer.lora_A:
                        parent, _, child = path.rpartition(".")
                        setattr(model.get_submodule(parent), child, layer.get_base_layer())
            if sorted(adapters_of(model)) == sorted(state.adapters):
                compat.restore_instance_attributes(model, state.attributes)
            _restore_requires_grad(model, state.requires_grad)

    def restore_pipeline_attributes(self, pipeline: Any) -> None:
        compat.restore_instance_attributes(pipeline, self.pipeline_attributes)


def _restore_requires_grad(model: nn.Module, saved: dict[str, bool]) -> None:
    for path, parameter in model.named_parameters():
        flag = saved.get(path)
        if flag is not None and parameter.requires_grad != flag:
            parameter.requires_grad_(flag)


class FusedWeights:
    """The original weights of the layers refcond fused adapters into, to copy back exactly."""

    def __init__(self) -> None:
        self._saved: dict[tuple[str, str], tuple[nn.Module, torch.Tensor, torch.Tensor | None]] = {}

    def __bool__(self) -> bool:
        return bool(self._saved)

    def save(self, pipeline: Any, adapters: list[str]) -> None:
        """Keep a copy of every base weight (and bias) an adapter in ``adapters`` will change when fused."""
        for name in loadable_components(pipeline):
            for path, layer in peft_layers(getattr(pipeline, name)):
                if (name, path) in self._saved or not any(a in layer.lora_A for a in adapters):
                    continue
                base = layer.get_base_layer()
                bias = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
                self._saved[(name, path)] = (layer, base.weight.detach().clone(), bias)

    def restore(self, adapters: list[str]) -> None:
        """Copy the saved weights back and mark ``adapters`` unmerged; forget the copies."""
        with torch.no_grad():
            for layer, weight, bias in self._saved.values():
                base = layer.get_base_layer()
                base.weight.data.copy_(weight)
                if bias is not None:
                    base.bias.data.copy_(bias)
                layer.merged_adapters[:] = [a for a in layer.merged_adapters if a not in adapters]
        self._saved.clear()


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence the expected chatter of loading adapters: transformers' "LOAD REPORT" of base weights an
    adapter file does not hold, its progress bars, diffusers' "no LoRA keys for text_encoder", and
    PEFT's warnings about a second adapter. Logs stay as they were when verbosity is raised (``-v``).
    """
    import logging

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    levels = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    bars = transformers_logging.is_progress_bar_enabled()
    if levels[0] >= logging.WARNING:
        diffusers_logging.set_verbosity_error()
    if levels[1] >= logging.WARNING:
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Already found a `peft_config` attribute")
            warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if bars:
            transformers_logging.enable_progress_bar()
