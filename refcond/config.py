"""Configurations: the base class of component configs, and the :class:`Composition` that names
a backbone, an encoder, an aggregator and injectors with their configs."""

from __future__ import annotations

import copy
import json
import math
import os
import reprlib
import stat
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


#: How deeply the values of a composition (or of overrides) may nest: a composition nests about six
#: levels (roles, injectors, a spec, its config, a nested table such as ``layers``, per-block scales).
MAX_NESTING = 32
#: How many values (table entries and list items, all levels together) a composition or an override may hold.
MAX_VALUES = 100_000
#: The largest integer a configuration takes, in magnitude: torch's seeds and sizes fit in 64 bits.
MAX_INTEGER = 2**64 - 1
#: The largest composition file read, in bytes (a composition is a few hundred bytes).
MAX_FILE_BYTES = 1024 * 1024
#: The longest component or composition name.
MAX_NAME_LENGTH = 200


class ComponentConfig(BaseModel):
    """Base class of every component's configuration: unknown fields are errors, not ignored, and
    float fields refuse NaN and infinities."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class EmptyConfig(ComponentConfig):
    """The configuration of a component that takes no options."""


class ComponentSpec(BaseModel):
    """One role of a composition: a registered component name and its configuration."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=MAX_NAME_LENGTH, description="Registered name of the component (see `refcond plugins`).")
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

    name: str | None = Field(default=None, max_length=MAX_NAME_LENGTH, description="Name of the recipe this composition came from, if any.")
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
        return _spec_or_name(value, none_ok=True)

    @field_validator("injectors", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("a composition needs at least one injector, not None: e.g. injectors = ['cross-attention']")
        if isinstance(value, (str, Mapping, ComponentSpec)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(
                f"injectors is a list of injectors (names, or tables with name and config), not a {type(value).__name__}: "
                "e.g. injectors = ['cross-attention']"
            )
        return [_spec_or_name(v, none_ok=False) for v in value]

    @classmethod
    def parse(cls, data: Any, where: str = "composition") -> Composition:
        """Validate a dict, turning pydantic's errors into one :class:`ConfigError` naming the fields.

        Anything but a mapping (a list, a number, text) is refused, and so are values no
        composition holds: nesting deeper than :data:`MAX_NESTING`, more than :data:`MAX_VALUES`
        values, integers beyond :data:`MAX_INTEGER`, NaN and infinities.
        """
        if isinstance(data, Composition):
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{where}: a composition is a table (a dict, a JSON object) of roles, not {_kind(data)}. Write it as "
                "{'encoder': 'clip', 'aggregator': 'mean', 'injectors': ['cross-attention']}, or name a registered composition "
                "such as 'ip-adapter' (`refcond plugins` lists them)."
            )
        check_values(data, where)
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(_describe(exc, where, cls)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> Composition:
        """Read a composition from a ``.toml`` or ``.json`` file (a regular file of at most :data:`MAX_FILE_BYTES`)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".toml", ".json"):
            raise ConfigError(f"composition file {str(path)!r} must end in .toml or .json, not {path.suffix or 'nothing'!r}.")
        kind = "TOML" if suffix == ".toml" else "JSON"
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a folder, a pipe or a device: never opened
                raise ConfigError(f"composition file {str(path)!r} is not a regular file: give the path of a .toml or .json file.")
            with open(path, "rb") as file:
                raw = file.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read composition file {str(path)!r}: {exc.strerror or exc}") from None
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError(
                f"composition file {str(path)!r} is larger than {MAX_FILE_BYTES // 1024} KiB; a composition is a few lines. "
                "Check that the path names the composition, not a checkpoint or an image."
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"composition file {str(path)!r} is not UTF-8 text.") from None
        try:
            data = tomllib.loads(text) if kind == "TOML" else json.loads(text)
        except RecursionError:
            raise ConfigError(f"{path}: not valid {kind}: nested more than {MAX_NESTING} levels deep; a composition nests a few.") from None
        except ValueError as exc:  # the decoders' errors, and integers too long to convert
            reason = str(exc)
            if "integer string conversion" in reason:  # Python's own limit, not the file's syntax
                reason = f"it holds an integer of more than 4300 digits; configurations take integers of at most {len(str(MAX_INTEGER))} digits"
            raise ConfigError(f"{path}: not valid {kind}: {reason}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{path}: the file holds {_kind(data)}, but a composition is a {'table of keys' if kind == 'TOML' else 'JSON object'} "
                "with 'injectors' (and 'encoder', 'aggregator', 'backbone', 'name' as needed)."
            )
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
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"overrides are a dict of roles (e.g. {{'aggregator': 'concat'}}), not {_kind(overrides)}.")
        check_values(overrides, "overrides")
        data = self.model_dump()
        for role, override in overrides.items():
            if role not in ROLES and role != "name":
                raise ConfigError(f"unknown composition role {_short(role)}.{did_you_mean(str(role), ROLES)} Roles: {', '.join(ROLES)}.")
            if role == "name":
                data["name"] = override
            elif role == "injectors" and isinstance(override, Mapping):
                for key, item in override.items():
                    i = _injector_index(key, data["injectors"])
                    data["injectors"][i] = merge_spec(data["injectors"][i], item, f"injectors[{i}]")
            elif role == "injectors":
                data["injectors"] = override
            else:
                data[role] = None if override is None else merge_spec(data[role], override, role)  # None removes the role
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


def _injector_index(key: Any, injectors: list[dict[str, Any]]) -> int:
    """An injector addressed by position (``0``, ``"0"``) or by component name (``"cross-attention"``)."""
    names = [spec["name"] for spec in injectors]
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise ConfigError(
            f"injectors are addressed by position (0, '0') or by component name ('cross-attention'), not by {_kind(key)}. Its injectors: {names}."
        )
    if isinstance(key, int) or (key.isascii() and key.isdigit()):
        i = int(key)
        if 0 <= i < len(injectors):
            return i
        raise ConfigError(f"injectors[{i}] does not exist: the composition has {len(injectors)} injector(s): {names}.")
    if key in names:
        return names.index(key)
    raise ConfigError(f"the composition has no injector {_short(key)}.{did_you_mean(key, names)} Its injectors: {names}.")


#: What an override of one role may hold.
_SPEC_KEYS = ("name", "config")


def merge_spec(current: dict[str, Any] | None, override: Any, role: str = "role") -> dict[str, Any]:
    """One role's ``{"name", "config"}`` with an override applied (see :meth:`Composition.with_overrides`).

    ``override`` is a name, a dict with ``name`` and/or ``config``, or a :class:`ComponentSpec`;
    anything else (a number, a list, other keys, a config that is not a dict) is a
    :class:`ConfigError` naming ``role`` and the shape to give.
    """
    if isinstance(override, str):
        override = {"name": override}
    if isinstance(override, BaseModel):
        override = override.model_dump()
    if not isinstance(override, Mapping):
        raise ConfigError(
            f"the override of {role} is {_kind(override)}: give a component name ('concat'), a dict with 'name' and/or "
            "'config' ({'config': {'scale': 0.5}}), or None to remove the role."
        )
    override = dict(override)
    unknown = [key for key in override if key not in _SPEC_KEYS]
    if unknown:
        raise ConfigError(
            f"the override of {role} has unknown key {_short(unknown[0])}.{did_you_mean(str(unknown[0]), _SPEC_KEYS)} "
            "An override holds 'name' (another component) and/or 'config' (its options)."
        )
    config = override.get("config", {})
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"the config of the {role} override is {_kind(config)}: give a dict of options, e.g. {{'scale': 0.5}}.")
    name = override.get("name", None if current is None else current["name"])
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"the name in the {role} override is {_kind(name)}: give a registered component name (`refcond plugins` lists them).")
    if current is None or name != current["name"]:
        return {"name": name, "config": dict(config)}
    merged = copy.deepcopy(current)
    merged["config"] = merge_nested(merged.get("config", {}), config)
    return merged


def _spec_or_name(value: Any, *, none_ok: bool) -> Any:
    """A role as given in a composition: a bare name becomes ``{"name": ...}``; anything but a table is refused."""
    if isinstance(value, str):
        return {"name": value}
    if (value is None and none_ok) or isinstance(value, (Mapping, ComponentSpec)):
        return value
    raise ValueError(
        f"a role is a registered component name (e.g. 'mean') or a table with name and config "
        f"(e.g. {{name = 'cross-attention', config = {{scale = 0.5}}}}), not {_kind(value)}"
    )


def check_values(data: Any, where: str) -> None:
    """Refuse values no configuration holds, before anything walks them recursively.

    Nesting deeper than :data:`MAX_NESTING` (or a table that contains itself), more than
    :data:`MAX_VALUES` values, integers beyond :data:`MAX_INTEGER` in magnitude (in values or keys),
    NaN and infinities: each raises :class:`ConfigError` naming ``where`` and the path of the value.
    """
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    seen = 0
    while stack:
        value, path, depth = stack.pop()
        seen += 1
        here = f"{where}: {path or 'the value'}"
        if seen > MAX_VALUES:
            raise ConfigError(f"{where}: more than {MAX_VALUES} values; a composition holds a few dozen. Check what was passed.")
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, int):
            if abs(value) > MAX_INTEGER:
                raise ConfigError(f"{here} is an integer of {_digits(value)} digits; configurations take integers of at most {len(str(MAX_INTEGER))} digits.")
            continue
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ConfigError(f"{here} is {value}; configurations take finite numbers only.")
            continue
        if isinstance(value, (Mapping, list, tuple)):
            if depth >= MAX_NESTING:
                raise ConfigError(
                    f"{here} is nested more than {MAX_NESTING} levels deep (or contains itself); a composition nests a few levels."
                )
            items = value.items() if isinstance(value, Mapping) else enumerate(value)
            for key, item in items:
                if isinstance(key, int) and not isinstance(key, bool) and abs(key) > MAX_INTEGER:
                    raise ConfigError(f"{here} has a key that is an integer of {_digits(key)} digits; keys are names or positions.")
                stack.append((item, f"{path}.{_key(key)}" if path else _key(key), depth + 1))


def _key(key: Any) -> str:
    return _short(key) if not isinstance(key, (str, int)) or isinstance(key, bool) else str(key)[:80]


def _digits(value: int) -> int:
    """The number of decimal digits of ``value``, without converting it to text (which Python refuses beyond 4300 digits)."""
    value = abs(value)
    estimate = max(1, int(value.bit_length() * math.log10(2)))  # the digits, or one fewer
    return estimate + 1 if value >= 10**estimate else estimate


def _kind(value: Any) -> str:
    """``a list ([1, 2])``: the type and a short repr of a value, for messages."""
    if value is None:
        return "None"
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name} ({_short(value)})"


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr, also for integers too long for Python to convert to text."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 60, 60, 40
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = 6

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:
            return f"<an integer of {_digits(x)} digits>"
        return super().repr_int(x, level)


def _short(value: Any) -> str:
    """A repr of ``value`` of at most about 100 characters, whatever its size or nesting."""
    try:
        return _ShortRepr().repr(value)
    except Exception:  # noqa: BLE001 - a third party's __repr__ may fail; the message must not
        return f"<a {type(value).__name__}>"


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
    if not isinstance(values, Mapping):
        raise ConfigError(f"invalid configuration for {where}: the config is {_kind(values)}; give a dict of options, e.g. {{'scale': 0.5}}.")
    check_values(values, f"configuration of {where}")
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
            message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            lines.append(f"  - {loc}: {message} (got {_short(error.get('input'))})")
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
