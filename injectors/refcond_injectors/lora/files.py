"""Finding and reading LoRA files: a local file, a folder or a hub id, read by diffusers' own loader.

Nothing here converts keys: :func:`read_lora` returns what diffusers' ``lora_state_dict`` makes of
the file (Kohya/A1111 files already converted to diffusers' names, with their alphas), exactly
as ``load_lora_weights`` sees it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from refcond import CheckpointError, ConfigError, IncompatibleBackboneError
from refcond import PICKLE_SUFFIXES, check_state_dict, read_checkpoint, require_regular_file

#: ``owner/name``: how a Hugging Face hub id looks (anything else that does not exist is a missing path).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_-]+")
#: The largest alpha a LoRA file may give: float16's largest finite value, refcond's bound on any weight.
MAX_ALPHA = float(torch.finfo(torch.float16).max)


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
    if _exists(local) and not local.is_dir():
        if weight_name is not None:
            raise ConfigError(f"LoRA {path!r} is a file, so weight_name={weight_name!r} has nothing to pick from: drop weight_name.")
        require_regular_file(local, "LoRA file")  # a FIFO or a device is refused before anything opens it
        read_checkpoint_kind(local, allow_pickle)
        return LoraLocation(str(local), None, str(local), local.stem)
    if local.is_dir():
        if weight_name is not None:
            target = local / weight_name
            if not _exists(target) or target.is_dir():
                raise CheckpointError(f"LoRA folder {str(local)!r} has no file {weight_name!r}; it holds: {_listing(local)}.")
            require_regular_file(target, "LoRA file")
            read_checkpoint_kind(target, allow_pickle)
            return LoraLocation(str(local), weight_name, str(target), Path(weight_name).stem)
        entries = [p for p in local.iterdir() if _is_regular(p)]  # diffusers picks among these: never a pipe or a device
        odd = sorted(p.name for p in local.iterdir() if p.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES) and not _is_regular(p))
        if odd:
            raise CheckpointError(
                f"LoRA folder {str(local)!r} holds {odd[0]!r}, which is not a regular file (a pipe, a device or a folder): "
                "diffusers would open it when it looks for the LoRA. Remove it, or give the LoRA file's own path."
            )
        safe = sorted(p.name for p in entries if p.suffix == ".safetensors")
        pickled = sorted(p.name for p in entries if p.suffix.lower() in PICKLE_SUFFIXES)
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


def _exists(path: Path) -> bool:
    """Whether ``path`` names something (a broken symlink too: refused later with its own message), without opening it."""
    try:
        return path.exists() or path.is_symlink()
    except (OSError, ValueError):
        return True  # a name too long, a NUL byte: require_regular_file says what is wrong


def _is_regular(path: Path) -> bool:
    try:
        return path.is_file()  # stat, following symlinks; opens nothing
    except (OSError, ValueError):
        return False


def _refuse_pickle(label: str) -> None:
    raise CheckpointError(
        f"LoRA file {label!r} is a pickle file, which can run arbitrary code when loaded. Convert it to .safetensors, "
        "or set allow_pickle = true in the lora injector's config if you trust its source."
    )


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "") if names else "nothing"


def default_adapter_name(stem: str) -> str:
    """A PEFT-safe adapter name from a file name: ``pixel-art.v2`` -> ``pixel-art_v2``; ``half`` -> ``half_lora``.

    PEFT keeps adapters as attributes of its layers, so a name that is already an attribute of a
    torch module (``half``, ``float``, ``to``, ``weight``) gets a suffix.
    """
    name = _UNSAFE_NAME.sub("_", stem).strip("_") or "lora"
    return f"{name}_lora" if shadows_module_attribute(name) else name


def shadows_module_attribute(name: str) -> bool:
    """Whether an adapter called ``name`` would collide with an attribute of the layers PEFT wraps."""
    return hasattr(torch.nn.Linear, name) or name in ("weight", "bias", "base_layer")


@dataclass
class LoraFile:
    """A LoRA file as diffusers reads it: diffusers-named tensors, Kohya alphas, adapter metadata."""

    state_dict: dict[str, torch.Tensor]
    network_alphas: dict[str, float] | None
    metadata: dict[str, Any] | None


#: The two halves of a LoRA layer in the names diffusers' ``lora_state_dict`` returns (PEFT, attention processors, Kohya).
_HALVES = (("lora_A", "lora_B"), ("down", "up"), ("lora_down", "lora_up"))


def _partner(key: str) -> str | None:
    """The key of the other half of ``key``'s LoRA pair (``...lora_A.weight`` <-> ``...lora_B.weight``), or None."""
    head, _, leaf = key.rpartition(".")
    base, _, half = head.rpartition(".")
    if leaf != "weight" or not base:
        return None
    for a, b in _HALVES:
        if half in (a, b):
            return f"{base}.{b if half == a else a}.{leaf}"
    return None


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
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError, RecursionError) as exc:  # diffusers' and safetensors' many kinds
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, KeyError) or "renamed" in reason:
            reason = (
                f"its Kohya-style keys could not be converted ({reason}); only LoRA files (lora_down/lora_up/alpha) "
                "are supported, not LoHa/LoKr/LyCORIS variants"
            )
        raise CheckpointError(f"cannot read LoRA {where.label!r}: {reason}") from None
    if not state_dict:
        raise CheckpointError(f"LoRA {where.label!r} holds no tensors.")
    check_lora_values(state_dict, alphas, where.label)
    return LoraFile(dict(state_dict), alphas or None, metadata)


def check_lora_values(state_dict: dict[str, Any], alphas: dict[str, Any] | None, label: str) -> None:
    """Refuse what refcond refuses in every checkpoint (:func:`refcond.check_state_dict` with ``values=True``: NaN, inf,
    huge or empty tensors, odd keys), half of a LoRA pair (``lora_A`` without ``lora_B``, ``down`` without ``up``), LoRA
    weights that are not floating-point, and alphas that are not finite numbers."""
    where = f"LoRA {label!r} (keys as diffusers names them)"
    check_state_dict(None, state_dict, title=where, values=True)
    halves = sorted((key, partner) for key in state_dict if (partner := _partner(key)) is not None and partner not in state_dict)
    if halves:
        key, partner = halves[0]
        more = f" (and {len(halves) - 1} more keys like it)" if len(halves) > 1 else ""
        raise CheckpointError(
            f"{where}: key {key!r} has no {partner!r}{more}: the file holds half of a LoRA pair, and the missing half would "
            "be left as uninitialised memory. The file is incomplete: download or export it again."
        )
    integral = sorted(k for k, v in state_dict.items() if not v.is_floating_point())
    if integral:
        key = integral[0]
        raise CheckpointError(
            f"{where}: key {key!r} holds {str(state_dict[key].dtype).removeprefix('torch.')} values; LoRA weights are floating-point. "
            "The file is corrupt or not a LoRA."
        )
    for key, alpha in (alphas or {}).items():
        value = float(alpha.item()) if isinstance(alpha, torch.Tensor) and alpha.numel() == 1 else alpha
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and abs(value) <= MAX_ALPHA):
            raise CheckpointError(
                f"{where}: the alpha of {key!r} is {value!r}; an alpha is a finite number of magnitude at most {MAX_ALPHA:g} "
                "(usually the rank). The file is corrupt: download or export it again."
            )
