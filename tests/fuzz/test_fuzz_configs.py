"""Fuzzing the configs surface: compositions, role overrides, composition files and ``--set`` items.

Every generated input goes through :func:`fuzzing.guard` on the surface ``"configs"``: it must be
built (and then leave the pipeline exactly as it was once detached, with finite weights) or refused
with a :class:`refcond.RefcondError`, never a raw exception, a hang or an allocation beyond the
memory cap. The inputs come in every shape: JSON-like values of any type and size at every level
(NaN and infinities, integers of thousands of digits, nesting thousands of levels deep), the
registered components with their config fields set to values at and beyond their bounds, composition
files as TOML/JSON text or random bytes, and ``refcond generate --set`` items.
"""

from __future__ import annotations

import json
import string
import typing
from pathlib import Path
from typing import Any

import fuzzing
import huggingface_hub.constants
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

import refcond
from refcond import Composition
from refcond.cli import CliState, cli
from refcond.testing import reference_images, save_tiny_qwen2vl, tiny_sd15_pipeline

SURFACE = "configs"
REGISTRY = refcond.get_plugins().registry
#: The arguments of from_pipe itself: role overrides cannot use these names.
FROM_PIPE_ARGUMENTS = {"pipe", "composition", "checkpoint", "allow_pickle", "plugins", "seed"}
#: Fields holding a path or a hub id: generated from safe values only, so that nothing is downloaded.
PATH_FIELDS = {"model", "subfolder", "path", "weight_name", "output_dir", "variant"}


# -- what the module shares: one tiny pipeline, model folders, a LoRA file ------------------------


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No input may reach the network: every hub request fails at once (restored after the module)."""
    was = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    yield
    huggingface_hub.constants.HF_HUB_OFFLINE = was


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders and files the generated configs point at: a saved pipeline, the tiny Qwen2-VL, a LoRA, a reference."""
    from refcond_injectors.testing import fabricate_lora_state_dict
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("fuzz-configs")
    pipe = tiny_sd15_pipeline()
    pipe.save_pretrained(root / "sd15")
    save_file(fabricate_lora_state_dict(pipe, "diffusers", rank=2, seed=1), str(root / "lora.safetensors"))
    reference_images(1)[0].save(root / "ref.png")
    (root / "empty").mkdir()
    save_tiny_qwen2vl(root / "qwen2vl")
    return {"root": root, "sd15": root / "sd15", "qwen2vl": root / "qwen2vl", "lora": root / "lora.safetensors", "ref": root / "ref.png", "empty": root / "empty"}


@pytest.fixture(scope="module")
def pipe():
    """The tiny SD1.5 pipeline every from_pipe input is built on, once for the module."""
    return tiny_sd15_pipeline()


# -- strategies -----------------------------------------------------------------------------------

class Huge:
    """An integer of ``digits`` digits, made real only when the input is applied: hypothesis prints what
    it draws, and Python refuses to print integers of more than 4300 digits."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"Huge({self.digits})"

    def value(self) -> int:
        return 10 ** (self.digits - 1)


class Deep:
    """``leaf`` wrapped in ``depth`` lists and dicts, made real only when the input is applied (printing a
    value thousands of levels deep would exhaust hypothesis' own recursion)."""

    def __init__(self, depth: int, leaf: Any):
        self.depth, self.leaf = depth, leaf

    def __repr__(self) -> str:
        return f"Deep({self.depth}, {self.leaf!r})"


def materialize(root: Any) -> Any:
    """``root`` with every :class:`Huge` and :class:`Deep` made real, without recursion (the result may be very deep)."""
    holder: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(root, holder, 0)]
    while stack:
        value, parent, key = stack.pop()
        if isinstance(value, Huge):
            parent[key] = value.value()
        elif isinstance(value, Deep):
            inner: list[Any] = [None]
            built: Any = inner
            for level in range(value.depth):  # outermost first; the leaf goes into the innermost
                nested: Any = [None] if level % 2 else {"a": None}
                if isinstance(built, list):
                    built[0] = nested
                else:
                    built["a"] = nested
                built = nested
            parent[key] = inner[0] if value.depth else None
            stack.append((value.leaf, built, 0 if isinstance(built, list) else "a") if value.depth else (value.leaf, parent, key))
        elif isinstance(value, list):
            parent[key] = new = [None] * len(value)
            stack.extend((item, new, i) for i, item in enumerate(value))
        elif isinstance(value, dict):
            parent[key] = new = dict.fromkeys(value)
            stack.extend((item, new, k) for k, item in value.items())
        else:
            parent[key] = value
    return holder[0]


#: Integers a size, depth, count or seed is likely to be given: small, around the bounds, and absurd.
EDGE_INTEGERS = [-(2**63) - 1, -1, 0, 1, 2, 3, 7, 8, 64, 1024, 1025, 4096, 4097, 65536, 65537, 2**31, 2**63 - 1, 2**64, 10**11, 10**30, 10**4000]
EDGE_FLOATS = [0.0, -0.0, 0.5, 1.0, -1.0, 99.9, 100.0, 100.5, 1000.0, 1e6, 1e300, -1e300, float("nan"), float("inf"), float("-inf"), 5e-324]


def integers() -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(EDGE_INTEGERS), st.integers(-(2**70), 2**70), st.integers(0, 64), st.sampled_from([Huge(4301), Huge(5000)]))


def floats() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(EDGE_FLOATS), st.floats())


def text() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "linear", "resampler", "mlp", "causal", "float16", "NaN", "1e999", "to_q", "a.b"]))


scalars = st.one_of(st.none(), st.booleans(), integers(), floats(), text())
#: A value wrapped in lists and dicts, a few levels or many thousands deep.
deep_values = st.builds(Deep, st.one_of(st.integers(0, 40), st.sampled_from([31, 32, 33, 1_000, 100_000])), scalars)
#: Any JSON-like value: None, bools, integers of any size, floats with NaN and infinities, text, lists and
#: dicts of them, and values nested thousands of levels deep, at any level. Apply :func:`materialize` first.
json_values = st.recursive(
    st.one_of(scalars, scalars, deep_values),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(text(), st.integers(-3, 3)), inner, max_size=4)),
    max_leaves=12,
)


def anything() -> st.SearchStrategy[Any]:
    return st.one_of(json_values, deep_values)


def safe_paths(files: dict[str, Path]) -> st.SearchStrategy[Any]:
    """Path or hub-id values that never reach the network: missing folders, invalid ids, real files and folders."""
    return st.sampled_from(
        [
            None,
            "",
            "./missing",
            "../nowhere/model",
            "not a hub id",
            "a/b/c/d",
            "..",
            "-bad-",
            "x" * 300,
            str(files["root"] / "missing"),
            str(files["empty"]),
            str(files["ref"]),
            str(files["lora"]),
            str(files["qwen2vl"]),
            str(files["sd15"]),
            "fp16",
        ]
    )


def _bounds(field: Any) -> tuple[float | None, float | None]:
    low = high = None
    for item in field.metadata:
        for name in ("ge", "gt"):
            if getattr(item, name, None) is not None:
                low = getattr(item, name)
        for name in ("le", "lt"):
            if getattr(item, name, None) is not None:
                high = getattr(item, name)
    return low, high


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


#: Fields whose valid values are names the UNet or the statistics define.
KNOWN_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "targets": st.lists(st.sampled_from(["to_q", "to_k", "to_v", "to_out.0"]), min_size=1, max_size=4, unique=True),
    "target_modules": st.lists(st.sampled_from(["to_q", "to_k", "to_v", "to_out.0"]), min_size=1, max_size=4, unique=True),
    "quantiles": st.lists(st.floats(0, 1), min_size=1, max_size=5),
    "weights": st.one_of(st.none(), st.lists(st.floats(0, 1000), min_size=1, max_size=4)),
}


def field_values(name: str, field: Any, files: dict[str, Path], depth: int = 0, garbage: bool = True) -> st.SearchStrategy[Any]:
    """Values for one config field: valid ones most often, then (with ``garbage``) of its type at and beyond its bounds, and anything at all."""
    if name in PATH_FIELDS:
        return safe_paths(files)
    annotation = field.annotation
    args = set(typing.get_args(annotation)) | {annotation}
    low, high = _bounds(field)
    valid: list[st.SearchStrategy[Any]] = []
    edges: list[st.SearchStrategy[Any]] = [json_values]
    if name in KNOWN_VALUES:
        valid.append(KNOWN_VALUES[name])
    if int in args:
        lo = int(low) if low is not None else -8
        valid.append(st.integers(lo, lo + 16 if high is None else min(int(high), lo + 16)))
        if high is not None:
            valid.append(st.sampled_from([int(high), max(lo, int(high) // 2)]))
        around = [int(b) + d for b in (low, high) if b is not None for d in (-1, 0, 1)]
        edges += [integers(), st.sampled_from(around)] if around else [integers()]
    if float in args:
        valid.append(st.floats(-2.0 if low is None else max(low, -2.0), 2.0 if high is None else min(high, 2.0), exclude_min=low is not None and low >= 0 and name in ("alpha", "learning_rate")))
        edges.append(floats())
    if bool in args:
        valid.append(st.booleans())
    if str in args:
        edges.append(text())
    for literal in (a for a in args if typing.get_origin(a) is typing.Literal):
        valid.append(st.sampled_from(typing.get_args(literal)))
    if type(None) in args:
        valid.append(st.none())
    models = _models_in(annotation)
    if models and depth < 2:
        config = config_dicts(models[0], files, depth + 1, garbage)
        valid += [config, st.lists(config, max_size=2)]
    if not garbage and valid:
        return st.one_of(*valid)
    return st.one_of(*(valid * 3), *edges) if valid else st.one_of(*edges)


def config_dicts(model: type[BaseModel] | None, files: dict[str, Path], depth: int = 0, garbage: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    """A config for ``model``: some of its fields with generated values, sometimes (with ``garbage``) an unknown field."""
    fields = dict(model.model_fields) if model is not None else {}
    known = st.fixed_dictionaries({}, optional={name: field_values(name, field, files, depth, garbage) for name, field in fields.items()})
    if not garbage:
        return known
    unknown = st.dictionaries(text(), anything(), max_size=1)
    return st.one_of(known, known, known, st.builds(lambda a, b: {**b, **a}, known, unknown))


def spec(kind: str, files: dict[str, Path]) -> st.SearchStrategy[Any]:
    """One role: a registered component with a generated config, a bare or unknown name, or any value."""
    entries = list(REGISTRY.entries(kind))
    named = st.sampled_from(entries).flatmap(
        lambda e: st.fixed_dictionaries({"name": st.just(e.name)}, optional={"config": config_dicts(e.config, files)})
    )
    return st.one_of(named, named, st.sampled_from([e.name for e in entries]), text(), anything())


def mllm_safe(value: Any, files: dict[str, Path]) -> Any:
    """An ``mllm`` encoder never loads its default hub model: the tiny Qwen2-VL unless a model is given."""
    if isinstance(value, dict) and value.get("name") == "mllm":
        config = value.get("config")
        if isinstance(config, dict) and "model" not in config:
            value = {**value, "config": {**config, "model": str(files["qwen2vl"]), "dtype": "float32"}}
    return value


@st.composite
def compositions(draw: st.DrawFn, files: dict[str, Path]) -> Any:
    """A registered recipe or an unknown name, a dict of roles, a composition file, or a Composition."""
    kind = draw(st.sampled_from(["name", "dict", "dict", "file", "object", "anything"]))
    if kind == "name":
        return draw(st.one_of(st.sampled_from(["ip-adapter", "lora-tuning", "easyref"]), text()))
    if kind == "anything":  # a list, a number, None, ...: what is no composition at all
        return draw(anything())
    roles = {
        "encoder": st.one_of(spec("encoder", files), st.none()),
        "aggregator": st.one_of(spec("aggregator", files), st.none()),
        "injectors": st.one_of(st.lists(spec("injector", files), max_size=3), spec("injector", files), anything()),
        "name": st.one_of(text(), anything()),
        "backbone": st.one_of(st.sampled_from(["sd15", "sdxl"]), st.none()),
    }
    data = draw(st.fixed_dictionaries({}, optional=roles))
    if "encoder" in data:
        data["encoder"] = mllm_safe(data["encoder"], files)
    if draw(st.booleans()):
        data[draw(text())] = draw(anything())
    if kind == "file":
        path = files["root"] / f"composition-{draw(st.integers(0, 3))}.{draw(st.sampled_from(['json', 'toml']))}"
        path.write_text(to_json(data) if path.suffix == ".json" else to_toml(data), encoding="utf-8")
        return str(path)
    if kind == "object":
        try:
            return Composition.parse(materialize(data))
        except refcond.ConfigError:
            return data
    return data


@st.composite
def role_overrides(draw: st.DrawFn, files: dict[str, Path]) -> dict[str, Any]:
    """Keyword overrides of from_pipe: roles swapped or merged, injectors by index or name, values of every shape."""
    injectors = st.one_of(
        st.dictionaries(st.one_of(st.sampled_from([0, 1, "0", "cross-attention", "lora", "x"]), st.integers(-3, 3)), spec("injector", files), max_size=2),
        st.lists(spec("injector", files), max_size=2),
        spec("injector", files),
    )
    backbone = st.one_of(
        st.none(),
        st.sampled_from(["sd15", "sdxl", "nope"]),
        st.fixed_dictionaries({}, optional={"name": st.sampled_from(["sd15", "sdxl"]), "config": config_dicts(REGISTRY.get("backbone", "sd15").config, files)}),
        spec("backbone", files),
    )
    roles = {
        "encoder": st.one_of(spec("encoder", files), st.none(), st.fixed_dictionaries({"config": config_dicts(REGISTRY.get("encoder", "clip").config, files)})),
        "aggregator": st.one_of(spec("aggregator", files), st.none()),
        "injectors": injectors,
        "backbone": backbone,
        "name": st.one_of(text(), anything()),
    }
    overrides = draw(st.fixed_dictionaries({}, optional=roles))
    if "encoder" in overrides:
        overrides["encoder"] = mllm_safe(overrides["encoder"], files)
    if draw(st.integers(0, 5)) == 0:
        name = draw(st.text(string.ascii_letters + "_", min_size=1, max_size=10).filter(lambda n: n not in FROM_PIPE_ARGUMENTS))
        overrides[name] = draw(anything())
    return overrides


def to_json(value: Any) -> str:
    """JSON text of generated data; a :class:`Huge` becomes its digits and a :class:`Deep` its brackets, as text."""
    if isinstance(value, Huge):
        return "9" * value.digits
    if isinstance(value, Deep):
        return "[" * value.depth + to_json(value.leaf) + "]" * value.depth
    if isinstance(value, list):
        return "[" + ", ".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {to_json(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def to_toml(data: Any, table: str = "") -> str:
    """A TOML rendering of generated data, close enough: what is not representable becomes text or is dropped."""
    lines, tables = [], []
    for key, value in (data.items() if isinstance(data, dict) else []):
        name = json.dumps(str(key))
        if isinstance(value, dict):
            tables.append(to_toml(value, f"{table}.{name}" if table else name))
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    head = [f"[{table}]"] if table else []
    return "\n".join(head + lines + [""] + tables)


def _toml_value(value: Any) -> str:
    if isinstance(value, Huge):
        return "9" * value.digits
    if isinstance(value, Deep):
        return "[" * value.depth + _toml_value(value.leaf) + "]" * value.depth
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


# -- from_pipe --------------------------------------------------------------------------------------


def build_and_detach(pipe: Any, composition: Any, overrides: dict[str, Any]) -> list[torch.Tensor]:
    """Build on the shared pipeline, detach whatever was built; the weights built, for the finiteness check."""
    rp = refcond.from_pipe(pipe, composition, seed=0, **overrides)
    try:
        return [p.detach() for _, p in rp.named_parameters()]
    finally:
        rp.detach()


def _unet_state(pipe: Any) -> dict[str, Any]:
    return fuzzing.unet_state(pipe.unet)


@given(data=st.data())
def test_from_pipe_with_compositions_of_every_shape(pipe, files, data):
    composition = materialize(data.draw(compositions(files), label="composition"))
    fuzzing.guard(SURFACE, lambda: build_and_detach(pipe, composition, {}), state=lambda: _unet_state(pipe), same=fuzzing.same_state)


@given(data=st.data())
def test_from_pipe_with_role_overrides_of_every_shape(pipe, files, data):
    composition = data.draw(st.sampled_from(["ip-adapter", "ip-adapter", "lora-tuning", "easyref"]), label="composition")
    overrides = materialize(data.draw(role_overrides(files), label="overrides"))
    if composition == "easyref":  # the tiny Qwen2-VL under the generated settings, unless they replace the encoder
        from refcond_easyref.testing import tiny_easyref_overrides

        base = tiny_easyref_overrides(files["qwen2vl"])
        encoder = overrides.get("encoder", base["encoder"])
        if isinstance(encoder, dict) and encoder.get("name", "mllm") == "mllm" and isinstance(encoder.get("config", {}), dict):
            encoder = {**encoder, "config": {**base["encoder"]["config"], **encoder.get("config", {})}}
        overrides = {**base, **overrides, "encoder": encoder}
    fuzzing.guard(SURFACE, lambda: build_and_detach(pipe, composition, overrides), state=lambda: _unet_state(pipe), same=fuzzing.same_state)


@given(data=st.data())
def test_component_configs_at_and_beyond_their_bounds(pipe, files, data):
    """One registered component at a time, in the composition it fits, with its config fields at and beyond their bounds."""
    kind = data.draw(st.sampled_from(["encoder", "aggregator", "injector"]), label="kind")
    entry = data.draw(st.sampled_from(list(REGISTRY.entries(kind))), label="component")
    garbage = data.draw(st.booleans(), label="garbage")
    config = materialize(data.draw(config_dicts(entry.config, files, garbage=garbage), label="config"))
    if kind == "encoder":
        config = mllm_safe({"name": entry.name, "config": config}, files)["config"]
        overrides = {"encoder": {"name": entry.name, "config": config}, "aggregator": "reference-tokens" if entry.name == "mllm" else "mean"}
    elif kind == "aggregator":
        overrides = {"aggregator": {"name": entry.name, "config": config}}
        if entry.name == "reference-tokens":
            overrides["encoder"] = {"name": "mllm", "config": {"model": str(files["qwen2vl"]), "dtype": "float32"}}
    else:
        overrides = {"injectors": [{"name": entry.name, "config": config}]}
    fuzzing.guard(SURFACE, lambda: build_and_detach(pipe, "ip-adapter", overrides), state=lambda: _unet_state(pipe), same=fuzzing.same_state)


@given(data=st.data())
def test_overrides_of_every_shape(data):
    """with_overrides and the config validation alone, for overrides of every shape."""
    base = data.draw(st.sampled_from(["ip-adapter", "lora-tuning"]), label="recipe")
    overrides = data.draw(st.one_of(st.dictionaries(st.one_of(st.sampled_from(["encoder", "aggregator", "injectors", "backbone", "name"]), text()), anything(), max_size=3), anything()), label="overrides")
    overrides = materialize(overrides)
    recipe = REGISTRY.get("composition", base).obj

    def apply() -> None:
        Composition.parse(recipe).with_overrides(overrides).validate_components(REGISTRY)

    fuzzing.guard(SURFACE, apply)


@given(composition=anything())
def test_composition_parse_of_any_value(composition):
    composition = materialize(composition)
    fuzzing.guard(SURFACE, lambda: Composition.parse(composition))


# -- composition files ------------------------------------------------------------------------------


@st.composite
def file_contents(draw: st.DrawFn) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".json", ".toml", ".JSON", ".yaml", ""]))
    kind = draw(st.sampled_from(["json", "toml", "bytes", "deep", "digits", "huge"]))
    if kind == "json":
        content = to_json(draw(st.one_of(json_values, st.dictionaries(text(), json_values, max_size=4)))).encode()
    elif kind == "toml":
        content = to_toml(draw(st.dictionaries(text(), json_values, max_size=4))).encode()
    elif kind == "bytes":
        content = draw(st.binary(max_size=64))
    elif kind == "deep":
        depth = draw(st.sampled_from([10, 33, 1_000, 100_000]))
        content = ("a = " if suffix.lower() == ".toml" else "") + "[" * depth + "]" * depth
        content = content.encode()
    elif kind == "digits":
        digits = "9" * draw(st.sampled_from([19, 21, 4300, 4301, 5000]))
        content = (f'{{"injectors": ["lora"], "name": {digits}}}' if suffix.lower() != ".toml" else f'injectors = ["lora"]\nname = {digits}').encode()
    else:
        content = b'{"injectors": ["lora"], "name": "' + b"x" * (1024 * 1024 + draw(st.integers(0, 10))) + b'"}'
    return suffix, content


@given(contents=file_contents())
def test_composition_files_of_every_shape(files, contents):
    suffix, content = contents
    path = files["root"] / f"recipe{suffix}"
    path.write_bytes(content)
    fuzzing.guard(SURFACE, lambda: Composition.from_file(path))


# -- the command line's --set -------------------------------------------------------------------------

#: Config field names of every registered component, for --set keys (``tuning`` left out: it trains
#: during the call, for as many steps as configured, which is work asked for, not a bad input).
FIELD_NAMES = sorted({name for kind in ("encoder", "aggregator", "injector", "backbone") for e in REGISTRY.entries(kind) if e.config for name in e.config.model_fields} - {"tuning"})


class CliRefused(refcond.RefcondError):
    """The command refused its input cleanly: a non-zero exit with one ``Error:`` line and no traceback."""


@st.composite
def set_items(draw: st.DrawFn, files: dict[str, Path]) -> str:
    role = draw(st.sampled_from(["encoder", "aggregator", "injectors.0", "injectors.cross-attention", "injector.1", "injectors", "backbone", "nope", ""]))
    path = draw(st.lists(st.one_of(st.sampled_from(FIELD_NAMES), st.sampled_from(["layers", "x"])), max_size=2))
    key = ".".join([role, *path]) if role else ".".join(path)
    if path and path[-1] in PATH_FIELDS:
        value = draw(safe_paths(files))
        raw = "null" if value is None else value
    else:
        raw = draw(
            st.one_of(
                json_values.map(to_json),
                st.sampled_from(["NaN", "-Infinity", "[1, NaN]", "9" * 5000, "1e999", "nan", "concat", "mean", "lora,cross-attention", "", "{"]),
                text(),
            )
        )
    return f"{key}={raw}" if draw(st.integers(0, 9)) else key


@st.composite
def plausible_set_items(draw: st.DrawFn, files: dict[str, Path]) -> str:
    """A ``--set`` item that names a real option of the default composition with a valid value, so that generations run too."""
    role = draw(st.sampled_from(["aggregator", "injectors.0", "encoder"]))
    if role == "aggregator":
        return "aggregator=" + draw(st.sampled_from(["mean", "concat", "weighted-mean", "max"]))
    model = REGISTRY.get("injector", "cross-attention").config if role == "injectors.0" else REGISTRY.get("encoder", "clip").config
    name = draw(st.sampled_from(sorted(model.model_fields)))
    value = draw(field_values(name, model.model_fields[name], files, garbage=False))
    return f"{role}.{name}={'null' if value is None else value if isinstance(value, str) else to_json(value)}"


def run_cli(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args, obj=CliState(refcond.get_plugins()))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code == 0:
        return
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    if len(errors) != 1 or "Traceback" in result.output:
        raise AssertionError(f"exit {result.exit_code} without exactly one Error line:\n{result.output[-1500:]}")
    raise CliRefused(errors[0])


@given(data=st.data())
def test_generate_with_set_items_of_every_shape(files, data):
    items = data.draw(st.lists(st.one_of(plausible_set_items(files), plausible_set_items(files), set_items(files)), min_size=1, max_size=3), label="--set")
    args = ["generate", "--model", str(files["sd15"]), "--ref", str(files["ref"]), "--steps", "1", "--seed", "0", "--out", str(files["root"] / "out.png"), "--quiet"]
    for item in items:
        args += ["--set", item]
    fuzzing.guard(SURFACE, lambda: run_cli(args))
