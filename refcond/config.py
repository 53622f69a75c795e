"""Configurations: the base class of component configs, and the :class:`Composition` that names
a backbone, an encoder, an aggregator and injectors with their configs."""

from __future__ import annotations

import copy
import json
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from refcond.errors import ConfigError, did_you_mean
from refcond.registry import Kind, Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ComponentConfig(BaseModel):
    """Base class of every component's configuration: unknown fields are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EmptyConfig(ComponentConfig):
    """The configuration of a component that takes no options."""


class ComponentSpec(BaseModel):
    """One role of a composition: a registered component name and its configuration."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Registered name of the component (see `refcond plugins`).")
    config: dict[str, Any] = Field(default_factory=dict, description="Options, validated by the component's config model.")


#: The roles of a composition, and the registry kind each refers to.
ROLES: dict[str, Kind] = {"backbone": "backbone", "encoder": "encoder", "aggregator": "aggregator", "injectors": "injector"}


class Composition(BaseModel):
    """A complete conditioning path: backbone, encoder, aggregator and one or more injectors.

    Encoder and aggregator come as a pair, or not at all: a composition whose injectors need no
    encoded condition (LoRA files; a LoRA tuned on the references themselves) has neither.
    Load one from a dict, a TOML or JSON file (:meth:`from_file`), or by the name of a registered
    recipe. A role may be written as a bare name (``aggregator = "mean"``) or as a table with
    ``name`` and ``config``. :meth:`validate_components` checks every config against the schema
    its plugin registered before anything is built.
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="Name of the recipe this composition came from, if any.")
    backbone: ComponentSpec | None = Field(default=None, description="Inferred from the pipeline when building from one.")
    encoder: ComponentSpec | None = Field(default=None, description="Turns the references into features; None for injectors that need none.")
    aggregator: ComponentSpec | None = Field(default=None, description="Turns the features into a condition; set exactly when encoder is.")
    injectors: list[ComponentSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _encoder_and_aggregator_pair(self) -> Composition:
        if (self.encoder is None) != (self.aggregator is None):
            missing, present = ("aggregator", "encoder") if self.aggregator is None else ("encoder", "aggregator")
            raise ValueError(f"the composition has an {present} but no {missing}: set both (e.g. encoder='clip', aggregator='mean') or neither")
        return self

    @field_validator("backbone", "encoder", "aggregator", mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("injectors", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        if isinstance(value, (str, Mapping)):
            value = [value]
        return [{"name": v} if isinstance(v, str) else v for v in value]

    @classmethod
    def parse(cls, data: Mapping[str, Any], where: str = "composition") -> Composition:
        """Validate a dict, turning pydantic's errors into one :class:`ConfigError` naming the fields."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(_describe(exc, where, cls)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> Composition:
        """Read a composition from a ``.toml`` or ``.json`` file."""
        path = Path(path)
        if path.suffix.lower() not in (".toml", ".json"):
            raise ConfigError(f"composition file {str(path)!r} must end in .toml or .json, not {path.suffix or 'nothing'!r}.")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read composition file {str(path)!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"composition file {str(path)!r} is not UTF-8 text.") from None
        try:
            data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {exc}") from None
        return cls.parse(data, where=str(path))

    def specs(self) -> list[tuple[str, Kind, ComponentSpec]]:
        """``(role label, kind, spec)`` for every role that is set, in build order."""
        out: list[tuple[str, Kind, ComponentSpec]] = []
        if self.backbone is not None:
            out.append(("backbone", "backbone", self.backbone))
        if self.encoder is not None and self.aggregator is not None:
            out.append(("encoder", "encoder", self.encoder))
            out.append(("aggregator", "aggregator", self.aggregator))
        out.extend((f"injectors[{i}]", "injector", spec) for i, spec in enumerate(self.injectors))
        return out

    def validate_components(self, registry: Registry) -> dict[str, BaseModel]:
        """Resolve every name and validate every config; returns the typed config by role label."""
        typed: dict[str, BaseModel] = {}
        for role, kind, spec in self.specs():
            entry = registry.get(kind, spec.name)
            typed[role] = validate_config(entry.config, spec.config, where=f"{role} {spec.name!r} ({entry.provenance})")
        return typed

    def with_overrides(self, overrides: Mapping[str, Any]) -> Composition:
        """A copy with some roles replaced or their configs merged.

        An override with the same (or no) ``name`` merges its ``config`` into the existing one; an
        override naming another component replaces the role. ``injectors`` may be a list (replaces
        them all) or a dict ``{index or name: override}``.
        """
        data = self.model_dump()
        for role, override in overrides.items():
            if role not in ROLES and role != "name":
                raise ConfigError(f"unknown composition role {role!r}.{did_you_mean(role, ROLES)} Roles: {', '.join(ROLES)}.")
            if role == "name":
                data["name"] = override
            elif role == "injectors" and isinstance(override, Mapping):
                for key, item in override.items():
                    i = _injector_index(key, data["injectors"])
                    data["injectors"][i] = _merge_spec(data["injectors"][i], item)
            elif role == "injectors":
                data["injectors"] = override
            else:
                data[role] = None if override is None else _merge_spec(data[role], override)  # None removes the role
        return Composition.parse(data)

    def resolved(self, configs: Mapping[str, BaseModel]) -> Composition:
        """A copy whose configs are the validated ones (defaults included), keyed by :meth:`specs` role labels.

        Roles missing from ``configs`` keep their config as written.
        """
        data = self.model_dump()
        for role, _, _ in self.specs():
            config = configs.get(role)
            if config is None:
                continue
            dumped = config.model_dump(mode="json")
            if role.startswith("injectors["):
                data["injectors"][int(role[len("injectors[") : -1])]["config"] = dumped
            else:
                data[role]["config"] = dumped
        return Composition.parse(data)


def _injector_index(key: int | str, injectors: list[dict[str, Any]]) -> int:
    """An injector addressed by position (``0``, ``"0"``) or by component name (``"cross-attention"``)."""
    names = [spec["name"] for spec in injectors]
    if isinstance(key, int) or str(key).isdigit():
        i = int(key)
        if 0 <= i < len(injectors):
            return i
        raise ConfigError(f"injectors[{i}] does not exist: the composition has {len(injectors)} injector(s): {names}.")
    if key in names:
        return names.index(key)
    raise ConfigError(f"the composition has no injector {key!r}.{did_you_mean(str(key), names)} Its injectors: {names}.")


def _merge_spec(current: dict[str, Any] | None, override: Any) -> dict[str, Any]:
    if isinstance(override, str):
        override = {"name": override}
    if isinstance(override, BaseModel):
        override = override.model_dump()
    override = dict(override)
    if current is None or override.get("name", current["name"]) != current["name"]:
        return {"name": override.get("name"), "config": dict(override.get("config", {}))}
    merged = copy.deepcopy(current)
    merged["config"] = merge_nested(merged.get("config", {}), override.get("config", {}))
    return merged


def merge_nested(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, level by level: a dict merges into a dict, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = merge_nested(current, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validate_config(model: type[BaseModel] | None, values: Mapping[str, Any] | BaseModel, where: str) -> BaseModel:
    """Validate ``values`` against a component's config model, with errors that name the component."""
    model = model or EmptyConfig
    if isinstance(values, model):
        return values
    if isinstance(values, BaseModel):
        values = values.model_dump()
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where, model)) from None


def _describe(exc: ValidationError, where: str, model: type[BaseModel]) -> str:
    lines = [f"invalid configuration for {where}:"]
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"]) or "(root)"
        if error["type"] == "extra_forbidden":
            field_name = str(error["loc"][-1])
            owner = _model_at(model, error["loc"][:-1])
            fields = list(owner.model_fields) if owner is not None else []
            hint = did_you_mean(field_name, fields)
            lines.append(f"  - unknown field {loc!r}.{hint} Valid fields: {', '.join(fields) or 'none'}.")
        elif error["type"] == "missing":
            lines.append(f"  - missing required field {loc!r}.")
        else:
            lines.append(f"  - {loc}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``path`` (list indices skipped), for error hints."""
    current: type[BaseModel] | None = model
    for part in path:
        if isinstance(part, int):
            continue
        field_info = current.model_fields.get(str(part)) if current is not None else None
        if field_info is None:
            return None
        current = _inner_model(field_info.annotation)
    return current


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None
