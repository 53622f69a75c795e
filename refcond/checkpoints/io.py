"""Reading and writing weight files.

``.safetensors`` is read directly. Pickle-based files (``.bin``, ``.pt``, ``.ckpt``) can run code
when loaded, so they are refused unless the caller passes ``allow_pickle=True``; even then they are
read with ``torch.load(weights_only=True)``. Only regular files are opened: a FIFO, a device or a
folder (directly or through a symlink) is refused from its ``stat``, before anything could block on it.
Every write goes to a temporary file that is renamed into place, so an interrupted write never leaves
a truncated file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from refcond.errors import CheckpointError
from refcond.files import atomic_write

#: Suffixes of pickle-based weight files, refused unless the caller passes ``allow_pickle=True``.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weight file; returns ``(state_dict, metadata)``.

    Nested pickle dicts (``{"image_proj": {...}, "ip_adapter": {...}}``, as the original
    IP-Adapter ``.bin`` files are) are flattened with ``.``-joined keys.
    """
    path = checkpoint_path(path)
    require_regular_file(path)
    if path.suffix.lower() == ".safetensors":
        metadata = read_metadata(path)
        try:
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a valid safetensors file: {exc}") from None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is a pickle file, which can run arbitrary code when loaded. "
                "Convert it to .safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust its source."
            )
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for bad pickles
            raise CheckpointError(f"checkpoint {str(path)!r} could not be read as a torch file: {exc}") from None
        if not isinstance(loaded, Mapping):
            raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(loaded).__name__}, not a dict of tensors.")
        return _flatten(loaded), {}
    raise CheckpointError(
        f"checkpoint {str(path)!r}: unknown file type {path.suffix!r}; expected .safetensors "
        f"(or, with allow_pickle=True, one of {', '.join(PICKLE_SUFFIXES)})."
    )


class Metadata(dict):  # type: ignore[type-arg]
    """A file's metadata (``str`` to ``str``), which remembers the file it came from for error messages."""

    def __init__(self, items: Mapping[str, str], where: str):
        super().__init__(items)
        self.where = where


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file, read from its header without loading any tensor.

    The result is a dict whose ``where`` attribute names the file (messages about its values use it).
    """
    path = checkpoint_path(path)
    require_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return Metadata(handle.metadata() or {}, repr(str(path)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a valid safetensors file: {exc}") from None


def checkpoint_path(path: Any) -> Path:
    """``path`` as a :class:`~pathlib.Path`, or a :class:`CheckpointError` when it is not a path."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(
            f"a checkpoint is a file path (str or pathlib.Path) or a dict of tensors, not a {type(path).__name__} ({_short(path)})."
        )
    try:
        return Path(path)
    except TypeError:  # a PathLike whose __fspath__ returns bytes
        raise CheckpointError(f"checkpoint path {_short(path)} is not a text path; pass it as a str or pathlib.Path.") from None


def require_regular_file(path: str | Path, what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a regular file (symlinks followed), judged by ``stat`` without opening it.

    ``what`` names the file in messages (``"checkpoint"``, ``"LoRA file"``). A FIFO, a device or a
    socket would block or never end when read, so it is refused before anything opens it.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        broken = " (a symlink whose target does not exist)" if path.is_symlink() else ""
        raise CheckpointError(f"{what} {str(path)!r} not found{broken}.") from None
    except (OSError, ValueError) as exc:  # a loop of symlinks, a name too long, a NUL byte, no permission
        reason = getattr(exc, "strerror", None) or str(exc)
        raise CheckpointError(f"{what} {str(path)!r} cannot be read: {reason}. Check the path.") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{what} {str(path)!r} not found (it is a folder). Give the weight file inside it.")
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"{what} {str(path)!r} is a {_file_kind(mode)}, not a regular file; refcond reads weights only from regular "
            "files (it would block or read forever on this one). Copy the weights to a file and give its path."
        )


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _flatten(tree: Mapping[str, object], prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
        else:
            raise CheckpointError(f"checkpoint key {name!r} holds a {type(value).__name__}, not a tensor.")
    return flat


def write_safetensors(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors to ``path`` atomically (see :func:`refcond.files.atomic_write`)."""
    path = Path(path)
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"cannot write {str(path)!r}: key {key!r} holds a {type(value).__name__}, not a tensor.")
    bad_meta = {k: type(v).__name__ for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad_meta:
        raise CheckpointError(f"cannot write {str(path)!r}: safetensors metadata must map str to str; not strings: {bad_meta}.")
    tensors = _unshared({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {})))


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors that share memory with an earlier one (tied weights), which safetensors refuses."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in tensors.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.device.index or 0)
        if tensor.numel() and ident in seen:
            tensor = tensor.clone()
        seen.add(ident)
        out[key] = tensor
    return out
