"""Building a composition: resolve names, merge checkpoint settings, validate, build, load weights."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refcond.checkpoints import import_checkpoint
from refcond.config import Composition, validate_config
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
from refcond.registry import Registry


@dataclass
class Built:
    """The components of a composition, built and loaded, in role order."""

    composition: Composition
    backbone: Backbone
    encoder: Encoder | None
    aggregator: Aggregator | None
    injectors: list[Injector]


def resolve_composition(composition: str | Path | Mapping[str, Any] | Composition, registry: Registry) -> Composition:
    """A composition from a registered recipe name, a ``.toml``/``.json`` file, a dict, or itself."""
    if isinstance(composition, Composition):
        return composition
    if isinstance(composition, Mapping):
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
) -> Built:
    """Build every component of a composition and load the checkpoint's weights into them.

    Precedence of settings: the recipe, then what the checkpoint implies, then ``overrides``.
    Every config is validated before any weight is read into a component.
    """
    registry = plugins.registry
    if composition is None and checkpoint is None:
        raise ConfigError("nothing to build: name a composition (e.g. 'ip-adapter') or pass a refcond checkpoint.")
    imported: ImportedCheckpoint | None = None
    if composition is None:  # a refcond checkpoint carries its own composition, backbone included
        imported = import_checkpoint(checkpoint, registry, None, allow_pickle=allow_pickle)  # type: ignore[arg-type]
        comp = Composition.parse(imported.composition, where=f"composition stored in {checkpoint}")
    else:
        comp = resolve_composition(composition, registry)

    backbone_spec = _backbone_spec(comp, overrides, pipeline, registry)
    pending_import = checkpoint is not None and imported is None
    if pending_import:
        # The file's settings are not known yet; names can still be checked before anything loads.
        for _, kind, spec in comp.with_overrides(overrides or {}).specs():
            registry.get(kind, spec.name)
    else:
        # Every name and config is checked before the backbone (which may load weights) is built.
        comp = _finalise(comp, overrides, backbone_spec)
        typed = comp.validate_components(registry)

    # The backbone comes next: foreign-format importers check shapes against its UNet.
    backbone_entry = registry.get("backbone", backbone_spec["name"])
    backbone_config = validate_config(backbone_entry.config, backbone_spec.get("config", {}), where=f"backbone {backbone_entry.name!r}")
    backbone: Backbone = backbone_entry.obj(backbone_config, BuildContext(extras={"pipeline": pipeline}))

    if pending_import:
        imported = import_checkpoint(checkpoint, registry, backbone, allow_pickle=allow_pickle)  # type: ignore[arg-type]
        comp = _finalise(comp.with_overrides(imported.composition), overrides, backbone_spec)
        typed = comp.validate_components(registry)

    context = BuildContext(backbone=backbone)
    if comp.encoder is not None and comp.aggregator is not None:
        context.encoder = registry.get("encoder", comp.encoder.name).obj(typed["encoder"], context)
        context.aggregator = registry.get("aggregator", comp.aggregator.name).obj(typed["aggregator"], context)
    injectors = [
        registry.get("injector", spec.name).obj(typed[f"injectors[{i}]"], context) for i, spec in enumerate(comp.injectors)
    ]
    built = Built(comp, backbone, context.encoder, context.aggregator, injectors)
    if imported is not None:
        load_weights(built, imported)
    for component in roles(built).values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # built for inference, as diffusers' and transformers' from_pretrained; training calls .train()
    return built


def _finalise(comp: Composition, overrides: Mapping[str, Any] | None, backbone_spec: dict[str, Any]) -> Composition:
    """Apply the caller's overrides, then pin the backbone that is actually used."""
    if overrides:
        comp = comp.with_overrides(overrides)
    return comp.model_copy(update={"backbone": None}).with_overrides({"backbone": backbone_spec})


def _backbone_spec(comp: Composition, overrides: Mapping[str, Any] | None, pipeline: Any, registry: Registry) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if comp.backbone is not None:
        spec = comp.backbone.model_dump()
    override = (overrides or {}).get("backbone")
    if isinstance(override, str):
        override = {"name": override}
    if override:
        spec = {**spec, **dict(override), "config": {**spec.get("config", {}), **dict(override).get("config", {})}}
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
    """Load role-namespaced weights, strictly: every key known, every shape right, nothing missing."""
    by_role: dict[str, dict[str, torch.Tensor]] = {}
    role_map = roles(built)
    for key, tensor in imported.state_dict.items():
        role, rest = _split_role(key, built)
        if role not in role_map:
            raise CheckpointError(f"key {key!r} belongs to role {role!r}, which this composition does not have. Roles: {', '.join(role_map)}.")
        by_role.setdefault(role, {})[rest] = tensor
    for role, component in role_map.items():
        expected = component.state_dict() if has_weights(component) else {}
        given = by_role.get(role, {})
        if not expected:
            if given:
                raise CheckpointError(f"{role} has no weights, but the checkpoint has {len(given)} keys for it, e.g. {role}.{next(iter(given))!r}.")
            continue
        if not given and role in imported.optional_roles:
            continue  # the file leaves this role's weights as built
        if not given:
            raise CheckpointError(f"the checkpoint has no weights for {role} ({type(component).__name__}); expected keys such as {role}.{next(iter(expected))}.")
        check_state_dict(expected, given, prefix=f"{role}.")
        component.load_state_dict(given, strict=True)


def has_weights(component: Any) -> bool:
    """Whether a component carries weights: it has ``state_dict()`` and ``load_state_dict(sd, strict=)``, as a torch module does."""
    return callable(getattr(component, "state_dict", None)) and callable(getattr(component, "load_state_dict", None))


def _split_role(key: str, built: Built) -> tuple[str, str]:
    head, _, rest = key.partition(".")
    if head != "injector":
        return head, rest
    index, _, rest = rest.partition(".")
    if not index.isdigit():  # an importer may address an injector by its component name
        names = [spec.name for spec in built.composition.injectors]
        if index not in names:
            raise CheckpointError(f"key {key!r} is for injector {index!r}, but the composition's injectors are {names}.")
        index = str(names.index(index))
    return f"injector.{index}", rest


def check_state_dict(
    expected: Mapping[str, torch.Tensor | tuple[int, ...]],
    given: Mapping[str, torch.Tensor],
    prefix: str = "",
    *,
    title: str = "checkpoint does not match the model",
) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected or wrongly shaped key.

    ``expected`` maps each key to a tensor or to its shape; ``title`` heads the list of problems.
    """
    shapes = {key: tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value) for key, value in expected.items()}
    problems = []
    for key in sorted(set(shapes) - set(given)):
        problems.append(f"missing key {prefix}{key} (expected shape {shapes[key]})")
    for key in sorted(set(given) - set(shapes)):
        problems.append(f"unexpected key {prefix}{key} (shape {tuple(given[key].shape)})")
    for key in sorted(set(given) & set(shapes)):
        if tuple(given[key].shape) != shapes[key]:
            problems.append(f"key {prefix}{key}: expected shape {shapes[key]}, got {tuple(given[key].shape)}")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise CheckpointError(f"{title}:\n  - " + "\n  - ".join(shown))
