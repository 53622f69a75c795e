"""The registry: names, provenance, duplicate and unknown names, what register() accepts."""

from __future__ import annotations

import pytest

from refcond import DuplicateComponentError, EmptyConfig, UnknownComponentError
from refcond.registry import Entry, Provenance, Registry

FIRST = Provenance("refcond-aggregators", "refcond", "0.1.0")
SECOND = Provenance("my-plugin", "refcond-my-plugin", "2.0")


def mean_factory(config, context):
    """Average the references.

    More text that is not the summary.
    """


def filled() -> Registry:
    registry = Registry()
    register = registry.register_callback("aggregator", FIRST, [])
    register("mean", mean_factory, config=EmptyConfig)
    register("weighted-mean", mean_factory, description="Weighted average.")
    register("concat", mean_factory)
    return registry


def test_entries_know_who_registered_them():
    registry = filled()
    entry = registry.get("aggregator", "mean")
    assert entry.obj is mean_factory
    assert entry.config is EmptyConfig
    assert entry.provenance == FIRST
    assert str(entry.provenance) == "plugin 'refcond-aggregators' (refcond 0.1.0)"
    assert str(Provenance("inline")) == "plugin 'inline'"


def test_description_defaults_to_the_first_docstring_line():
    registry = filled()
    assert registry.get("aggregator", "mean").description == "Average the references."
    assert registry.get("aggregator", "weighted-mean").description == "Weighted average."


class ClassmethodFactory:
    """Not the factory's summary."""

    @classmethod
    def from_config(cls, config, context):
        """Build from a config (the summary a classmethod factory registers with)."""


def test_a_classmethod_factory_describes_itself_with_its_docstring():
    registry = Registry()
    registry.register_callback("aggregator", FIRST, [])("factory", ClassmethodFactory.from_config)
    assert registry.get("aggregator", "factory").description == "Build from a config (the summary a classmethod factory registers with)."


def test_names_entries_and_by_plugin_are_sorted():
    registry = filled()
    assert registry.names("aggregator") == ["concat", "mean", "weighted-mean"]
    assert registry.names("encoder") == []
    assert [e.name for e in registry.entries("aggregator")] == ["concat", "mean", "weighted-mean"]
    assert list(registry.by_plugin()) == ["refcond-aggregators"]


def test_a_duplicate_name_names_both_plugins_and_the_fix():
    registry = filled()
    with pytest.raises(DuplicateComponentError) as excinfo:
        registry.register_callback("aggregator", SECOND, [])("mean", mean_factory)
    error = excinfo.value
    assert str(error) == (
        "aggregator 'mean' is registered twice: by plugin 'refcond-aggregators' (refcond 0.1.0) and by "
        "plugin 'my-plugin' (refcond-my-plugin 2.0). Uninstall one of them, or restrict loading with "
        "REFCOND_LOAD_PLUGINS=name1,name2."
    )
    assert (error.kind, error.name, error.first, error.second) == ("aggregator", "mean", FIRST, SECOND)


def test_the_same_name_for_another_kind_is_fine():
    registry = filled()
    registry.register_callback("encoder", SECOND, [])("mean", mean_factory)
    assert registry.get("encoder", "mean").provenance == SECOND


def test_an_unknown_name_lists_the_available_ones_with_a_suggestion():
    with pytest.raises(UnknownComponentError) as excinfo:
        filled().get("aggregator", "maen")
    assert str(excinfo.value) == (
        "unknown aggregator 'maen'. Did you mean 'mean'? Available aggregators: 'concat', 'mean', 'weighted-mean'. "
        "Run `refcond plugins` to see which plugin provides each."
    )
    assert excinfo.value.available == ["concat", "mean", "weighted-mean"]
    assert isinstance(excinfo.value, KeyError)  # so `except KeyError` code keeps working


def test_an_unknown_name_of_an_empty_kind_says_none_are_available():
    with pytest.raises(UnknownComponentError, match=r"unknown checkpoint format 'kohya'\. Available checkpoint formats: none\."):
        Registry().get("checkpoint_format", "kohya")


@pytest.mark.parametrize(
    ("kind", "name", "obj", "kwargs", "message"),
    [
        ("encoder", "", mean_factory, {}, r"plugin 'my-plugin' .*: register\(\) needs a non-empty string name, got ''"),
        ("encoder", 3, mean_factory, {}, r"needs a non-empty string name, got 3"),
        ("encoder", "clip", mean_factory, {"config": dict}, r"config for encoder 'clip' must be a pydantic model class"),
        ("encoder", "clip", "not callable", {}, r"encoder 'clip' must be registered with a factory\(config, context\), got str"),
        ("checkpoint_format", "kohya", object(), {}, r"checkpoint format 'kohya' must have detect\(\) and convert\(\) methods"),
        ("composition", "recipe", ["clip"], {}, r"composition 'recipe' must be a refcond.Composition or a dict, got list"),
    ],
    ids=["empty-name", "non-string-name", "config-not-pydantic", "factory-not-callable", "format-without-methods", "composition-list"],
)
def test_register_rejects_what_could_only_fail_later(kind, name, obj, kwargs, message):
    added: list[Entry] = []
    with pytest.raises(TypeError, match=message):
        Registry().register_callback(kind, SECOND, added)(name, obj, **kwargs)
    assert added == []


def test_remove_only_removes_the_entries_given():
    registry = filled()
    mine: list[Entry] = []
    registry.register_callback("encoder", SECOND, mine)("clip", mean_factory)
    registry.remove(mine + [Entry("aggregator", "mean", mean_factory, None, SECOND)])  # not the registered one
    assert registry.names("encoder") == []
    assert registry.names("aggregator") == ["concat", "mean", "weighted-mean"]
