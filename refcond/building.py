"""Building a composition: resolve names, merge checkpoint settings, validate, build, load weights."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from refcond.checkpoints import import_checkpoint, open_checkpoint
from refcond.checkpoints.native import stored_composition
from refcond.checkpoints.values import check_tensors
from refcond.config import Composition, merge_nested, merge_spec, validate_config
from refcond.contracts import (
    Aggregator,
    Backbone,
    BuildContext,
    Encoder,
    ImportedCheckpoint,
    Injector,
)
from refcond.errors import CheckpointError, ConfigError, IncompatibleBackboneError
from refcond.plugins import Plugins
from refcond.registry import Entry, Registry
from refcond.weights import borrowed_weights, under


@dataclass
class Built:
    """The components of a composition, built and loaded, in role order.

    :ivar composition: the composition as built: every role's configuration resolved, defaults included.
    :ivar entries: the registry entry each role was built from (who registered it), by checkpoint role
        (``backbone``, ``encoder``, ``aggregator``, ``injector.<i>``).
    :ivar carried: per role, the prefixes of borrowed weights a checkpoint carried (fine-tuned copies,
        which count as the component's own from then on).
    """

    composition: Composition
    backbone: Backbone
    encoder: Encoder | None
    aggregator: Aggregator | None
    injectors: list[Injector]
    entries: dict[str, Entry] = field(default_factory=dict)
    carried: dict[str, set[str]] = field(default_factory=dict)


def resolve_composition(composition: str | Path | Mapping[str, Any] | Composition, registry: Registry) -> Composition:
    """A composition from a registered recipe name, a ``.toml``/``.json`` file, a dict, or itself."""
    if isinstance(composition, Composition):
        return composition
    if not isinstance(composition, (str, os.PathLike)):  # a dict, or what Composition.parse explains is not one
        return Composition.parse(composition)
    path = Path(composition)
    if path.suffix.lower() in (".toml", ".json"):
        return Composition.from_file(path)
    entry = registry.get("composition", str(composition))
    recipe = entry.obj if isinstance(entry.obj, Composition) else Composition.parse(entry.obj, where=f"composition {entry.name!r}")
    return recipe.model_copy(update={"name": recipe.name or entry.name})


def infer_backbone(pipeline: Any, registry: Registry) -> str:
    """The name of the registered backbone that accepts ``pipeline``."""
    names = [e.name for e in registry.entries("backbone") if hasattr(e.obj, "accepts") and e.obj.accepts(pipeline)]
    if not names:
        raise IncompatibleBackboneError(
            f"no registered backbone can drive a {type(pipeline).__name__}. "
            f"Available backbones: {', '.join(registry.names('backbone'))}. refcond supports UNet-based "
            "Stable Diffusion 1.x/2.x and SDXL pipelines."
        )
    return names[0]


def build(
    composition: str | Path | Mapping[str, Any] | Composition | None,
    plugins: Plugins,
    *,
    pipeline: Any = None,
    checkpoint: str | Path | dict[str, torch.Tensor] | None = None,
    allow_pickle: bool = False,
    overrides: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> Built:
    """Build every component of a composition and load the checkpoint's weights into them.

    Precedence of settings: the recipe, then what the checkpoint implies, then ``overrides``.
    Every config is validated before any weight is read into a component. With ``composition``
    ``None`` the checkpoint names it: a refcond checkpoint stores its composition, a foreign file
    the recipe it is made for (:attr:`ImportedCheckpoint.recipe`). ``seed`` fixes the fresh
    weights: each role draws from its own generator seeded from ``seed`` and the role, so the same
    seed gives the same weights in any process, and changing one role leaves the others' alone.
    """
    registry = plugins.registry
    if composition is None and checkpoint is None:
        raise ConfigError("nothing to build: name a composition (e.g. 'ip-adapter') or pass a refcond checkpoint.")
    file = open_checkpoint(checkpoint, allow_pickle=allow_pickle) if checkpoint is not None else None
    comp: Composition | None
    if composition is not None:
        comp = resolve_composition(composition, registry)
    else:
        assert file is not None
        stored = stored_composition(file.metadata)
        comp = None if stored is None else Composition.parse(stored, where=f"composition stored in {file.where}")
        if comp is None and pipeline is None:
            raise ConfigError(
                f"{file.where} is not a refcond checkpoint, so it does not say how to rebuild itself without a pipeline: "
                "pass the pipeline (refcond.load(path, pipe)), or name the composition (refcond.from_pipe(pipe, 'ip-adapter', checkpoint=path))."
            )

    backbone_spec = _backbone_spec(comp, overrides, pipeline, registry)
    typed: dict[str, BaseModel] = {}
    if comp is not None and file is not None:
        # The file's settings are not known yet; names can still be checked before anything loads.
        for _, kind, spec in comp.with_overrides(overrides or {}).specs():
            registry.get(kind, spec.name)
    elif comp is not None:
        # Every name and config is checked before the backbone (which may load weights) is built.
        comp = _finalise(comp, overrides, backbone_spec)
        typed = comp.validate_components(registry)

    # The backbone comes next: foreign-format importers check shapes against its UNet.
    backbone_entry = registry.get("backbone", backbone_spec["name"])
    backbone_config = validate_config(backbone_entry.config, backbone_spec.get("config", {}), where=f"backbone {backbone_entry.name!r}")
    backbone: Backbone = backbone_entry.obj(backbone_config, BuildContext(extras={"pipeline": pipeline}))

    imported: ImportedCheckpoint | None = None
    if file is not None:
        imported = import_checkpoint(file, registry, backbone)
        if comp is None:
            if imported.recipe is None:
                raise ConfigError(
                    f"{file.where} is in the {imported.source!r} format, which does not say which composition it is for: "
                    "name it, e.g. refcond.from_pipe(pipe, 'ip-adapter', checkpoint=path)."
                )
            comp = resolve_composition(imported.recipe, registry)
        comp = _finalise(comp.with_overrides(imported.composition), overrides, backbone_spec)
        try:
            typed = comp.validate_components(registry)
        except ConfigError as exc:  # settings the file stores or implies: say which file
            raise ConfigError(f"{file.where} ({imported.source} checkpoint): {exc}") from None
    assert comp is not None

    context = BuildContext(backbone=backbone)
    entries: dict[str, Entry] = {"backbone": backbone_entry}
    if comp.encoder is not None and comp.aggregator is not None:
        entries["encoder"] = registry.get("encoder", comp.encoder.name)
        entries["aggregator"] = registry.get("aggregator", comp.aggregator.name)
        with seeded(seed, "encoder"):
            context.encoder = entries["encoder"].obj(typed["encoder"], context)
        with seeded(seed, "aggregator"):
            context.aggregator = entries["aggregator"].obj(typed["aggregator"], context)
    injectors = []
    for i, spec in enumerate(comp.injectors):
        entries[f"injector.{i}"] = registry.get("injector", spec.name)
        with seeded(seed, f"injector.{i}"):
            injectors.append(entries[f"injector.{i}"].obj(typed[f"injectors[{i}]"], context))
    built = Built(comp.resolved(typed), backbone, context.encoder, context.aggregator, injectors, entries)
    if imported is not None:
        load_weights(built, imported)
    for role, component in roles(built).items():
        for part in borrowed_weights(component, role):
            if part.prefix is not None:
                part.module.requires_grad_(False)  # pretrained weights: a training stage unfreezes what it trains
        if isinstance(component, torch.nn.Module):
            component.eval()  # built for inference, as diffusers' and transformers' from_pretrained; training calls .train()
    return built


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from a run's seed and a path of names and numbers (a stage, a step, a process, a sample)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


@contextmanager
def seeded(seed: int | None, role: str) -> Iterator[None]:
    """Draw fresh weights for ``role`` from torch's global generator seeded from ``(seed, role)``, restoring it after.

    ``None`` leaves the global generator as it is (fresh weights then vary from run to run).
    """
    if seed is None:
        yield
        return
    digest = hashlib.sha256(f"refcond:{seed}:{role}".encode()).digest()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
        yield


def _finalise(comp: Composition, overrides: Mapping[str, Any] | None, backbone_spec: dict[str, Any]) -> Composition:
    """Apply the caller's overrides, then pin the backbone that is actually used."""
    if overrides:
        comp = comp.with_overrides(overrides)
    return comp.model_copy(update={"backbone": None}).with_overrides({"backbone": backbone_spec})


def _backbone_spec(comp: Composition | None, overrides: Mapping[str, Any] | None, pipeline: Any, registry: Registry) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if comp is not None and comp.backbone is not None:
        spec = comp.backbone.model_dump()
    override = (overrides or {}).get("backbone")
    if override is not None:
        given = merge_spec(None, override, "backbone")  # checks its shape; its config merges whichever backbone it names
        spec = {**spec, **({"name": given["name"]} if given["name"] else {}), "config": merge_nested(spec.get("config", {}), given["config"])}
    if pipeline is not None and not spec.get("name"):
        spec["name"] = infer_backbone(pipeline, registry)
    if not spec.get("name"):
        raise ConfigError("the composition names no backbone: pass a pipeline, or set backbone = 'sd15' or 'sdxl'.")
    return spec


def roles(built: Built) -> dict[str, Any]:
    """Role prefix in checkpoints -> component: ``encoder``, ``aggregator``, ``injector.<i>``."""
    out: dict[str, Any] = {"encoder": built.encoder, "aggregator": built.aggregator} if built.encoder is not None else {}
    out.update({f"injector.{i}": inj for i, inj in enumerate(built.injectors)})
    return out


def load_weights(built: Built, imported: ImportedCheckpoint) -> None:
    """Load role-namespaced weights, strictly: every key known, every shape right, nothing missing.

    A component's borrowed weights (:class:`refcond.BorrowedWeights`) may be absent as a whole: they
    keep what they were built with. When present they are loaded, and recorded in ``built.carried``.
    """
    by_role: dict[str, dict[str, torch.Tensor]] = {}
    named_by: dict[tuple[str, str], str] = {}
    role_map = roles(built)
    for key, tensor in imported.state_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"checkpoint key {key!r} holds a {type(tensor).__name__}; a checkpoint maps weight names (str) to tensors.")
        role, rest = _split_role(key, built)
        if role not in role_map:
            raise CheckpointError(f"key {key!r} belongs to role {role!r}, which this composition does not have. Roles: {', '.join(role_map)}.")
        first = named_by.setdefault((role, rest), key)
        if first != key:  # e.g. injector.0.x and injector.cross-attention.x: which one loads would be an accident
            raise CheckpointError(
                f"keys {first!r} and {key!r} both hold {role}.{rest} (a role by index and by name): keep one of them."
            )
        by_role.setdefault(role, {})[rest] = tensor
    for role, component in role_map.items():
        expected = component.state_dict() if has_weights(component) else {}
        given = by_role.get(role, {})
        if not expected:
            if given:
                raise CheckpointError(f"{role} has no weights, but the checkpoint has {len(given)} keys for it, e.g. '{role}.{next(iter(given))}'.")
            continue
        if not given and role in imported.optional_roles:
            continue  # the file leaves this role's weights as built
        parts = [part.prefix for part in borrowed_weights(component, role) if part.prefix is not None]
        absent = [prefix for prefix in parts if not any(under(key, prefix) for key in given)]
        needed = {key: value for key, value in expected.items() if not any(under(key, prefix) for prefix in absent)}
        if not needed and not given:
            continue  # only borrowed weights, none carried: they stay as built
        if not given:
            raise CheckpointError(f"the checkpoint has no weights for {role} ({type(component).__name__}); expected keys such as {role}.{next(iter(needed))}.")
        check_state_dict(needed, given, prefix=f"{role}.")
        component.load_state_dict(given, strict=not absent)
        built.carried[role] = {prefix for prefix in parts if prefix not in absent}


def has_weights(component: Any) -> bool:
    """Whether a component carries weights: it has ``state_dict()`` and ``load_state_dict(sd, strict=)``, as a torch module does."""
    return callable(getattr(component, "state_dict", None)) and callable(getattr(component, "load_state_dict", None))


def _split_role(key: str, built: Built) -> tuple[str, str]:
    head, _, rest = key.partition(".")
    if head != "injector":
        return head, rest
    index, _, rest = rest.partition(".")
    if not (index.isascii() and index.isdigit()):  # an importer may address an injector by its component name
        names = [spec.name for spec in built.composition.injectors]
        if index not in names:
            raise CheckpointError(f"key {key!r} is for injector {index!r}, but the composition's injectors are {names}.")
        if names.count(index) > 1:
            raise CheckpointError(f"key {key!r} names injector {index!r}, but the composition has {names.count(index)} of them: address it by index (injector.<i>).")
        index = str(names.index(index))
    return f"injector.{index}", rest


def check_state_dict(
    expected: Mapping[str, torch.Tensor | tuple[int, ...]] | None,
    given: Mapping[str, torch.Tensor],
    prefix: str = "",
    *,
    title: str = "checkpoint does not match the model",
    values: bool = False,
) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected or wrongly shaped key.

    ``expected`` maps each key to a tensor or to its shape (``None``: any keys and shapes); ``title``
    heads the list of problems. Where it gives a tensor, the given one must hold the same kind of
    number (floating point, integer, bool): an integer or bool tensor where a floating-point weight
    is expected (or the reverse) is refused rather than silently cast.

    With ``values=True``, ``given`` must first hold only what any checkpoint may hold: weight names
    as keys, non-empty real tensors, no NaN or inf, no value beyond float16's largest (65504).
    refcond checks every checkpoint file so when it reads it; a plugin that reads weights another
    way (a LoRA file through diffusers) checks them with this.
    """
    if values:
        check_tensors(given, title)
    if expected is None:
        return
    shapes = {key: tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value) for key, value in expected.items()}
    problems = []
    for key in sorted(set(shapes) - set(given)):
        problems.append(f"missing key {prefix}{key} (expected shape {shapes[key]})")
    for key in sorted(set(given) - set(shapes)):
        problems.append(f"unexpected key {prefix}{key} (shape {tuple(given[key].shape)})")
    for key in sorted(set(given) & set(shapes)):
        if tuple(given[key].shape) != shapes[key]:
            problems.append(f"key {prefix}{key}: expected shape {shapes[key]}, got {tuple(given[key].shape)}")
        elif isinstance(expected[key], torch.Tensor) and _number_kind(given[key].dtype) != _number_kind(expected[key].dtype):
            want, got = expected[key].dtype, given[key].dtype
            problems.append(
                f"key {prefix}{key}: expected {_number_kind(want)} values ({str(want).removeprefix('torch.')}), "
                f"got {_number_kind(got)} ({str(got).removeprefix('torch.')})"
            )
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise CheckpointError(f"{title}:\n  - " + "\n  - ".join(shown))


def _number_kind(dtype: torch.dtype) -> str:
    """``floating-point``, ``complex``, ``bool`` or ``integer``: what loading may not silently convert between."""
    if dtype.is_floating_point:
        return "floating-point"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"
