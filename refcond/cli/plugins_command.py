"""``refcond plugins``: which plugins are installed, what each registers, and which failed to load."""

from __future__ import annotations

import json
from typing import Any

import click

import refcond
from refcond.cli.app import state
from refcond.config import Composition
from refcond.errors import RefcondError
from refcond.plugins import Plugins
from refcond.registry import Entry


def describe_plugins(plugins: Plugins, schema: bool = False) -> dict[str, Any]:
    """The plugins as plain data (the ``--json`` output); keys are stable.

    ``{"refcond_version", "plugins": [{"name", "distribution", "version", "hooks", "failed",
    "components": [{"kind", "name", "description", "config"[, "config_schema"][, "composition"]}]}],
    "failures": [{"plugin", "distribution", "stage", "error"}]}``
    """
    by_plugin = plugins.registry.by_plugin()  # builds the registry, recording registration failures
    failed = {failure.plugin for failure in plugins.failures}
    listed = []
    for info in plugins.plugins():
        listed.append(
            {
                "name": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "hooks": list(info.hooks),
                "failed": info.name in failed,
                "components": [_describe_entry(entry, schema) for entry in by_plugin.get(info.name, [])],
            }
        )
    failures = [{"plugin": f.plugin, "distribution": f.distribution, "stage": f.stage, "error": f.error} for f in plugins.failures]
    return {"refcond_version": refcond.__version__, "plugins": listed, "failures": failures}


def _describe_entry(entry: Entry, schema: bool) -> dict[str, Any]:
    config = entry.config
    out: dict[str, Any] = {
        "kind": entry.kind,
        "name": entry.name,
        "description": entry.description,
        "config": f"{config.__module__}.{config.__qualname__}" if config is not None else None,
    }
    if schema:
        out["config_schema"] = config.model_json_schema() if config is not None else None
    if entry.kind == "composition":
        out["composition"] = _recipe(entry)
    return out


def _recipe(entry: Entry) -> dict[str, Any] | None:
    """A registered composition as a dict, or ``None`` if the plugin registered an invalid one."""
    obj = entry.obj
    try:
        comp = obj if isinstance(obj, Composition) else Composition.parse(obj, where=f"composition {entry.name!r}")
    except (RefcondError, TypeError, ValueError):
        return None
    return comp.model_dump(mode="json", exclude_none=True)


# -- human-readable output ------------------------------------------------------------------------


def render(data: dict[str, Any], schema: bool = False) -> str:
    """The text listing: one block per plugin, one line per component, failures last."""
    lines: list[str] = []
    components = [c for p in data["plugins"] for c in p["components"]]
    kind_w = max((len(c["kind"]) for c in components), default=0)
    name_w = max((len(c["name"]) for c in components), default=0)
    for plugin in data["plugins"]:
        origin = f"{plugin['distribution']} {plugin['version']}" if plugin["distribution"] else "not from a distribution"
        flag = "  [FAILED, see below]" if plugin["failed"] else ""
        lines.append(click.style(plugin["name"], bold=True) + f"  ({origin}){flag}")
        lines.append(f"  hooks: {', '.join(plugin['hooks']) or 'none'}")
        if not plugin["components"]:
            lines.append("  registers nothing")
        for comp in plugin["components"]:
            text = comp["description"]
            if comp["kind"] == "composition":
                text = f"{text} [{_summary(comp['composition'])}]".strip()
            lines.append(f"  {comp['kind']:<{kind_w}}  {comp['name']:<{name_w}}  {text}".rstrip())
            if schema and comp.get("config_schema"):
                lines.extend(" " * (kind_w + name_w + 6) + field for field in _fields(comp["config_schema"]))
        lines.append("")
    if data["failures"]:
        lines.append(click.style("Plugins that failed to load (skipped):", fg="red", bold=True))
        for f in data["failures"]:
            where = f" (from {f['distribution']})" if f["distribution"] else ""
            lines.append(f"  {f['plugin']}{where}: failed to {f['stage']}: {f['error']}")
        lines.append("")
    if not data["plugins"] and not data["failures"]:
        lines.append("No plugins loaded (is REFCOND_LOAD_PLUGINS set to an empty or wrong list?).")
    return "\n".join(lines).rstrip() + "\n"


def _summary(recipe: dict[str, Any] | None) -> str:
    if recipe is None:
        return "(invalid composition)"
    injectors = ", ".join(spec["name"] for spec in recipe.get("injectors", []))
    stages = [recipe[role]["name"] for role in ("encoder", "aggregator") if recipe.get(role)]
    return " -> ".join([*stages, injectors])


def _fields(schema: dict[str, Any]) -> list[str]:
    """``name: type = default  description`` for every field of a config's JSON schema."""
    props = schema.get("properties", {})
    if not props:
        return ["(no options)"]
    out = []
    for name, prop in props.items():
        default = f" = {json.dumps(prop['default'])}" if "default" in prop else " (required)"
        description = f"  {prop['description']}" if prop.get("description") else ""
        out.append(f"{name}: {_type_name(prop, schema)}{default}{description}")
    return out


def _type_name(prop: dict[str, Any], schema: dict[str, Any]) -> str:
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "enum" in prop:
        return "|".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " | ".join(_type_name(p, schema) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    if kind == "array" and "items" in prop:
        return f"list[{_type_name(prop['items'], schema)}]"
    return {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "None", "object": "dict"}.get(kind, str(kind))


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (stable keys) instead of a listing.")
@click.option("--schema", is_flag=True, help="Also show every component's configuration options (JSON Schema with --json).")
@click.pass_context
def plugins(ctx: click.Context, as_json: bool, schema: bool) -> None:
    """List installed plugins, the components each one registers, and plugins that failed to load.

    Every backbone, encoder, aggregator, injector, composition, checkpoint format and metric comes
    from a plugin of the "refcond" entry-point group, the built-in ones included. Set
    REFCOND_LOAD_PLUGINS=name1,name2 to load only some of them.

    \b
    Examples:
      refcond plugins
      refcond plugins --schema                    # with each component's options
      refcond plugins --json | jq '.plugins[].name'
      REFCOND_LOAD_PLUGINS=refcond-aggregators refcond plugins
    """
    data = describe_plugins(state(ctx).get_plugins(), schema=schema)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(render(data, schema=schema), nl=False)


__all__ = ["describe_plugins", "plugins", "render"]
