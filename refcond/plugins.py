"""Loading plugins: entry points of the ``refcond`` group, isolated so one broken plugin harms no other.

Built-in components are ordinary plugins registered through the same entry-point group that a
third-party distribution uses. ``REFCOND_LOAD_PLUGINS`` (comma-separated entry-point or
distribution names; empty = none) selects which other plugins load — the core's own (the ``sd15``
and ``sdxl`` backbones, the generic aggregators, refcond's checkpoint format) always do — and
``REFCOND_TRACE_PLUGINS=1`` prints every hook call to stderr.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from refcond import hookspecs
from refcond.errors import DuplicateComponentError, PluginError
from refcond.registry import HOOK_KINDS, Entry, Provenance, Registry

ENTRY_POINT_GROUP = "refcond"
#: The distribution whose entry points always load: the core's own built-ins.
CORE_DISTRIBUTION = "refcond"


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
    #: Installed plugins left out by ``REFCOND_LOAD_PLUGINS`` (or ``allow``), and the setting that did it.
    skipped: list[str] = field(default_factory=list)
    allow: str | None = None
    _registry: Registry | None = None

    def register(self, plugin: Any, name: str | None = None, distribution: str | None = None, version: str | None = None) -> str:
        """Register a plugin object (a module or an object with ``@hookimpl`` methods).

        A hook implementation that matches no hook specification (a misspelt hook name) or takes
        arguments the specification lacks is a :class:`PluginError` naming the plugin; the plugin is
        then left unregistered.
        """
        label = name or getattr(plugin, "__name__", None) or repr(plugin)
        try:
            plugin_name = self.manager.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"plugin {label!r} cannot be registered: {exc}") from None
        if plugin_name is None:
            raise PluginError(f"plugin {label!r} is blocked; unblock it or register it under another name.")
        try:
            self._check_hook_names(plugin_name, plugin)
        except PluginError:
            self.manager.unregister(plugin)
            raise
        self.provenance[plugin_name] = Provenance(plugin_name, distribution, version)
        self._registry = None
        return plugin_name

    def _check_hook_names(self, plugin_name: str, plugin: Any) -> None:
        """``check_pending`` with a message that names the misspelt hook and suggests the right one."""
        try:
            self.manager.check_pending()
        except pluggy.PluginValidationError:
            known = sorted(HOOK_KINDS)
            unknown = sorted(
                hook_name
                for hook_name, caller in vars(self.manager.hook).items()
                if isinstance(caller, pluggy.HookCaller)
                and not caller.has_spec()
                and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
            )
            hints = "; ".join(f"{h!r}{_suggestion(h, known)}" for h in unknown)
            raise PluginError(
                f"plugin {plugin_name!r} implements an unknown hook: {hints}. "
                f"refcond's hooks are: {', '.join(known)}. Rename the function, or mark it "
                "@refcond.hookimpl(optionalhook=True) if it is meant for a newer refcond."
            ) from None

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
        if self.skipped:
            registry.unknown_hint = (
                f"REFCOND_LOAD_PLUGINS={self.allow!r} left out the installed plugin(s) {', '.join(sorted(self.skipped))}: "
                "add the one you need to it, or unset it to load every plugin."
            )
        failed: set[str] = set()
        every_plugin = self.manager.get_plugins()
        for hook_name, kind in HOOK_KINDS.items():
            # One call per plugin (as llm does for tools), so each entry knows who registered it.
            for impl in getattr(self.manager.hook, hook_name).get_hookimpls():  # registration order
                name = impl.plugin_name
                if name in failed:
                    continue
                prov = self.provenance.get(name, Provenance(name))
                added: list[Entry] = []
                only_this = self.manager.subset_hook_caller(hook_name, [p for p in every_plugin if p is not impl.plugin])
                try:
                    only_this(register=registry.register_callback(kind, prov, added))
                except DuplicateComponentError as exc:
                    if _plugin_of(exc.first) != _plugin_of(exc.second):
                        raise  # two plugins claim one name: which one is meant is the user's call
                    registry.remove(added)
                    failed.add(name)
                    self._fail(PluginFailure(name, "register", f"{hook_name}: {exc}", prov.distribution))
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
        if failure in self.failures:  # the registry is rebuilt after (un)registering a plugin
            return
        self.failures.append(failure)
        warnings.warn(f"refcond: {failure}", RuntimeWarning, stacklevel=3)


def new_plugin_manager() -> pluggy.PluginManager:
    """A pluggy manager with refcond's hook specifications and nothing registered.

    With ``REFCOND_TRACE_PLUGINS`` set (to anything but ``""`` or ``0``), every hook call is written
    to stderr with the plugins it reaches, and again when it returns or raises.
    """
    manager = pluggy.PluginManager("refcond")
    manager.add_hookspecs(hookspecs)
    if os.environ.get("REFCOND_TRACE_PLUGINS", "") not in ("", "0"):
        manager.add_hookcall_monitoring(_trace_before, _trace_after)
    return manager


def _trace_before(hook_name: str, impls: Any, kwargs: Any) -> None:
    # sys.stderr is looked up per call, so redirection (pytest's capsys, contextlib) is honoured.
    plugins = ", ".join(impl.plugin_name for impl in impls) or "no plugin"
    sys.stderr.write(f"refcond trace: {hook_name} -> {plugins}\n")


def _trace_after(outcome: Any, hook_name: str, impls: Any, kwargs: Any) -> None:
    plugins = ", ".join(impl.plugin_name for impl in impls) or "no plugin"
    if outcome.exception is not None:
        sys.stderr.write(f"refcond trace: {hook_name} <- {plugins} raised {type(outcome.exception).__name__}: {outcome.exception}\n")
    else:
        sys.stderr.write(f"refcond trace: {hook_name} <- {plugins} done\n")


def _suggestion(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _plugin_of(provenance: object) -> str | None:
    return getattr(provenance, "plugin", None)


def _normalize(name: str) -> str:
    """Distribution names compare as PEP 503 says: case-insensitive, ``-``, ``_`` and ``.`` alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def from_modules(*plugins: Any) -> Plugins:
    """Plugins from explicit objects (modules, classes or instances with ``@hookimpl`` methods)."""
    loaded = Plugins(new_plugin_manager())
    for plugin in plugins:
        loaded.register(plugin, name=getattr(plugin, "__name__", None) or type(plugin).__name__)
    return loaded


def load_plugins(allow: str | None = None) -> Plugins:
    """Load every plugin of the ``refcond`` entry-point group.

    :param allow: comma-separated entry-point or distribution names of the plugins to load besides
        the core's own, which always load; default ``$REFCOND_LOAD_PLUGINS``; unset loads all, an
        empty string loads only the core's.
    """
    if allow is None:
        allow = os.environ.get("REFCOND_LOAD_PLUGINS")
    allowed = None if allow is None else {_normalize(n.strip()) for n in allow.split(",") if n.strip()}
    loaded = Plugins(new_plugin_manager(), allow=allow)
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist else None
        version = ep.dist.version if ep.dist else None
        core = _normalize(dist or "") == CORE_DISTRIBUTION
        if allowed is not None and not core and _normalize(ep.name) not in allowed and _normalize(dist or "") not in allowed:
            loaded.skipped.append(ep.name)
            continue
        taken = loaded.provenance.get(ep.name)
        if taken is not None:
            if taken.distribution != dist:
                loaded._fail(
                    PluginFailure(ep.name, "import", f"the entry-point name is already used by {taken.distribution}; rename one of them", dist)
                )
            continue  # otherwise the same distribution seen twice on sys.path
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - report and keep the rest working
            loaded._fail(PluginFailure(ep.name, "import", f"{type(exc).__name__}: {exc}", dist))
            continue
        try:
            loaded.register(plugin, name=ep.name, distribution=dist, version=version)
        except PluginError as exc:  # e.g. a misspelt hook name caught by check_pending
            loaded._fail(PluginFailure(ep.name, "register", str(exc), dist))
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

