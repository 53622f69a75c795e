"""Finding the registered format of a checkpoint file and converting it."""

from __future__ import annotations

from pathlib import Path

import torch

from refcond.checkpoints.io import read_checkpoint
from refcond.contracts import Backbone, ImportedCheckpoint
from refcond.errors import CheckpointError, RefcondError
from refcond.registry import Registry


def import_checkpoint(
    checkpoint: str | Path | dict[str, torch.Tensor],
    registry: Registry,
    backbone: Backbone | None = None,
    *,
    allow_pickle: bool = False,
) -> ImportedCheckpoint:
    """Read ``checkpoint`` (a file or a flat state dict) and convert it with the first format that detects it."""
    if isinstance(checkpoint, dict):
        state_dict, metadata, where = checkpoint, {}, "the given state dict"
    else:
        state_dict, metadata = read_checkpoint(checkpoint, allow_pickle=allow_pickle)
        where = str(checkpoint)
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
