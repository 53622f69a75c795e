"""Loading plugins: entry points of the ``refcond`` group, isolated so one broken plugin harms no other.

Built-in components are ordinary plugins registered through the same entry-point group that a
third-party distribution uses. ``REFCOND_LOAD_PLUGINS`` (comma-separated entry-point or
distribution names; empty = none) restricts which ones load, and ``REFCOND_TRACE_PLUGINS=1`` prints
every hook call to stderr.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from refcond import hookspecs
from refcond.errors import PluginError
from refcond.registry import HOOK_KINDS, Entry, Provenance, Registry

ENTRY_POINT_GROUP = "refcond"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that raised while importing or registering, and was skipped."""

    plugin: str
    stage: str  # "import" or "register"
    error: str
    distribution: str | None = None

    def __str__(self) -> str:
        where = f" (from {self.distribution})" if self.distribution else ""
        return f"plugin {self.plugin!r}{where} failed to {self.stage} and was skipped: {self.error}"


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its name, distribution, and the hooks it implements."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]


@dataclass
class Plugins:
    """A plugin manager together with the registry built from it.

    Build one with :func:`load_plugins` (entry points) or :func:`from_modules` (explicit plugin
    objects, as tests and notebooks do). ``failures`` lists plugins that were skipped.
    """

    manager: pluggy.PluginManager
    provenance: dict[str, Provenance] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)
    _registry: Registry | None = None

    def register(self, plugin: Any, name: str | None = None, distribution: str | None = None, version: str | None = None) -> str:
        """Register a plugin object (a module or an object with ``@hookimpl`` methods)."""
        plugin_name = self.manager.register(plugin, name=name)
        if plugin_name is None:
            raise PluginError(f"plugin {name or plugin!r} is blocked or already registered")
        self.manager.check_pending()
        self.provenance[plugin_name] = Provenance(plugin_name, distribution, version)
        self._registry = None
        return plugin_name

    def unregister(self, name: str) -> None:
        """Remove a plugin by name; its components disappear from the registry."""
        self.manager.unregister(name=name)
        self.provenance.pop(name, None)
        self._registry = None

    @property
    def registry(self) -> Registry:
        """The registry, built on first use by calling every plugin's registration hooks."""
        if self._registry is None:
            self._registry = self._build_registry()
        return self._registry

    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin with the hooks it implements, by name."""
        infos = []
        for name, plugin in sorted(self.manager.list_name_plugin()):
            hooks = tuple(sorted(caller.name for caller in self.manager.get_hookcallers(plugin) or []))
            prov = self.provenance.get(name, Provenance(name))
            infos.append(PluginInfo(name, prov.distribution, prov.version, hooks))
        return infos

    def _build_registry(self) -> Registry:
        registry = Registry()
        failed: set[str] = set()
        for hook_name, kind in HOOK_KINDS.items():
            caller = getattr(self.manager.hook, hook_name)
            for impl in reversed(caller.get_hookimpls()):  # registration order
                name = impl.plugin_name
                if name in failed:
                    continue
                prov = self.provenance.get(name, Provenance(name))
                added: list[Entry] = []
                try:
                    impl.function(register=registry.register_callback(kind, prov, added))
                except Exception as exc:  # noqa: BLE001 - one plugin's bug must not break the others
                    registry.remove(added)
                    failed.add(name)
                    self._fail(PluginFailure(name, "register", f"{hook_name}: {type(exc).__name__}: {exc}", prov.distribution))
        # A plugin that failed part way is skipped as a whole.
        for entry in list(registry.entries()):
            if entry.provenance.plugin in failed:
                registry.remove([entry])
        return registry

    def _fail(self, failure: PluginFailure) -> None:
        self.failures.append(failure)
        warnings.warn(f"refcond: {failure}", RuntimeWarning, stacklevel=3)


def new_plugin_manager() -> pluggy.PluginManager:
    """A pluggy manager with refcond's hook specifications and nothing registered."""
    manager = pluggy.PluginManager("refcond")
    manager.add_hookspecs(hookspecs)
    if os.environ.get("REFCOND_TRACE_PLUGINS"):
        manager.trace.root.setwriter(sys.stderr.write)
        manager.enable_tracing()
    return manager


def from_modules(*plugins: Any) -> Plugins:
    """Plugins from explicit objects (modules, classes or instances with ``@hookimpl`` methods)."""
    loaded = Plugins(new_plugin_manager())
    for plugin in plugins:
        loaded.register(plugin, name=getattr(plugin, "__name__", None) or type(plugin).__name__)
    return loaded


def load_plugins(allow: str | None = None) -> Plugins:
    """Load every plugin of the ``refcond`` entry-point group.

    :param allow: comma-separated entry-point or distribution names to load; default
        ``$REFCOND_LOAD_PLUGINS``; unset loads all, an empty string loads none.
    """
    if allow is None:
        allow = os.environ.get("REFCOND_LOAD_PLUGINS")
    allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
    loaded = Plugins(new_plugin_manager())
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist else None
        version = ep.dist.version if ep.dist else None
        if allowed is not None and ep.name not in allowed and dist not in allowed:
            continue
        if ep.name in loaded.provenance:
            continue  # the same distribution seen twice on sys.path
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - report and keep the rest working
            loaded._fail(PluginFailure(ep.name, "import", f"{type(exc).__name__}: {exc}", dist))
            continue
        try:
            loaded.register(plugin, name=ep.name, distribution=dist, version=version)
        except Exception as exc:  # noqa: BLE001 - e.g. a misspelt hook name caught by check_pending
            if loaded.manager.is_registered(plugin):
                loaded.manager.unregister(plugin)
            loaded._fail(PluginFailure(ep.name, "register", f"{type(exc).__name__}: {exc}", dist))
    return loaded


_default: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugins, loaded from entry points on first use."""
    global _default
    if _default is None:
        _default = load_plugins()
    return _default


def set_plugins(plugins: Plugins | None) -> Plugins | None:
    """Replace the process-wide plugins (``None`` reloads on next use); returns the previous ones."""
    global _default
    previous, _default = _default, plugins
    return previous

