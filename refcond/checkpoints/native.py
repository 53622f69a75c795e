"""refcond's own checkpoint format: one ``.safetensors`` file that rebuilds its composition.

Keys are namespaced by role (``encoder.``, ``aggregator.``, ``injector.<i>.``) and the composition
is stored as JSON in the file's metadata, so :func:`refcond.load` needs nothing else.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from refcond.contracts import Backbone, ImportedCheckpoint
from refcond.errors import CheckpointError
from refcond.hookspecs import hookimpl
from refcond.registry import Register

COMPOSITION_KEY = "refcond.composition"
VERSION_KEY = "refcond.format_version"
FORMAT_VERSION = "1"


def metadata_for(composition: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata that marks a file as a refcond checkpoint of ``composition``."""
    return {COMPOSITION_KEY: json.dumps(composition, sort_keys=True), VERSION_KEY: FORMAT_VERSION}


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
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"refcond checkpoint format version {version!r} is not supported by this refcond "
                f"(it reads version {FORMAT_VERSION}). Upgrade refcond."
            )
        composition = stored_composition(metadata)
        assert composition is not None  # detect() saw the key
        return ImportedCheckpoint(composition=composition, state_dict=dict(state_dict), source="refcond")


@hookimpl
def refcond_register_checkpoint_formats(register: Register) -> None:
    register("refcond", RefcondFormat(), description="refcond's own checkpoints (composition in the metadata).")
