"""Compositions: from dicts and files, overrides, and validation of every config before anything is built."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
import torch
from pydantic import Field

import refcond
from refcond import (
    ComponentConfig,
    ComponentSpec,
    Composition,
    ConfigError,
    ImportedCheckpoint,
    UnknownComponentError,
)
from refcond.building import build

RECIPE = {
    "encoder": {"name": "pixels", "config": {"output": "pooled"}},
    "aggregator": "mean",
    "injectors": ["attention", {"name": "lora", "config": {"rank": 4}}],
}

RECIPE_TOML = """
aggregator = "mean"
injectors = ["attention", { name = "lora", config = { rank = 4 } }]

[encoder]
name = "pixels"
config = { output = "pooled" }
"""


# -- loading -----------------------------------------------------------------------------------


def test_a_composition_from_a_dict_with_bare_names():
    comp = Composition.parse(RECIPE)
    assert comp.encoder.name == "pixels" and comp.encoder.config == {"output": "pooled"}
    assert comp.aggregator.name == "mean" and comp.aggregator.config == {}
    assert [(s.name, s.config) for s in comp.injectors] == [("attention", {}), ("lora", {"rank": 4})]
    assert comp.backbone is None  # inferred from the pipeline at build time


def test_a_single_injector_may_be_written_without_a_list():
    assert [s.name for s in Composition.parse({**RECIPE, "injectors": "attention"}).injectors] == ["attention"]


def test_a_composition_from_toml_and_json_files(tmp_path):
    (tmp_path / "recipe.toml").write_text(RECIPE_TOML)
    (tmp_path / "recipe.json").write_text(json.dumps(RECIPE))
    expected = Composition.parse(RECIPE)
    assert Composition.from_file(tmp_path / "recipe.toml") == expected
    assert Composition.from_file(str(tmp_path / "recipe.json")) == expected


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('aggregator = "mean\n')
    with pytest.raises(ConfigError, match=rf"^{path}: not valid TOML: "):
        Composition.from_file(path)


def test_invalid_json_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"aggregator": "mean",\n "encoder": }')
    with pytest.raises(ConfigError, match=rf"^{path}: not valid JSON: Expecting value: line 2 column 13"):
        Composition.from_file(path)


def test_missing_unreadable_and_misnamed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read composition file '.*nope\.toml': No such file or directory"):
        Composition.from_file(tmp_path / "nope.toml")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"composition file '.*binary\.json' is not UTF-8 text"):
        Composition.from_file(tmp_path / "binary.json")
    with pytest.raises(ConfigError, match=r"composition file '.*recipe\.yaml' must end in \.toml or \.json, not '\.yaml'"):
        Composition.from_file(tmp_path / "recipe.yaml")


def test_a_misspelt_role_in_a_file_names_the_file_and_the_right_role(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text(RECIPE_TOML.replace('aggregator = "mean"', 'agregator = "mean"'))
    with pytest.raises(ConfigError) as excinfo:
        Composition.from_file(path)
    assert str(excinfo.value).splitlines() == [
        f"invalid configuration for {path}:",
        "  - unknown field 'agregator'. Did you mean 'aggregator'? Valid fields: name, backbone, encoder, aggregator, injectors.",
    ]


def test_encoder_and_aggregator_come_as_a_pair_or_not_at_all():
    assert Composition.parse({"injectors": ["lora"]}).encoder is None  # injectors that read no condition
    with pytest.raises(ConfigError, match=r"has an encoder but no aggregator: set both .* or neither"):
        Composition.parse({"encoder": "clip", "injectors": ["cross-attention"]})
    removed = Composition.parse(RECIPE).with_overrides({"encoder": None, "aggregator": None})
    assert (removed.encoder, removed.aggregator) == (None, None)


def test_a_misspelt_key_inside_a_role_lists_that_roles_fields():
    with pytest.raises(ConfigError, match=r"unknown field 'injectors\.1\.confg'\. Did you mean 'config'\? Valid fields: name, config\."):
        Composition.parse({**RECIPE, "injectors": ["attention", {"name": "lora", "confg": {}}]})


def test_no_injector_is_an_error():
    with pytest.raises(ConfigError, match=r"injectors: List should have at least 1 item"):
        Composition.parse({**RECIPE, "injectors": []})


# -- overrides ---------------------------------------------------------------------------------


def test_an_override_with_the_same_name_merges_the_config():
    comp = Composition.parse(RECIPE).with_overrides({"encoder": {"config": {"size": 2}}, "injectors": {"lora": {"name": "lora", "config": {"alpha": 8}}}})
    assert comp.encoder.config == {"output": "pooled", "size": 2}
    assert comp.injectors[1].config == {"rank": 4, "alpha": 8}


def test_an_override_merges_nested_fields_level_by_level():
    comp = Composition.parse({"encoder": "clip", "aggregator": "mean", "injectors": [{"name": "lora", "config": {"layers": {"rank": 128, "scale": 0.5}}}]})
    merged = comp.with_overrides({"injectors": {"lora": {"config": {"layers": {"rank": 4}}}}})
    assert merged.injectors[0].config == {"layers": {"rank": 4, "scale": 0.5}}  # scale kept
    replaced = comp.with_overrides({"injectors": {"lora": {"config": {"layers": None}}}})
    assert replaced.injectors[0].config == {"layers": None}  # a non-dict value replaces the whole field


def test_an_override_naming_another_component_replaces_the_role():
    comp = Composition.parse(RECIPE).with_overrides({"encoder": {"name": "siglip", "config": {"size": 2}}, "aggregator": "concat"})
    assert (comp.encoder.name, comp.encoder.config) == ("siglip", {"size": 2})  # the old config is dropped
    assert (comp.aggregator.name, comp.aggregator.config) == ("concat", {})


def test_injectors_are_overridden_by_index_or_by_name():
    base = Composition.parse(RECIPE)
    by_index = base.with_overrides({"injectors": {0: {"config": {"scale": 0.5}}, "1": {"config": {"rank": 8}}}})
    assert [s.config for s in by_index.injectors] == [{"scale": 0.5}, {"rank": 8}]
    by_name = base.with_overrides({"injectors": {"lora": {"config": {"rank": 16}}}})
    assert by_name.injectors[1].config == {"rank": 16}
    replaced = base.with_overrides({"injectors": ["attention"]})
    assert [s.name for s in replaced.injectors] == ["attention"]
    assert [s.name for s in base.injectors] == ["attention", "lora"]  # the original is unchanged


def test_a_component_spec_object_is_an_override_too():
    comp = Composition.parse(RECIPE).with_overrides({"injectors": {"lora": ComponentSpec(name="lora", config={"rank": 32})}})
    assert comp.injectors[1].config == {"rank": 32}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"agregator": "concat"}, r"unknown composition role 'agregator'\. Did you mean 'aggregator'\? Roles: backbone, encoder, aggregator, injectors\."),
        ({"injectors": {5: {"config": {}}}}, r"injectors\[5\] does not exist: the composition has 2 injector\(s\): \['attention', 'lora'\]"),
        ({"injectors": {"lroa": {"config": {}}}}, r"the composition has no injector 'lroa'\. Did you mean 'lora'\? Its injectors: \['attention', 'lora'\]"),
    ],
    ids=["role", "index", "name"],
)
def test_bad_overrides(overrides: dict[str, Any], message: str):
    with pytest.raises(ConfigError, match=message):
        Composition.parse(RECIPE).with_overrides(overrides)


# -- validation against the registered config models, before anything is built -----------------


class PixelsConfig(ComponentConfig):
    output: Literal["pooled", "tokens"] = Field(default="pooled", description="What to emit per reference.")
    size: int = Field(default=4, description="Side of the downsampled image.")


class RankConfig(ComponentConfig):
    rank: int = 4
    alpha: float | None = None


class SizeConfig(ComponentConfig):
    size: int = 2


class Recorder:
    """A plugin whose factories record each call (and what was built before them)."""

    __name__ = "recorder"

    def __init__(self):
        self.calls: list[tuple[str, Any]] = []

    def factory(self, role: str):
        def make(config, context):
            self.calls.append((role, config))
            return torch.nn.Linear(config.size, config.size) if role == "aggregator" else object()

        return make

    @refcond.hookimpl
    def refcond_register_backbones(self, register):
        register("toy", self.factory("backbone"))

    @refcond.hookimpl
    def refcond_register_encoders(self, register):
        register("pixels", self.factory("encoder"), config=PixelsConfig)

    @refcond.hookimpl
    def refcond_register_aggregators(self, register):
        register("mean", self.factory("aggregator"), config=SizeConfig)

    @refcond.hookimpl
    def refcond_register_injectors(self, register):
        register("attention", self.factory("injector"))
        register("lora", self.factory("injector"), config=RankConfig)

    @refcond.hookimpl
    def refcond_register_checkpoint_formats(self, register):
        register("sized", SizedFormat())


class SizedFormat:
    """State dicts with ``w``: the aggregator's weight, whose size the file implies."""

    def detect(self, state_dict, metadata):
        return "w" in state_dict

    def convert(self, state_dict, metadata, backbone):
        size = state_dict["w"].shape[0]
        return ImportedCheckpoint(
            {"aggregator": {"config": {"size": size}}},
            {"aggregator.weight": state_dict["w"], "aggregator.bias": torch.zeros(size)},
        )


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def test_a_misspelt_component_field_names_role_component_plugin_and_valid_fields(recorder):
    recipe = {**RECIPE, "encoder": {"name": "pixels", "config": {"outptu": "tokens"}}}
    with pytest.raises(ConfigError) as excinfo:
        build(recipe, refcond.from_modules(recorder), overrides={"backbone": "toy"})
    assert str(excinfo.value).splitlines() == [
        "invalid configuration for encoder 'pixels' (plugin 'recorder'):",
        "  - unknown field 'outptu'. Did you mean 'output'? Valid fields: output, size.",
    ]
    assert recorder.calls == []  # nothing was built, no weights were loaded


def test_a_wrong_value_is_reported_with_what_was_given(recorder):
    with pytest.raises(ConfigError) as excinfo:
        build(RECIPE, refcond.from_modules(recorder), overrides={"backbone": "toy", "injectors": {"lora": {"config": {"rank": "four"}}}})
    assert "invalid configuration for injectors[1] 'lora' (plugin 'recorder'):" in str(excinfo.value)
    assert "rank: Input should be a valid integer, unable to parse string as an integer (got 'four')" in str(excinfo.value)
    assert recorder.calls == []


def test_a_component_that_takes_no_options_rejects_any(recorder):
    with pytest.raises(ConfigError, match=r"injectors\[0\] 'attention' \(plugin 'recorder'\):\n  - unknown field 'scale'\. Valid fields: none\."):
        build(RECIPE, refcond.from_modules(recorder), overrides={"backbone": "toy", "injectors": {0: {"config": {"scale": 1.0}}}})
    assert recorder.calls == []


def test_an_unknown_component_name_fails_before_anything_is_built(recorder):
    with pytest.raises(UnknownComponentError, match=r"unknown aggregator 'maen'\. Did you mean 'mean'\?"):
        build({**RECIPE, "aggregator": "maen"}, refcond.from_modules(recorder), overrides={"backbone": "toy"})
    assert recorder.calls == []


def test_an_unknown_name_fails_before_the_backbone_even_with_a_checkpoint(recorder):
    with pytest.raises(UnknownComponentError, match=r"unknown aggregator 'maen'"):
        build({**RECIPE, "aggregator": "maen"}, refcond.from_modules(recorder), checkpoint={"w": torch.eye(2)}, overrides={"backbone": "toy"})
    assert recorder.calls == []


def test_build_calls_the_factories_in_role_order_with_typed_configs(recorder):
    built = build(RECIPE, refcond.from_modules(recorder), overrides={"backbone": "toy", "encoder": {"config": {"size": 8}}})
    assert [role for role, _ in recorder.calls] == ["backbone", "encoder", "aggregator", "injector", "injector"]
    assert recorder.calls[1][1] == PixelsConfig(output="pooled", size=8)
    assert recorder.calls[4][1] == RankConfig(rank=4)
    assert built.composition.backbone.name == "toy"


def test_settings_from_the_checkpoint_override_the_recipe_and_the_callers_override_both(recorder):
    plugins = refcond.from_modules(recorder)
    from_file = build(RECIPE, plugins, checkpoint={"w": torch.eye(3)}, overrides={"backbone": "toy"})
    assert from_file.composition.aggregator.config == {"size": 3}
    assert torch.equal(from_file.aggregator.weight, torch.eye(3))

    with pytest.raises(refcond.CheckpointError, match=r"key aggregator\.weight: expected shape \(5, 5\), got \(3, 3\)"):
        build(RECIPE, plugins, checkpoint={"w": torch.eye(3)}, overrides={"backbone": "toy", "aggregator": {"config": {"size": 5}}})
