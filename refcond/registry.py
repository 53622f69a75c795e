"""The registry: every named component, composition and checkpoint format, with its provenance."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from refcond.errors import DuplicateComponentError, UnknownComponentError

Kind = Literal["backbone", "encoder", "aggregator", "injector", "composition", "checkpoint_format", "metric", "recipe"]

#: Registration hook name -> the kind of thing it registers.
HOOK_KINDS: dict[str, Kind] = {
    "refcond_register_backbones": "backbone",
    "refcond_register_encoders": "encoder",
    "refcond_register_aggregators": "aggregator",
    "refcond_register_injectors": "injector",
    "refcond_register_compositions": "composition",
    "refcond_register_checkpoint_formats": "checkpoint_format",
    "refcond_register_metrics": "metric",
    "refcond_register_recipes": "recipe",
}

#: Kinds whose entries are built by ``factory(config, context)``.
COMPONENT_KINDS: tuple[Kind, ...] = ("backbone", "encoder", "aggregator", "injector", "metric")


class Register(Protocol):
    """The callback a registration hook receives."""

    def __call__(
        self,
        name: str,
        obj: Any,
        *,
        config: type[BaseModel] | None = None,
        description: str = "",
    ) -> None: ...


@dataclass(frozen=True)
class Provenance:
    """Who registered an entry: the plugin name and the distribution that ships it."""

    plugin: str
    distribution: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        if self.distribution:
            return f"plugin {self.plugin!r} ({self.distribution} {self.version})"
        return f"plugin {self.plugin!r}"


@dataclass(frozen=True)
class Entry:
    """One registered name.

    ``obj`` is a factory ``factory(config, context)`` for components, a composition for
    compositions, and an importer object for checkpoint formats. ``config`` is the pydantic model
    that validates the factory's configuration.
    """

    kind: Kind
    name: str
    obj: Any
    config: type[BaseModel] | None
    provenance: Provenance
    description: str = ""


@dataclass
class Registry:
    """All registered entries, keyed by kind and name."""

    _entries: dict[Kind, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in HOOK_KINDS.values()})
    #: Appended to unknown-name errors: why a name may be missing (plugins that were not loaded).
    unknown_hint: str = ""

    def add(self, entry: Entry) -> None:
        """Add an entry; a name already taken for that kind is an error naming both plugins."""
        taken = self._entries[entry.kind].get(entry.name)
        if taken is not None:
            raise DuplicateComponentError(entry.kind.replace("_", " "), entry.name, taken.provenance, entry.provenance)
        self._entries[entry.kind][entry.name] = entry

    def get(self, kind: Kind, name: str) -> Entry:
        """Return the entry for ``name``; an unknown name lists the available ones."""
        try:
            return self._entries[kind][name]
        except KeyError:
            raise UnknownComponentError(kind.replace("_", " "), name, self._entries[kind], self.unknown_hint) from None

    def names(self, kind: Kind) -> list[str]:
        """Sorted names registered for ``kind``."""
        return sorted(self._entries[kind])

    def entries(self, kind: Kind | None = None) -> Iterator[Entry]:
        """Every entry, or those of one kind, in name order."""
        kinds = [kind] if kind else list(self._entries)
        for k in kinds:
            for name in sorted(self._entries[k]):
                yield self._entries[k][name]

    def by_plugin(self) -> Mapping[str, list[Entry]]:
        """Entries grouped by the plugin that registered them."""
        grouped: dict[str, list[Entry]] = {}
        for entry in self.entries():
            grouped.setdefault(entry.provenance.plugin, []).append(entry)
        return grouped

    def register_callback(self, kind: Kind, provenance: Provenance, added: list[Entry]) -> Register:
        """The ``register`` callback handed to one plugin's hook for one kind."""

        def register(
            name: str,
            obj: Any,
            *,
            config: type[BaseModel] | None = None,
            description: str = "",
        ) -> None:
            if not isinstance(name, str) or not name:
                raise TypeError(f"{provenance}: register() needs a non-empty string name, got {name!r}")
            if config is not None and not (isinstance(config, type) and issubclass(config, BaseModel)):
                raise TypeError(f"{provenance}: config for {kind} {name!r} must be a pydantic model class, got {config!r}")
            _check_object(kind, name, obj, provenance)
            entry = Entry(kind, name, obj, config, provenance, description or _first_doc_line(obj))
            self.add(entry)
            added.append(entry)

        return register

    def remove(self, entries: list[Entry]) -> None:
        """Drop entries (used to roll back a plugin whose registration failed half way)."""
        for entry in entries:
            if self._entries[entry.kind].get(entry.name) is entry:
                del self._entries[entry.kind][entry.name]


def _check_object(kind: Kind, name: str, obj: Any, provenance: Provenance) -> None:
    """Reject, at registration, an object that could only fail later, when it is built."""
    if kind in COMPONENT_KINDS and not callable(obj):
        raise TypeError(f"{provenance}: {kind} {name!r} must be registered with a factory(config, context), got {type(obj).__name__}")
    if kind == "checkpoint_format" and not (callable(getattr(obj, "detect", None)) and callable(getattr(obj, "convert", None))):
        raise TypeError(f"{provenance}: checkpoint format {name!r} must have detect() and convert() methods, got {type(obj).__name__}")
    if kind == "composition" and not isinstance(obj, (Mapping, BaseModel)):
        raise TypeError(f"{provenance}: composition {name!r} must be a refcond.Composition or a dict, got {type(obj).__name__}")
    if kind == "recipe" and not isinstance(obj, Mapping):
        raise TypeError(f"{provenance}: recipe {name!r} must be a dict of training-config fields, got {type(obj).__name__}")


def _first_doc_line(obj: Any) -> str:
    """The summary line of a factory function, class or method (a classmethod factory), used when no description is given."""
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj)):
        return ""
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0] if doc else ""
