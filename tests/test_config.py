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
from refcond.config import validate_config

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


# -- bad input of every shape is a ConfigError that names it, before anything is built ----------


def unet_snapshot(pipe: Any) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """The UNet's processors (by identity) and weights: what a refused composition must leave as it was."""
    return {k: id(v) for k, v in pipe.unet.attn_processors.items()}, {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def assert_unchanged(pipe: Any, before: tuple[dict[str, int], dict[str, torch.Tensor]]) -> None:
    processors, weights = unet_snapshot(pipe)
    assert processors == before[0]
    assert all(torch.equal(weights[k], before[1][k]) for k in weights)


@pytest.mark.parametrize("data", [["encoder", "clip"], 5, 1.5, "ip-adapter", None], ids=["list", "int", "float", "text", "none"])
def test_a_composition_that_is_not_a_table_says_what_a_composition_is(data):
    with pytest.raises(ConfigError, match=r"^composition: a composition is a table \(a dict, a JSON object\) of roles, not .*Write it as"):
        Composition.parse(data)


@pytest.mark.parametrize("composition", [["ip-adapter"], 5], ids=["list", "int"])
def test_from_pipe_refuses_a_composition_that_is_not_a_name_file_or_table(sd15_pipe, composition):
    with pytest.raises(ConfigError, match="a composition is a table"):
        refcond.from_pipe(sd15_pipe, composition, seed=0)


def test_from_pipe_refuses_a_backbone_override_that_is_a_number(sd15_pipe):
    with pytest.raises(ConfigError, match="the override of backbone is a float"):
        refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, backbone=1.5)


def test_injectors_none_is_refused_in_a_composition_and_as_an_override(sd15_pipe):
    message = r"injectors: a composition needs at least one injector, not None: e\.g\. injectors = \['cross-attention'\]"
    with pytest.raises(ConfigError, match=message):
        Composition.parse({"injectors": None})
    before = unet_snapshot(sd15_pipe)
    with pytest.raises(ConfigError, match=message):
        refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, injectors=None)
    assert_unchanged(sd15_pipe, before)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**RECIPE, "aggregator": 1.5}, r"aggregator: a role is a registered component name \(e\.g\. 'mean'\) or a table with name and config .* not a float \(1\.5\)"),
        ({**RECIPE, "encoder": ["pixels"]}, r"encoder: a role is a registered component name .* not a list \(\['pixels'\]\)"),
        ({**RECIPE, "injectors": 7}, r"injectors: injectors is a list of injectors \(names, or tables with name and config\), not a int"),
        ({**RECIPE, "injectors": ["attention", 2.5]}, r"injectors: a role is a registered component name .* not a float \(2\.5\)"),
    ],
    ids=["float-role", "list-role", "int-injectors", "float-injector"],
)
def test_roles_of_the_wrong_type_are_refused_with_the_shape_a_role_has(data, message):
    with pytest.raises(ConfigError, match=message):
        Composition.parse(data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aggregator": 1.5}, r"the override of aggregator is a float \(1\.5\): give a component name \('concat'\), a dict with 'name'"),
        ({"encoder": ["pixels"]}, r"the override of encoder is a list \(\['pixels'\]\)"),
        ({"injectors": {0: 3}}, r"the override of injectors\[0\] is an int \(3\)"),
        ({"injectors": {1.5: {}}}, r"injectors are addressed by position \(0, '0'\) or by component name .* not by a float \(1\.5\)"),
        ({"encoder": {"config": [1, 2]}}, r"the config of the encoder override is a list \(\[1, 2\]\): give a dict of options"),
        ({"encoder": {"name": 5}}, r"the name in the encoder override is an int \(5\)"),
        ({"aggregator": {"nmae": "concat"}}, r"the override of aggregator has unknown key 'nmae'\. Did you mean 'name'\?"),
        ([("aggregator", "concat")], r"overrides are a dict of roles \(e\.g\. \{'aggregator': 'concat'\}\), not a list"),
    ],
    ids=["float", "list", "injector-int", "injector-key", "config-list", "name-int", "key-typo", "not-a-dict"],
)
def test_overrides_of_the_wrong_shape_name_the_role_and_the_shape_to_give(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Composition.parse(RECIPE).with_overrides(overrides)


@pytest.mark.parametrize("role", ["aggregator", "encoder", "injectors"])
@pytest.mark.parametrize("value", [1.5, [1], True], ids=["float", "list", "bool"])
def test_from_pipe_refuses_roles_of_the_wrong_type_and_leaves_the_unet_alone(sd15_pipe, role, value):
    before = unet_snapshot(sd15_pipe)
    with pytest.raises(ConfigError, match=r"override of|a role is|injectors is a list"):
        refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, **{role: value})
    assert_unchanged(sd15_pipe, before)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), r"injectors\.0\.config\.scale is nan; configurations take finite numbers only"),
        (float("-inf"), r"injectors\.0\.config\.scale is -inf; configurations take finite numbers only"),
        (10**5000, r"injectors\.0\.config\.scale is an integer of 5001 digits; configurations take integers of at most 20 digits"),
        (_nested(100_000), r"injectors\.0\.config\.scale\.a\.a.* is nested more than 32 levels deep \(or contains itself\)"),
    ],
    ids=["nan", "inf", "5000-digits", "deep"],
)
def test_values_no_configuration_holds_are_refused_with_their_path(sd15_pipe, value, message):
    with pytest.raises(ConfigError, match="^composition: " + message):
        Composition.parse({**RECIPE, "injectors": [{"name": "attention", "config": {"scale": value}}]})
    before = unet_snapshot(sd15_pipe)
    with pytest.raises(ConfigError, match="^overrides: " + message):
        refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, injectors={0: {"config": {"scale": value}}})
    assert_unchanged(sd15_pipe, before)


def test_a_table_that_contains_itself_is_refused():
    looped: dict[str, Any] = {"name": "attention"}
    looped["config"] = looped
    with pytest.raises(ConfigError, match=r"nested more than 32 levels deep \(or contains itself\)"):
        Composition.parse({"injectors": [looped]})


def test_too_many_values_are_refused_before_they_are_walked_again():
    with pytest.raises(ConfigError, match=r"^composition: more than 100000 values; a composition holds a few dozen"):
        Composition.parse({**RECIPE, "name": "x", "injectors": [{"name": "attention", "config": {"big": list(range(200_000))}}]})


def test_a_config_that_is_not_a_dict_is_refused_by_validate_config():
    with pytest.raises(ConfigError, match=r"invalid configuration for encoder 'x': the config is a list \(\[1\]\); give a dict of options"):
        validate_config(PixelsConfig, [1], where="encoder 'x'")


def test_error_messages_show_huge_or_deep_values_briefly(recorder):
    with pytest.raises(ConfigError) as excinfo:
        build(RECIPE, refcond.from_modules(recorder), overrides={"backbone": "toy", "aggregator": {"config": {"size": [[[[["deep"]]]]] * 50}}})
    (line,) = [line for line in str(excinfo.value).splitlines() if line.startswith("  - size")]
    assert len(line) < 200 and "..." in line


def test_component_configs_refuse_nan_and_infinity_in_float_fields():
    class Scaled(ComponentConfig):
        scale: float = 1.0

    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"scale\n  Input should be a finite number"):
            Scaled(scale=value)  # built in code, without the composition's checks
    for text in ("NaN", "-Infinity"):
        with pytest.raises(ConfigError, match=r"injector 'scaled':\n  - scale: Input should be a finite number \(got '"):
            validate_config(Scaled, {"scale": text}, where="injector 'scaled'")


# -- composition files: anything but a small UTF-8 table of roles is a ConfigError naming the file --


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("deep.json", "[" * 100_000 + "]" * 100_000, r"not valid JSON: nested more than 32 levels deep"),
        ("deep.toml", "a = " + "[" * 100_000 + "]" * 100_000, r"not valid TOML: nested more than 32 levels deep"),
        ("nested.json", json.dumps({**RECIPE, "encoder": {"name": "pixels", "config": _nested(40)}}), r"encoder\.config\.a\..* nested more than 32"),
        ("digits.json", '{"injectors": ["attention"], "seed": ' + "7" * 5000 + "}", r"not valid JSON: it holds an integer of more than 4300 digits"),
        ("digits.toml", 'injectors = ["attention"]\nseed = ' + "7" * 5000, r"not valid TOML: it holds an integer of more than 4300 digits"),
        ("big.json", '{"injectors": ["attention"], "seed": ' + "7" * 100 + "}", r"seed is an integer of 100 digits"),
        ("scalar.json", "5", r"the file holds an int \(5\), but a composition is a JSON object with 'injectors'"),
        ("list.json", '["attention"]', r"the file holds a list \(\['attention'\]\), but a composition is a JSON object"),
        ("nan.json", '{"injectors": [{"name": "attention", "config": {"scale": NaN}}]}', r"injectors\.0\.config\.scale is nan"),
        ("inf.toml", 'injectors = [{ name = "attention", config = { scale = inf } }]', r"injectors\.0\.config\.scale is inf"),
    ],
    ids=["deep-json", "deep-toml", "nested", "digits-json", "digits-toml", "big-int", "scalar", "list", "nan-json", "inf-toml"],
)
def test_composition_files_of_every_bad_shape_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as excinfo:
        Composition.from_file(path)
    assert str(path) in str(excinfo.value)


def test_a_huge_composition_file_is_refused_without_reading_it_all(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as file:
        file.truncate(64 * 1024 * 1024)  # a sparse 64 MiB file
    with pytest.raises(ConfigError, match=r"huge\.json' is larger than 1024 KiB; a composition is a few lines"):
        Composition.from_file(path)


def test_a_folder_named_like_a_composition_file_is_refused(tmp_path):
    (tmp_path / "recipe.toml").mkdir()
    with pytest.raises(ConfigError, match=r"recipe\.toml' is not a regular file"):
        Composition.from_file(tmp_path / "recipe.toml")


def test_random_bytes_are_not_utf8_text(tmp_path):
    path = tmp_path / "noise.toml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"noise\.toml' is not UTF-8 text"):
        Composition.from_file(path)


# -- model folders: a missing one is named as such, before the loader's hub-id errors ------------


def test_a_missing_backbone_folder_is_named_before_anything_loads(tmp_path):
    spec = {"backbone": {"name": "sd15", "config": {"model": str(tmp_path / "missing")}}, "injectors": ["lora"]}
    with pytest.raises(ConfigError, match=r"backbone 'sd15': config model '.*missing' is not a folder that exists, and not a valid Hugging Face hub id"):
        build(spec, refcond.get_plugins())


def test_a_backbone_folder_without_a_pipeline_is_a_config_error(tmp_path):
    spec = {"backbone": {"name": "sd15", "config": {"model": str(tmp_path)}}, "injectors": ["lora"]}
    with pytest.raises(ConfigError, match=r"backbone 'sd15': cannot load StableDiffusionPipeline from config model '.*': .*model_index\.json"):
        build(spec, refcond.get_plugins())


def test_a_backbone_device_that_is_not_a_device_is_refused():
    with pytest.raises(ConfigError, match=r"device: 'quantum' is not a device; use cpu, cuda, cuda:1, mps"):
        build({"backbone": {"name": "sd15", "config": {"device": "quantum"}}, "injectors": ["lora"]}, refcond.get_plugins())


@pytest.mark.parametrize("model", ["./missing", "../nowhere/clip", "/no/such/folder"])
def test_a_missing_clip_folder_is_named_instead_of_the_hub_id_rules(sd15_pipe, model):
    before = unet_snapshot(sd15_pipe)
    with pytest.raises(ConfigError, match=r"encoder 'clip': config model '.*' is not a folder that exists, and not a valid Hugging Face hub id"):
        refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, encoder={"config": {"model": model}})
    assert_unchanged(sd15_pipe, before)


def test_a_clip_folder_without_a_model_is_a_config_error(sd15_pipe, tmp_path):
    with pytest.raises(ConfigError, match=r"encoder 'clip': cannot load CLIPVisionModelWithProjection from config model '.*'"):
        refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, encoder={"config": {"model": str(tmp_path)}})


@pytest.mark.parametrize("hidden_layer", [3, -4, 50, -1000])
def test_clip_hidden_layer_is_checked_against_the_model_when_built(sd15_pipe, hidden_layer):
    before = unet_snapshot(sd15_pipe)
    with pytest.raises(ConfigError, match=rf"encoder 'clip': config hidden_layer is {hidden_layer}, but the CLIP model has 2 layers, so its hidden states are numbered -3 to 2"):
        refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, encoder={"config": {"output": "hidden_states", "hidden_layer": hidden_layer}})
    assert_unchanged(sd15_pipe, before)
    with pytest.raises(ConfigError, match=r"hidden_layer: Input should be less than or equal to 1024"):
        refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, encoder={"config": {"output": "hidden_states", "hidden_layer": 2**62}})
    for valid in (-3, 2):
        refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, encoder={"config": {"output": "hidden_states", "hidden_layer": valid}}).detach()


@pytest.mark.parametrize("device", ["meta", f"cuda:{torch.cuda.device_count() + 3}"])
def test_a_backbone_device_this_machine_lacks_is_refused_before_the_pipeline_loads(tmp_path, device):
    spec = {"backbone": {"name": "sd15", "config": {"model": str(tmp_path / "missing"), "device": device}}, "injectors": ["lora"]}
    with pytest.raises(ConfigError, match=rf"backbone 'sd15': config device '{device}' is not available on this machine"):
        build(spec, refcond.get_plugins())


def test_a_clip_model_name_too_long_for_a_folder_is_a_config_error(sd15_pipe):
    with pytest.raises(ConfigError, match=r"encoder 'clip': config model 'xxx.*' cannot be a folder here \(File name too long\)"):
        refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, encoder={"config": {"model": "x" * 300}})


def test_a_clip_model_folder_of_another_kind_of_model_is_a_config_error(sd15_pipe, tiny_qwen2vl_dir):
    with pytest.raises(ConfigError, match=r"encoder 'clip': cannot load CLIPVisionModelWithProjection from config model '.*'"):
        refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, encoder={"config": {"model": str(tiny_qwen2vl_dir)}})
