"""Where models come from and where they run: hub ids, folders and devices, checked with clear errors.

Components that load pretrained weights (the backbones, the ``clip`` and ``mllm`` encoders, a
plugin's own) call :func:`load_pretrained` instead of ``from_pretrained``: a folder that does not
exist, a string that is no hub id, a folder holding another kind of model or an unknown hub id
offline become one :class:`refcond.ConfigError` naming the config field, before anything half
loads. :func:`check_device` refuses a device this machine lacks; :data:`DeviceName` validates a
device name in a pydantic config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator

from refcond.errors import ConfigError


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def check_model_source(model: str, who: str) -> None:
    """Refuse, before anything loads, a ``model`` that is neither a folder that exists nor a valid hub id.

    ``who`` names the component in the message (``"encoder 'clip'"``). A valid hub id that does not
    exist is left to the loader (which needs the network, or the local cache).
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        path = Path(model).expanduser()
        if path.is_dir():
            return
        exists = path.exists()
    except (OSError, RuntimeError) as exc:  # a name too long for the file system, a home folder that cannot be found
        raise ConfigError(f"{who}: config model {_shown(model)} cannot be a folder here ({getattr(exc, 'strerror', None) or exc}); give a folder or a hub id.") from None
    if exists:
        raise ConfigError(f"{who}: config model {_shown(model)} is a file: give the folder that holds the model (with its config files), or a hub id.")
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ConfigError(
            f"{who}: config model {_shown(model)} is not a folder that exists, and not a valid Hugging Face hub id ('organisation/name'). "
            "Check the path (relative paths start from the current folder), or give a hub id."
        ) from None


def load_pretrained(cls: Any, model: str, who: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(model, **kwargs)``, with a missing folder or model reported as a :class:`refcond.ConfigError`."""
    check_model_source(model, who)
    try:
        return cls.from_pretrained(model, **kwargs)
    except Exception as exc:  # noqa: BLE001 - missing files, an unknown hub id offline, a folder of another kind of model
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = f"{reason[:300]} ({type(exc).__name__})."
        raise ConfigError(
            f"{who}: cannot load {cls.__name__} from config model {_shown(model)}: {reason} Give a local folder holding the model, "
            "or a hub id (downloaded once, unless HF_HUB_OFFLINE=1)."
        ) from None


def device_name(value: str) -> str:
    """``value`` if torch reads it as a device (``cpu``, ``cuda:1``, ``mps``); a ``ValueError`` otherwise (for pydantic)."""
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{value!r} is not a device; use cpu, cuda, cuda:1, mps, ...") from None
    return value


#: A config field holding a device name torch can read (whether this machine has it is :func:`check_device`'s).
DeviceName = Annotated[str, AfterValidator(device_name)]


def device_available(device: torch.device) -> bool:
    """Whether this machine has ``device`` (``meta`` holds no weights, so it does not count)."""
    if device.type == "cpu":
        return True
    if device.type == "mps":
        return torch.backends.mps.is_available()
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...
    if backend is None or not callable(getattr(backend, "is_available", None)) or not backend.is_available():
        return False
    return device.index is None or device.index < backend.device_count()


def check_device(device: str, who: str) -> None:
    """Refuse, before anything loads, a device torch cannot read or this machine lacks; ``who`` names the field
    (``"backbone 'sd15': config device"``)."""
    try:
        parsed = torch.device(device_name(device))
    except ValueError as exc:
        raise ConfigError(f"{who}: {exc}") from None
    if not device_available(parsed):
        raise ConfigError(f"{who} {device!r} is not available on this machine; use 'cpu', leave it unset, or a device this machine has.")
