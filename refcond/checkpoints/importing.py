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
        if entry.obj.detect(state_dict, metadata):
            try:
                imported: ImportedCheckpoint = entry.obj.convert(state_dict, metadata, backbone)
            except RefcondError as exc:
                raise type(exc)(f"{where} ({entry.name} format): {exc}") from None
            imported.source = imported.source or entry.name
            return imported
    sample = ", ".join(sorted(state_dict)[:5]) or "no keys"
    raise CheckpointError(
        f"{where}: no registered checkpoint format recognises this file (first keys: {sample}). "
        f"Known formats: {', '.join(registry.names('checkpoint_format')) or 'none'}. "
        "Install the plugin that provides its format, or convert it."
    )
