"""Finding the registered format of a checkpoint file and converting it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from refcond.checkpoints.io import read_checkpoint
from refcond.checkpoints.native import check_metadata
from refcond.checkpoints.values import check_tensors
from refcond.contracts import Backbone, ImportedCheckpoint
from refcond.errors import CheckpointError, RefcondError
from refcond.registry import Registry


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint read into memory: its tensors, its metadata, and how messages name it.

    Made only of checked content: creating one checks every tensor
    (:func:`refcond.checkpoints.values.check_tensors`: keys, dtypes, NaN, inf, huge values) and a refcond
    checkpoint's metadata (:func:`refcond.checkpoints.native.check_metadata`), once, for every format;
    nothing a file holds reaches a format plugin or a component unchecked.
    """

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    where: str

    def __post_init__(self) -> None:
        if not isinstance(self.state_dict, dict):
            raise CheckpointError(f"{self.where}: a checkpoint is a dict of tensors, not a {type(self.state_dict).__name__}.")
        check_tensors(self.state_dict, self.where)
        check_metadata(self.metadata, self.where)


def open_checkpoint(checkpoint: str | Path | dict[str, torch.Tensor], *, allow_pickle: bool = False) -> CheckpointFile:
    """Read ``checkpoint`` (a file, or a flat state dict given in memory) once, and check it (see :class:`CheckpointFile`)."""
    if isinstance(checkpoint, dict):
        return CheckpointFile(checkpoint, {}, "the given state dict")
    state_dict, metadata = read_checkpoint(checkpoint, allow_pickle=allow_pickle)
    return CheckpointFile(state_dict, metadata, str(checkpoint))


def import_checkpoint(
    checkpoint: str | Path | dict[str, torch.Tensor] | CheckpointFile,
    registry: Registry,
    backbone: Backbone | None = None,
    *,
    allow_pickle: bool = False,
) -> ImportedCheckpoint:
    """Read ``checkpoint`` (a file, a flat state dict, or one read already) and convert it with the first format that detects it."""
    file = checkpoint if isinstance(checkpoint, CheckpointFile) else open_checkpoint(checkpoint, allow_pickle=allow_pickle)
    state_dict, metadata, where = file.state_dict, file.metadata, file.where
    for entry in registry.entries("checkpoint_format"):
        try:
            detected = entry.obj.detect(state_dict, metadata)
        except Exception as exc:  # a format plugin's bug, reported with its name
            raise CheckpointError(
                f"{where}: checkpoint format {entry.name!r} ({entry.provenance}) failed while detecting the file: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not detected:
            continue
        try:
            imported: ImportedCheckpoint = entry.obj.convert(state_dict, metadata, backbone)
        except RefcondError as exc:
            raise _with_context(exc, f"{where} ({entry.name} format): {exc}") from None
        except Exception as exc:  # as above
            raise CheckpointError(
                f"{where}: checkpoint format {entry.name!r} ({entry.provenance}) failed to convert the file: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        imported.source = imported.source or entry.name
        return imported
    sample = ", ".join(sorted(state_dict)[:5]) or "no keys"
    raise CheckpointError(
        f"{where}: no registered checkpoint format recognises this file (first keys: {sample}). "
        f"Known formats: {', '.join(registry.names('checkpoint_format')) or 'none'}. "
        "Install the plugin that provides its format, or convert it."
    )


def _with_context(exc: RefcondError, message: str) -> RefcondError:
    """The same kind of error with the file and format prepended (or a CheckpointError if it takes other arguments)."""
    try:
        return type(exc)(message)
    except TypeError:
        return CheckpointError(message)
