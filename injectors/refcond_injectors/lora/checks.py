"""Checking a LoRA file against a pipeline before anything is loaded.

diffusers' own loader would fail deep inside PEFT (``size mismatch for ...lora_A.default_0.weight``)
or, for keys that match no module, load part of the file and only warn. Here every key is
matched to the module it targets and its shape compared with that module's, and the errors say
which key, which shapes, and which backbone the file looks made for.

Keys are brought into PEFT's form by diffusers' own converters, in the order its loaders apply
them (``load_lora_adapter`` for the UNet, ``_load_lora_into_text_encoder`` for text encoders).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from torch import nn

from refcond import CheckpointError, IncompatibleBackboneError, compat
from refcond_injectors.cross_attention.layers import family

#: The pipeline components a LoRA file may address, by key prefix.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_SHOWN = 8


def loadable_components(pipeline: Any) -> list[str]:
    """The components of ``pipeline`` that diffusers loads LoRA weights into (and that it has)."""
    names = compat.lora_loadable_modules(pipeline)
    if names is None:  # not a diffusers LoRA-loading pipeline
        names = list(COMPONENTS)
    return [name for name in names if getattr(pipeline, name, None) is not None]


def to_peft(component: str, module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One component's keys (prefix removed) in PEFT's form, ``<module>.lora_A.weight``, as diffusers converts them."""
    state = dict(state_dict)
    if not state:
        return state
    if component == "unet":
        if "lora_A" not in next(iter(state)):
            state = convert_unet_state_dict_to_peft(state)
        return state
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if not hasattr(module, "text_model"):  # transformers 5 flattened CLIPTextModel; files still say text_model.
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def check_lora(pipeline: Any, backbone: str, state_dict: Mapping[str, torch.Tensor], label: str) -> dict[str, int]:
    """Raise unless every tensor of a LoRA file (as diffusers' ``lora_state_dict`` returns it) fits ``pipeline``.

    :param backbone: the backbone's name (``sd15``, ``sdxl``), for messages.
    :returns: how many modules the file targets in each component.
    :raises CheckpointError: not a LoRA file, or keys that match no module / have the wrong shape.
    :raises IncompatibleBackboneError: the file looks made for another backbone.
    """
    not_lora = [k for k in state_dict if "lora" not in k]
    if not_lora:
        raise CheckpointError(
            f"{label!r} is not a LoRA file: key {not_lora[0]!r} (and {len(not_lora) - 1} more of its {len(state_dict)} keys) "
            "is no LoRA weight. LoRA files have keys such as unet.<module>.lora_A.weight (diffusers/PEFT) or "
            "lora_unet_<module>.lora_down.weight (Kohya/A1111)."
        )
    components = loadable_components(pipeline)
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    stray: dict[str, list[str]] = {}  # keys of a component this pipeline lacks, or of none
    for key, tensor in state_dict.items():
        prefix = key.split(".", 1)[0]
        if prefix in components:
            by_component.setdefault(prefix, {})[key[len(prefix) + 1 :]] = tensor
        else:
            stray.setdefault(prefix if prefix in COMPONENTS else "", []).append(key)

    targets: dict[str, int] = {}
    converted: dict[str, dict[str, torch.Tensor]] = {}
    shapes: list[str] = []
    missing: list[str] = []
    for component, part in by_component.items():
        model = getattr(pipeline, component)
        try:
            converted[component] = peft_state = to_peft(component, model, part)
        except ValueError as exc:
            example = f"{component}.{next(iter(part))}"
            raise CheckpointError(f"LoRA {label!r}: diffusers cannot read its {component} keys ({exc}), e.g. {example}.") from None
        targets[component] = len({key.split(".lora_", 1)[0] for key in peft_state})
        wrong_shape, no_module = _module_problems(component, model, peft_state)
        shapes += wrong_shape
        missing += no_module

    problems = shapes + missing
    for prefix, keys in stray.items():
        prefixes = ", ".join(f"{c}." for c in components)
        where = f"this pipeline has no {prefix}" if prefix else f"they name no component (expected a prefix among {prefixes})"
        problems.append(f"{len(keys)} key(s) such as {keys[0]}: {where}")
    if problems:
        raise _mismatch_error(pipeline, backbone, label, problems, converted, second_text_encoder="text_encoder_2" in stray)
    return targets


def _module_problems(component: str, model: nn.Module, peft_state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """``(wrong shapes, one entry per module that does not exist or cannot take a LoRA)``."""
    shapes: list[str] = []
    missing: dict[str, str] = {}
    for key, tensor in peft_state.items():
        path, _, kind = key.partition(".lora_")
        if path in missing:
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            missing[path] = f"key {component}.{key}: the {component} has no module {path}"
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # already wrapped by PEFT
        if kind not in ("A.weight", "B.weight"):
            continue  # biases, DoRA magnitudes: PEFT checks them against the lora_A/B it builds
        if next(base.children(), None) is not None:
            missing[path] = f"key {component}.{key}: module {path} is a {type(base).__name__}, a container LoRA cannot target"
            continue
        expected = _expected_shape(base, kind, tensor)
        if expected is not None and tuple(tensor.shape) != expected:
            shapes.append(f"key {component}.{key}: expected shape {expected}, got {tuple(tensor.shape)}")
    return shapes, list(missing.values())


def _expected_shape(module: nn.Module, kind: str, tensor: torch.Tensor) -> tuple[int, ...] | None:
    """The shape PEFT gives ``lora_A``/``lora_B`` on a Linear or Conv2d ``module`` at the file's rank (None: other layers)."""
    rank = (tensor.shape[0] if kind == "A.weight" else tensor.shape[1]) if tensor.ndim >= 2 else 0
    if isinstance(module, nn.Linear):
        return (rank, module.in_features) if kind == "A.weight" else (module.out_features, rank)
    if isinstance(module, nn.Conv2d):
        if kind == "A.weight":
            return (rank, module.in_channels // module.groups, *module.kernel_size)
        return (module.out_channels, rank, 1, 1)
    return None


def _mismatch_error(
    pipeline: Any,
    backbone: str,
    label: str,
    problems: list[str],
    converted: Mapping[str, Mapping[str, torch.Tensor]],
    second_text_encoder: bool,
) -> Exception:
    shown = "\n  - ".join(problems[:_SHOWN]) + (f"\n  - ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else "")
    pipeline_dim = _cross_attention_dim(pipeline.unet)
    file_dim = _file_cross_attention_dim(converted.get("unet", {}))
    has_second = "text_encoder_2" in converted or second_text_encoder
    has_first = "text_encoder" in converted
    made_for = _looks_made_for(file_dim, has_second, has_first)
    if (made_for is not None and made_for != backbone) or (file_dim is not None and file_dim != pipeline_dim):
        clues = [f"cross-attention dim {file_dim}" if file_dim is not None else "", "weights for a second text encoder" if has_second else ""]
        described = ", ".join(c for c in clues if c)
        who = made_for or "another UNet"
        if file_dim is not None and family(file_dim) != "a different UNet":
            who += f" ({family(file_dim)})"
        return IncompatibleBackboneError(
            f"LoRA {label!r} looks made for {who}: {described}; but the pipeline is {backbone} (cross-attention dim "
            f"{pipeline_dim}). Use a LoRA made for {backbone}. Mismatches (diffusers' key names):\n  - {shown}"
        )
    return CheckpointError(f"LoRA {label!r} does not match the pipeline ({backbone}): (diffusers' key names)\n  - {shown}")


def _cross_attention_dim(unet: nn.Module) -> int:
    dim = unet.config.cross_attention_dim
    return int(dim if isinstance(dim, int) else dim[0])


def _file_cross_attention_dim(unet_state: Mapping[str, torch.Tensor]) -> int | None:
    """The text-token size the file's cross-attention key/value LoRAs read: its UNet's cross-attention dim."""
    for key, tensor in unet_state.items():
        if key.endswith(("attn2.to_k.lora_A.weight", "attn2.to_v.lora_A.weight")) and tensor.ndim == 2:
            return int(tensor.shape[1])
    return None


def _looks_made_for(cross_attention_dim: int | None, second_text_encoder: bool, text_encoder: bool) -> str | None:
    if second_text_encoder or cross_attention_dim == 2048:
        return "sdxl"
    if cross_attention_dim in (768, 1024) or text_encoder:
        return "sd15"
    return None
