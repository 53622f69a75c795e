"""Loading plugins: entry points, provenance, isolation of broken plugins, allow-list, tracing."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import refcond
from refcond import (
    DuplicateComponentError,
    PluginError,
    UnknownComponentError,
    aggregators,
)
from refcond.plugins import PluginFailure, get_plugins, load_plugins, set_plugins
from refcond.registry import Provenance

BUILT_INS = {
    "refcond-backbones": "refcond",
    "refcond-aggregators": "refcond",
    "refcond-checkpoint": "refcond",
    "refcond-encoders": "refcond-encoders",
    "refcond-injectors": "refcond-injectors",
    "refcond-example": "refcond-example",
}


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """Each test decides for itself whether loading is restricted or traced."""
    monkeypatch.delenv("REFCOND_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("REFCOND_TRACE_PLUGINS", raising=False)


MakeDistribution = Callable[..., None]


@pytest.fixture
def install(tmp_path: Path, monkeypatch) -> Iterator[MakeDistribution]:
    """Install a one-module distribution into ``tmp_path`` the way pip lays it out.

    ``install(dist, module, source, entry_point=dist)`` writes ``<dist>-0.1.dist-info/`` with
    METADATA and an ``entry_points.txt`` declaring ``[refcond] <entry_point> = <module>``, plus
    ``<module>.py``; ``tmp_path`` is on ``sys.path``, so ``importlib.metadata`` finds it.
    """
    modules: list[str] = []

    def make(dist: str, module: str, source: str, entry_point: str | None = None) -> None:
        info = tmp_path / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[refcond]\n{entry_point or dist} = {module}\n")
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        modules.append(module)
        importlib.invalidate_caches()

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for module in modules:
        sys.modules.pop(module, None)


RAISES_ON_IMPORT = """
    raise ImportError("refcond-fake needs a GPU library that is not installed")
"""

GOOD_PLUGIN = """
    import refcond

    @refcond.hookimpl
    def refcond_register_aggregators(register):
        register("fancy-mean", lambda config, context: None, description="A fancy mean.")
"""

MISSPELT_HOOK = """
    import refcond

    @refcond.hookimpl
    def refcond_register_encoder(register):
        register("typo-encoder", lambda config, context: None)
"""


# -- the built-in plugins ----------------------------------------------------------------------


def test_built_in_plugins_load_through_the_entry_point_group_with_provenance():
    plugins = load_plugins()
    loaded = {info.name: info for info in plugins.plugins()}
    for name, dist in BUILT_INS.items():
        assert loaded[name].distribution == dist
        assert loaded[name].version == importlib.metadata.version(dist)
    assert loaded["refcond-aggregators"].hooks == ("refcond_register_aggregators",)
    assert plugins.failures == []

    registry = plugins.registry
    assert registry.get("aggregator", "mean").provenance == Provenance("refcond-aggregators", "refcond", refcond.__version__)
    assert registry.get("backbone", "sdxl").provenance.plugin == "refcond-backbones"
    assert registry.get("checkpoint_format", "refcond").provenance.plugin == "refcond-checkpoint"
    assert registry.get("encoder", "clip").provenance.distribution == "refcond-encoders"


def test_an_unknown_component_name_suggests_the_close_one():
    with pytest.raises(UnknownComponentError) as excinfo:
        load_plugins().registry.get("encoder", "clp")
    assert "unknown encoder 'clp'. Did you mean 'clip'?" in str(excinfo.value)
    assert "'clip'" in str(excinfo.value).split("Available encoders:")[1]


# -- broken plugins are reported by name and skipped ------------------------------------------


def test_a_plugin_that_raises_on_import_is_reported_and_skipped(install):
    install("refcond-fake", "refcond_fake_broken", RAISES_ON_IMPORT)
    with pytest.warns(RuntimeWarning, match=r"plugin 'refcond-fake' \(from refcond-fake\) failed to import and was skipped"):
        plugins = load_plugins()
    assert plugins.failures == [
        PluginFailure(
            plugin="refcond-fake",
            stage="import",
            error="ImportError: refcond-fake needs a GPU library that is not installed",
            distribution="refcond-fake",
        )
    ]
    assert "refcond-fake" not in [info.name for info in plugins.plugins()]
    # the rest keep working
    assert {"mean", "concat"} <= set(plugins.registry.names("aggregator"))
    assert "clip" in plugins.registry.names("encoder")


def test_a_third_party_plugin_loads_with_its_distribution(install):
    install("refcond-fancy", "refcond_fancy_good", GOOD_PLUGIN, entry_point="fancy")
    entry = load_plugins().registry.get("aggregator", "fancy-mean")
    assert entry.provenance == Provenance("fancy", "refcond-fancy", "0.1")
    assert entry.description == "A fancy mean."


def test_two_distributions_with_one_entry_point_name_are_reported(install):
    install("refcond-fancy", "refcond_fancy_one", GOOD_PLUGIN, entry_point="fancy")
    install("refcond-fancy-fork", "refcond_fancy_two", GOOD_PLUGIN, entry_point="fancy")
    with pytest.warns(RuntimeWarning, match="the entry-point name is already used by"):
        plugins = load_plugins()
    [failure] = plugins.failures
    assert {failure.distribution, failure.error.split("already used by ")[1].split(";")[0]} == {"refcond-fancy", "refcond-fancy-fork"}
    assert plugins.registry.get("aggregator", "fancy-mean").provenance.plugin == "fancy"


class HalfWay:
    """Registers a backbone, then an encoder, then fails: none of it may stay registered."""

    __name__ = "half-way"

    @refcond.hookimpl
    def refcond_register_backbones(self, register):
        register("half-backbone", lambda config, context: None)

    @refcond.hookimpl
    def refcond_register_encoders(self, register):
        register("half-encoder", lambda config, context: None)
        raise RuntimeError("weights file missing")


def test_a_plugin_whose_registration_raises_half_way_is_skipped_as_a_whole():
    plugins = refcond.from_modules(aggregators, HalfWay())
    with pytest.warns(RuntimeWarning, match=r"plugin 'half-way' failed to register and was skipped"):
        registry = plugins.registry
    assert plugins.failures == [
        PluginFailure("half-way", "register", "refcond_register_encoders: RuntimeError: weights file missing")
    ]
    assert registry.names("backbone") == []
    assert registry.names("encoder") == []
    assert registry.names("aggregator") == ["concat", "learned-queries", "mean", "weighted-mean"]


def test_a_plugin_that_registers_one_name_twice_is_skipped():
    class Twice:
        __name__ = "twice"

        @refcond.hookimpl
        def refcond_register_encoders(self, register):
            register("dup", lambda config, context: None)
            register("dup", lambda config, context: None)

    plugins = refcond.from_modules(aggregators, Twice())
    with pytest.warns(RuntimeWarning, match=r"encoder 'dup' is registered twice: by plugin 'twice' and by plugin 'twice'"):
        assert plugins.registry.names("encoder") == []
    assert plugins.registry.names("aggregator") == ["concat", "learned-queries", "mean", "weighted-mean"]


def test_a_misspelt_hook_name_is_caught_and_named():
    class Typo:
        __name__ = "typo"

        @refcond.hookimpl
        def refcond_register_encoder(self, register):
            register("typo-encoder", lambda config, context: None)

    plugins = refcond.from_modules(aggregators)
    with pytest.raises(PluginError) as excinfo:
        plugins.register(Typo(), name="typo")
    message = str(excinfo.value)
    assert "plugin 'typo' implements an unknown hook: 'refcond_register_encoder' (did you mean 'refcond_register_encoders'?)" in message
    assert "Rename the function" in message
    assert "typo" not in [info.name for info in plugins.plugins()]  # left unregistered
    assert plugins.registry.names("aggregator") == ["concat", "learned-queries", "mean", "weighted-mean"]


def test_a_misspelt_hook_in_an_installed_plugin_is_reported_and_skipped(install):
    install("refcond-typo", "refcond_typo_hook", MISSPELT_HOOK)
    with pytest.warns(RuntimeWarning, match=r"'refcond_register_encoder' \(did you mean 'refcond_register_encoders'\?\)"):
        plugins = load_plugins()
    [failure] = plugins.failures
    assert (failure.plugin, failure.stage, failure.distribution) == ("refcond-typo", "register", "refcond-typo")
    assert "refcond-typo" not in [info.name for info in plugins.plugins()]
    assert "clip" in plugins.registry.names("encoder")


def test_a_hook_implementation_with_an_argument_the_spec_lacks_is_refused():
    class ExtraArgument:
        __name__ = "extra-argument"

        @refcond.hookimpl
        def refcond_register_encoders(self, register, device):
            pass

    with pytest.raises(PluginError) as excinfo:
        refcond.from_modules(ExtraArgument())
    assert "plugin 'extra-argument' cannot be registered" in str(excinfo.value)
    assert "Argument(s) {'device'} are declared in the hookimpl but can not be found in the hookspec" in str(excinfo.value)


def test_a_hook_implementation_may_take_fewer_arguments_than_the_spec():
    calls = []

    class NoArguments:
        __name__ = "no-arguments"

        @refcond.hookimpl
        def refcond_register_metrics(self):
            calls.append("called")

    plugins = refcond.from_modules(NoArguments())
    assert plugins.registry.names("metric") == []
    assert calls == ["called"] and plugins.failures == []


# -- two plugins, one name ----------------------------------------------------------------------


def test_two_plugins_registering_one_name_is_an_error_naming_both():
    class AnotherMean:
        __name__ = "another-mean"

        @refcond.hookimpl
        def refcond_register_aggregators(self, register):
            register("mean", lambda config, context: None)

    plugins = refcond.from_modules(aggregators, AnotherMean())
    with pytest.raises(DuplicateComponentError) as excinfo:
        plugins.registry  # noqa: B018 - building the registry is what fails
    assert str(excinfo.value).startswith(
        "aggregator 'mean' is registered twice: by plugin 'refcond.aggregators' and by plugin 'another-mean'. "
        "Uninstall one of them, or restrict loading with REFCOND_LOAD_PLUGINS="
    )
    plugins.unregister("another-mean")
    assert plugins.registry.get("aggregator", "mean").provenance.plugin == "refcond.aggregators"


# -- REFCOND_LOAD_PLUGINS ----------------------------------------------------------------------


CORE = ["refcond-aggregators", "refcond-backbones", "refcond-checkpoint"]  # the core distribution's entry points


def test_the_core_built_ins_always_load(monkeypatch):
    monkeypatch.setenv("REFCOND_LOAD_PLUGINS", "refcond-encoders")
    plugins = load_plugins()
    assert [info.name for info in plugins.plugins()] == sorted(CORE + ["refcond-encoders"])
    assert plugins.registry.names("backbone") == ["sd15", "sdxl"]


def test_load_plugins_allow_list_by_distribution_name(monkeypatch):
    monkeypatch.setenv("REFCOND_LOAD_PLUGINS", "refcond")  # the core distribution alone
    assert [info.name for info in load_plugins().plugins()] == CORE
    monkeypatch.setenv("REFCOND_LOAD_PLUGINS", "Refcond_Encoders")  # compared as pip compares names
    assert [info.name for info in load_plugins().plugins()] == sorted(CORE + ["refcond-encoders"])


def test_load_plugins_allow_list_for_a_third_party_plugin(install):
    install("refcond-fancy", "refcond_fancy_allowed", GOOD_PLUGIN, entry_point="fancy")
    install("refcond-fake", "refcond_fake_not_allowed", RAISES_ON_IMPORT)
    for allow in ("fancy", "refcond-fancy"):
        plugins = load_plugins(allow=allow)
        assert [info.name for info in plugins.plugins()] == sorted(CORE + ["fancy"])
        assert plugins.failures == []  # the broken plugin was not even imported


def test_an_empty_allow_list_loads_only_the_core(monkeypatch, install):
    install("refcond-fake", "refcond_fake_empty_list", RAISES_ON_IMPORT)
    monkeypatch.setenv("REFCOND_LOAD_PLUGINS", "")
    plugins = load_plugins()
    assert [info.name for info in plugins.plugins()] == CORE and plugins.failures == []
    assert {entry.kind for entry in plugins.registry.entries()} == {"backbone", "aggregator", "checkpoint_format"}


def test_an_unknown_name_says_which_plugins_the_variable_left_out(monkeypatch):
    monkeypatch.setenv("REFCOND_LOAD_PLUGINS", "refcond-encoders")
    plugins = load_plugins()
    with pytest.raises(refcond.UnknownComponentError, match=r"REFCOND_LOAD_PLUGINS='refcond-encoders' left out the installed plugin\(s\) .*refcond-injectors"):
        plugins.registry.get("injector", "cross-attention")
    monkeypatch.delenv("REFCOND_LOAD_PLUGINS")
    with pytest.raises(refcond.UnknownComponentError) as excinfo:
        load_plugins().registry.get("injector", "no-such-injector")
    assert "REFCOND_LOAD_PLUGINS" not in str(excinfo.value)  # nothing was left out: no hint


def test_the_allow_argument_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("REFCOND_LOAD_PLUGINS", "")
    assert [info.name for info in load_plugins(allow="refcond-encoders").plugins()] == sorted(CORE + ["refcond-encoders"])


# -- inline plugins (tests, notebooks) ----------------------------------------------------------


class HelloPlugin:
    """An inline plugin as llm's and pluggy's tests write them: a class with hookimpl methods."""

    __name__ = "hello"

    @refcond.hookimpl
    def refcond_register_aggregators(self, register):
        register("hello", lambda config, context: "hello aggregator")

    @refcond.hookimpl
    def refcond_register_compositions(self, register):
        register("hello-recipe", {"encoder": "clip", "aggregator": "hello", "injectors": ["cross-attention"]})


def test_from_modules_with_an_inline_plugin():
    plugins = refcond.from_modules(aggregators, HelloPlugin())
    assert [(i.name, i.hooks) for i in plugins.plugins()] == [
        ("hello", ("refcond_register_aggregators", "refcond_register_compositions")),
        ("refcond.aggregators", ("refcond_register_aggregators",)),
    ]
    entry = plugins.registry.get("aggregator", "hello")
    assert entry.obj(None, None) == "hello aggregator"
    assert entry.provenance == Provenance("hello")
    assert plugins.registry.names("composition") == ["hello-recipe"]


def test_registering_and_unregistering_for_the_duration_of_a_test():
    plugins = refcond.from_modules(aggregators)
    name = plugins.register(HelloPlugin(), name="undo-hello")
    try:
        assert plugins.registry.get("aggregator", "hello").provenance.plugin == "undo-hello"
    finally:
        plugins.unregister(name)
    assert plugins.registry.names("aggregator") == ["concat", "learned-queries", "mean", "weighted-mean"]


def test_a_plugin_object_cannot_be_registered_twice():
    plugin = HelloPlugin()
    plugins = refcond.from_modules(plugin)
    with pytest.raises(PluginError, match="plugin 'again' cannot be registered"):
        plugins.register(plugin, name="again")


def test_get_plugins_is_the_process_wide_default_and_can_be_replaced():
    mine = refcond.from_modules(aggregators)
    previous = set_plugins(mine)
    try:
        assert get_plugins() is mine
    finally:
        set_plugins(previous)


# -- REFCOND_TRACE_PLUGINS ---------------------------------------------------------------------


def test_trace_plugins_writes_every_hook_call_to_stderr(monkeypatch, capsys):
    monkeypatch.setenv("REFCOND_TRACE_PLUGINS", "1")
    refcond.from_modules(aggregators, HelloPlugin()).registry  # noqa: B018
    err = capsys.readouterr().err.splitlines()
    assert "refcond trace: refcond_register_aggregators -> refcond.aggregators" in err
    assert "refcond trace: refcond_register_aggregators -> hello" in err
    assert "refcond trace: refcond_register_compositions <- hello done" in err


def test_trace_plugins_reports_a_hook_that_raised(monkeypatch, capsys):
    monkeypatch.setenv("REFCOND_TRACE_PLUGINS", "1")
    with pytest.warns(RuntimeWarning):
        refcond.from_modules(HalfWay()).registry  # noqa: B018
    assert "refcond trace: refcond_register_encoders <- half-way raised RuntimeError: weights file missing" in capsys.readouterr().err


def test_no_trace_without_the_variable(capsys):
    refcond.from_modules(aggregators).registry  # noqa: B018
    assert capsys.readouterr().err == ""
