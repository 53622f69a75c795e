"""Finding and reading LoRA files: a local file, a folder or a hub id, read by diffusers' own loader.

Nothing here converts keys: :func:`read_lora` returns what diffusers' ``lora_state_dict`` makes of
the file (Kohya/A1111 files already converted to diffusers' names, with their alphas), exactly
as ``load_lora_weights`` sees it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refcond import CheckpointError, ConfigError, IncompatibleBackboneError
from refcond import PICKLE_SUFFIXES, read_checkpoint

#: ``owner/name``: how a Hugging Face hub id looks (anything else that does not exist is a missing path).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class LoraLocation:
    """Where one LoRA file is, in the form diffusers' ``load_lora_weights`` takes it.

    :ivar location: a file path, a folder or a hub id (``pretrained_model_name_or_path_or_dict``).
    :ivar weight_name: the file inside ``location`` when it is a folder or hub id.
    :ivar label: how messages name it.
    :ivar stem: the file's name without suffix, the base of its default adapter name.
    """

    location: str
    weight_name: str | None
    label: str
    stem: str

    def loader_kwargs(self, allow_pickle: bool) -> dict[str, Any]:
        """Keyword arguments for ``lora_state_dict`` / ``load_lora_weights``.

        Without ``allow_pickle``, ``use_safetensors=True`` stops diffusers from falling back to a
        pickle file when it has to guess the file inside a folder or repository.
        """
        kwargs: dict[str, Any] = {}
        if self.weight_name is not None:
            kwargs["weight_name"] = self.weight_name
        if not allow_pickle:
            kwargs["use_safetensors"] = True
        return kwargs


def locate(path: str, weight_name: str | None = None, *, allow_pickle: bool = False) -> LoraLocation:
    """Resolve a LoRA source without reading it: missing files and refused pickles fail here.

    ``path`` is a ``.safetensors`` file, a folder (with ``weight_name``, or holding one LoRA file),
    or a hub id (``owner/name``, with ``weight_name`` when offline).
    """
    local = Path(path).expanduser()
    if weight_name is not None and Path(weight_name).suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        _refuse_pickle(f"{path}/{weight_name}")
    if local.is_file():
        if weight_name is not None:
            raise ConfigError(f"LoRA {path!r} is a file, so weight_name={weight_name!r} has nothing to pick from: drop weight_name.")
        read_checkpoint_kind(local, allow_pickle)
        return LoraLocation(str(local), None, str(local), local.stem)
    if local.is_dir():
        if weight_name is not None:
            target = local / weight_name
            if not target.is_file():
                raise CheckpointError(f"LoRA folder {str(local)!r} has no file {weight_name!r}; it holds: {_listing(local)}.")
            read_checkpoint_kind(target, allow_pickle)
            return LoraLocation(str(local), weight_name, str(target), Path(weight_name).stem)
        safe = sorted(p.name for p in local.iterdir() if p.suffix == ".safetensors")
        pickled = sorted(p.name for p in local.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if not safe and not (pickled and allow_pickle):
            if pickled:
                _refuse_pickle(str(local / pickled[0]))
            raise CheckpointError(f"LoRA folder {str(local)!r} holds no .safetensors file; it holds: {_listing(local)}.")
        return LoraLocation(str(local), None, str(local), local.name)
    if _HUB_ID.fullmatch(path) and not Path(path).suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        label = f"{path}/{weight_name}" if weight_name else path
        return LoraLocation(path, weight_name, label, Path(weight_name).stem if weight_name else path.rsplit("/", 1)[-1])
    raise CheckpointError(
        f"LoRA file {path!r} not found. Give a .safetensors file, a folder holding one, or a Hugging Face hub id (owner/name) with weight_name."
    )


def read_checkpoint_kind(path: Path, allow_pickle: bool) -> None:
    """Refuse what refcond's :func:`read_checkpoint` refuses (pickles without opt-in, unknown suffixes), reading nothing.

    The pickle message names the lora injector's own opt-in (its ``allow_pickle`` field).
    """
    suffix = path.suffix.lower()
    if suffix == ".safetensors" or (suffix in PICKLE_SUFFIXES and allow_pickle):
        return
    if suffix in PICKLE_SUFFIXES:
        _refuse_pickle(str(path))
    read_checkpoint(path, allow_pickle=False)  # raises refcond's CheckpointError for an unknown file type


def _refuse_pickle(label: str) -> None:
    raise CheckpointError(
        f"LoRA file {label!r} is a pickle file, which can run arbitrary code when loaded. Convert it to .safetensors, "
        "or set allow_pickle = true in the lora injector's config if you trust its source."
    )


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "") if names else "nothing"


def default_adapter_name(stem: str) -> str:
    """A PEFT-safe adapter name from a file name: ``pixel-art.v2`` -> ``pixel-art_v2``."""
    return _UNSAFE_NAME.sub("_", stem).strip("_") or "lora"


@dataclass
class LoraFile:
    """A LoRA file as diffusers reads it: diffusers-named tensors, Kohya alphas, adapter metadata."""

    state_dict: dict[str, torch.Tensor]
    network_alphas: dict[str, float] | None
    metadata: dict[str, Any] | None


def require_lora_support(pipeline: Any) -> None:
    """Raise unless ``pipeline`` loads LoRA through diffusers' PEFT backend."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from diffusers.utils import USE_PEFT_BACKEND

    if not isinstance(pipeline, LoraBaseMixin):
        raise IncompatibleBackboneError(f"the lora injector needs a diffusers pipeline that loads LoRA files; a {type(pipeline).__name__} does not.")
    if not USE_PEFT_BACKEND:
        raise ConfigError("the lora injector needs diffusers' PEFT backend: pip install 'peft>=0.17'.")


def read_lora(pipeline: Any, where: LoraLocation, *, allow_pickle: bool) -> LoraFile:
    """Read a LoRA file exactly as ``pipeline.load_lora_weights`` does (its ``lora_state_dict``)."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    kwargs = where.loader_kwargs(allow_pickle)
    if isinstance(pipeline, StableDiffusionXLLoraLoaderMixin):
        kwargs["unet_config"] = pipeline.unet.config  # as its load_lora_weights does: maps Kohya's SGM block names
    try:
        state_dict, alphas, metadata = pipeline.lora_state_dict(where.location, return_lora_metadata=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:  # diffusers' and safetensors' many kinds
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, KeyError) or "renamed" in reason:
            reason = (
                f"its Kohya-style keys could not be converted ({reason}); only LoRA files (lora_down/lora_up/alpha) "
                "are supported, not LoHa/LoKr/LyCORIS variants"
            )
        raise CheckpointError(f"cannot read LoRA {where.label!r}: {reason}") from None
    if not state_dict:
        raise CheckpointError(f"LoRA {where.label!r} holds no tensors.")
    return LoraFile(dict(state_dict), alphas or None, metadata)
