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
import math
from pathlib import Path
from typing import Any

import torch

from refcond.checkpoints.io import read_metadata
from refcond.contracts import Backbone, ImportedCheckpoint
from refcond.errors import CheckpointError, ConfigError
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
    files older than format version 2). Raises :class:`refcond.CheckpointError` for other files,
    and for a refcond checkpoint whose metadata is malformed (see :func:`check_metadata`).
    """
    metadata = read_metadata(path)
    where = repr(str(path))
    if COMPOSITION_KEY not in metadata:
        raise CheckpointError(f"{where} is not a refcond checkpoint: its metadata has no {COMPOSITION_KEY!r}.")
    version = format_version(metadata, where)
    composition = stored_composition(metadata, where)
    provenance = stored_provenance(metadata, where)
    return {"format_version": version, "composition": composition, "provenance": provenance}


def check_metadata(metadata: dict[str, str], where: str) -> None:
    """Validate what loading a refcond checkpoint reads from its metadata (nothing for other files), raising
    :class:`CheckpointError` naming ``where``.

    The format version is a whole number this refcond reads; ``refcond.composition`` a JSON object
    that is a valid :class:`refcond.Composition` (roles, names, configs as objects: the components'
    own settings are checked against their schemas when built). Each JSON text is at most
    :data:`MAX_JSON_CHARS` long, nested at most :data:`MAX_JSON_DEPTH` deep, with no NaN or infinite
    number, no integer outside the 64-bit range and no name repeated in an object.
    ``refcond.provenance`` is not read to load; :func:`describe_checkpoint` validates it.
    """
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{where}: checkpoint metadata is a {type(metadata).__name__}, not a dict of strings.")
    if COMPOSITION_KEY not in metadata:
        return
    format_version(metadata, where)
    stored_composition(metadata, where)


def format_version(metadata: dict[str, str], where: str | None = None) -> str:
    """The format version of a refcond checkpoint, checked to be one this refcond reads."""
    where = _where(metadata, where)
    version = metadata.get(VERSION_KEY)
    if version is None:
        raise CheckpointError(
            f"{where}: the metadata has {COMPOSITION_KEY!r} but no {VERSION_KEY!r}, which every refcond checkpoint records: "
            "the file was not written by RefcondPipeline.save, or its metadata was edited. Save it again with refcond."
        )
    if not isinstance(version, str) or not (version.isascii() and version.isdigit()) or len(version) > 6 or version.startswith("0"):
        raise CheckpointError(
            f"{where}: metadata {VERSION_KEY!r} is {_short(version)}, not a format version (a whole number such as "
            f"{FORMAT_VERSION!r}): the metadata is corrupt. Save the checkpoint again with refcond."
        )
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{where}: refcond checkpoint format version {version!r} is not supported by this refcond "
            f"(it reads versions {', '.join(READABLE_VERSIONS)}). Upgrade refcond."
        )
    return version


def stored_composition(metadata: dict[str, str], where: str | None = None) -> dict[str, Any] | None:
    """The composition a refcond checkpoint's metadata records (validated), or ``None`` for other files.

    ``where`` names the file in messages (default: the file :func:`refcond.read_metadata` read them from).
    """
    if COMPOSITION_KEY not in metadata:
        return None
    where = _where(metadata, where)
    composition = _load_json(metadata, COMPOSITION_KEY, where)
    if not isinstance(composition, dict):
        raise CheckpointError(
            f"{where}: metadata {COMPOSITION_KEY!r} holds a JSON {_json_kind(composition)}, not an object describing "
            "a composition (with 'injectors', and 'encoder' / 'aggregator' / 'backbone'): the metadata is corrupt. "
            "Save the checkpoint again with refcond."
        )
    injectors = composition.get("injectors")
    if injectors is not None and not isinstance(injectors, (str, dict, list)):
        raise CheckpointError(
            f"{where}: metadata {COMPOSITION_KEY!r}: 'injectors' is a JSON {_json_kind(injectors)}; it must be a list of "
            "components (a name, or an object with 'name' and 'config'). Save the checkpoint again with refcond."
        )
    from refcond.config import Composition  # here: refcond.config imports the registry, which imports the checkpoints

    try:
        Composition.parse(composition, where=f"the composition stored in {where} (metadata {COMPOSITION_KEY!r})")
    except ConfigError as exc:
        raise CheckpointError(f"{exc}\nThe metadata is corrupt, or was written by another version of refcond: save the checkpoint again.") from None
    return composition


def stored_provenance(metadata: dict[str, str], where: str | None = None) -> dict[str, Any] | None:
    """What made a refcond checkpoint (``None`` when its metadata records nothing, as format version 1)."""
    if PROVENANCE_KEY not in metadata:
        return None
    where = _where(metadata, where)
    provenance = _load_json(metadata, PROVENANCE_KEY, where)
    problem = None
    if not isinstance(provenance, dict):
        problem = f"it holds a JSON {_json_kind(provenance)}, not an object"
    else:
        for field, kinds, label in _PROVENANCE_FIELDS:
            if field in provenance and not isinstance(provenance[field], kinds):
                problem = f"its field {field!r} is a JSON {_json_kind(provenance[field])}, not {label}"
                break
        else:
            for field, label in (("components", "an object"), ("borrowed", "a list of objects")):
                for role, entry in (provenance.get(field) or {}).items():
                    good = isinstance(entry, dict) if field == "components" else isinstance(entry, list) and all(isinstance(e, dict) for e in entry)
                    if not good:
                        problem = f"{field}[{role!r}] is a JSON {_json_kind(entry)}, not {label}"
                        break
                if problem:
                    break
    if problem:
        raise CheckpointError(
            f"{where}: metadata {PROVENANCE_KEY!r} is malformed: {problem}. The metadata is corrupt or was edited. The weights "
            "still load (refcond.load reads only the composition); saving the loaded pipeline again records a new provenance."
        )
    return provenance


#: Known provenance fields: (name, JSON types it may have, how messages describe them).
_PROVENANCE_FIELDS: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("refcond", (str, type(None)), "a version string"),
    ("libraries", (dict,), "an object of versions"),
    ("components", (dict,), "an object of roles"),
    ("backbone", (dict,), "an object"),
    ("borrowed", (dict,), "an object of roles"),
)

#: The longest JSON text a metadata value may hold (refcond writes a few kilobytes).
MAX_JSON_CHARS = 1 << 20
#: How deep a metadata value's JSON may nest (refcond's nest about five levels).
MAX_JSON_DEPTH = 32
#: Integers in metadata fit in 64 bits (nothing refcond records is larger).
_MAX_JSON_INT = 2**63


class _BadJson(ValueError):
    """A JSON value refcond does not accept, though the syntax is valid."""


def _load_json(metadata: dict[str, str], key: str, where: str) -> Any:
    text = metadata[key]
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: metadata {key!r} is a {type(text).__name__}, not a JSON string.")
    if len(text) > MAX_JSON_CHARS:
        raise CheckpointError(
            f"{where}: metadata {key!r} is {len(text)} characters long; refcond writes a few kilobytes (at most {MAX_JSON_CHARS} "
            "are read): the metadata is corrupt or not refcond's. Save the checkpoint again with refcond."
        )
    try:
        value = json.loads(text, parse_constant=_constant, parse_int=_int, parse_float=_float, object_pairs_hook=_object)
    except RecursionError:
        problem = "is nested too deeply"
    except _BadJson as exc:
        problem = str(exc)
    except json.JSONDecodeError as exc:
        problem = f"is not valid JSON: {exc}"
    else:
        depth = _depth(value)
        if depth <= MAX_JSON_DEPTH:
            return value
        problem = f"is nested {depth} levels deep (at most {MAX_JSON_DEPTH})"
    raise CheckpointError(f"{where}: metadata {key!r} {problem}. The metadata is corrupt: save the checkpoint again with refcond.")


def _constant(name: str) -> Any:
    raise _BadJson(f"holds {name}, which is not a JSON number")


def _int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > 19 or abs(int(text)) >= _MAX_JSON_INT:
        raise _BadJson(f"holds the integer {_short(text)}, outside the 64-bit range")
    return int(text)


def _float(text: str) -> float:
    if len(text) > 64:
        raise _BadJson(f"holds the number {_short(text)}, written with {len(text)} characters")
    value = float(text)
    if math.isinf(value):
        raise _BadJson(f"holds the number {_short(text)}, too large to be a float")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _BadJson(f"names {_short(name)} twice in one object")
        out[name] = value
    return out


def _depth(value: Any) -> int:
    """How deep ``value`` nests (a scalar is 0), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, level + 1))
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level + 1)
    return deepest


def _json_kind(value: Any) -> str:
    kinds = ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "array"), (dict, "object"))
    return "null" if value is None else next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


def _where(metadata: Any, where: str | None) -> str:
    return where or getattr(metadata, "where", None) or "the checkpoint"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}...' ({len(value) if isinstance(value, str) else '?'} characters)"


class RefcondFormat:
    """Files written by :meth:`refcond.RefcondPipeline.save`."""

    def detect(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
        return COMPOSITION_KEY in metadata

    def convert(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], backbone: Backbone | None) -> ImportedCheckpoint:
        format_version(metadata)
        composition = stored_composition(metadata)
        assert composition is not None  # detect() saw the key
        return ImportedCheckpoint(composition=composition, state_dict=dict(state_dict), source="refcond")


@hookimpl
def refcond_register_checkpoint_formats(register: Register) -> None:
    register("refcond", RefcondFormat(), description="refcond's own checkpoints (composition in the metadata).")
