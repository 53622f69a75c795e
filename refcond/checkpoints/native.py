"""refcond's own checkpoint format: one ``.safetensors`` file that rebuilds its composition.

Keys are namespaced by role (``encoder.``, ``aggregator.``, ``injector.<i>.``). The metadata holds,
as JSON:

- ``refcond.composition``: the composition with every component's resolved configuration
  (defaults included) and the backbone's model id, so :func:`refcond.load` needs nothing else;
- ``refcond.provenance``: what made the file: the refcond and library versions, which plugin and
  distribution registered each component, the backbone's model (or that it was built in memory),
  and the pretrained weights the components borrowed, by source and content hash, which the file
  does not store (:class:`refcond.BorrowedWeights`).

Format version 2 may leave borrowed weights out; version 1 files (which always stored them) still load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from refcond.checkpoints.io import read_metadata
from refcond.contracts import Backbone, ImportedCheckpoint
from refcond.errors import CheckpointError
from refcond.hookspecs import hookimpl
from refcond.registry import Register

COMPOSITION_KEY = "refcond.composition"
PROVENANCE_KEY = "refcond.provenance"
VERSION_KEY = "refcond.format_version"
FORMAT_VERSION = "2"
#: Format versions this refcond reads.
READABLE_VERSIONS = ("1", "2")


def metadata_for(composition: dict[str, Any], provenance: dict[str, Any] | None = None) -> dict[str, str]:
    """The safetensors metadata that marks a file as a refcond checkpoint of ``composition``."""
    metadata = {COMPOSITION_KEY: json.dumps(composition, sort_keys=True), VERSION_KEY: FORMAT_VERSION}
    if provenance is not None:
        metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    return metadata


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """What a refcond checkpoint says about itself, read from its header without loading a tensor.

    Returns ``{"format_version", "composition", "provenance"}`` (``provenance`` is ``None`` for
    files older than format version 2). Raises :class:`refcond.CheckpointError` for other files.
    """
    metadata = read_metadata(path)
    composition = stored_composition(metadata)
    if composition is None:
        raise CheckpointError(f"{str(path)!r} is not a refcond checkpoint: its metadata has no {COMPOSITION_KEY!r}.")
    provenance = None
    if PROVENANCE_KEY in metadata:
        try:
            provenance = json.loads(metadata[PROVENANCE_KEY])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{str(path)!r}: metadata {PROVENANCE_KEY!r} is not valid JSON: {exc}") from None
    return {"format_version": metadata.get(VERSION_KEY), "composition": composition, "provenance": provenance}


def stored_composition(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The composition a refcond checkpoint's metadata records, or ``None`` for other files."""
    if COMPOSITION_KEY not in metadata:
        return None
    try:
        return json.loads(metadata[COMPOSITION_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"metadata {COMPOSITION_KEY!r} is not valid JSON: {exc}") from None


class RefcondFormat:
    """Files written by :meth:`refcond.RefcondPipeline.save`."""

    def detect(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
        return COMPOSITION_KEY in metadata

    def convert(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], backbone: Backbone | None) -> ImportedCheckpoint:
        version = metadata.get(VERSION_KEY)
        if version not in READABLE_VERSIONS:
            raise CheckpointError(
                f"refcond checkpoint format version {version!r} is not supported by this refcond "
                f"(it reads versions {', '.join(READABLE_VERSIONS)}). Upgrade refcond."
            )
        composition = stored_composition(metadata)
        assert composition is not None  # detect() saw the key
        return ImportedCheckpoint(composition=composition, state_dict=dict(state_dict), source="refcond")


@hookimpl
def refcond_register_checkpoint_formats(register: Register) -> None:
    register("refcond", RefcondFormat(), description="refcond's own checkpoints (composition in the metadata).")
