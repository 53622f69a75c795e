"""Fuzzing training configs: run configs of every shape are validated, or refused with a RefcondError.

Generated inputs: run tables near the schema (every field of the run, a stage, the optimizer, the
dropout, the loss, the validation, the encoder LoRA and the data, with values of the right type
within and beyond their bounds, of the wrong type, unknown and misspelt keys, nested tables where
values belong and the reverse), the same tables written as TOML files (then cut short, with bytes
flipped, not UTF-8, huge or nested deep), ``--set`` overrides (``FIELD=VALUE`` paths into lists and
tables, through values, out of range), and recipes with the user's settings merged in. Each goes
through :func:`refcond.training.load_train_config` on the surface ``"training-configs"``: accepted
(then the config is a :class:`TrainConfig` that validates again from its own dump to the same
value) or refused with a :class:`refcond.RefcondError`; never a raw exception, a hang or an
allocation beyond the cap. Nothing loads a model: a config is checked before anything does.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from fuzzing import guard
from hypothesis import given
from hypothesis import strategies as st

import refcond
from refcond.training import TrainConfig, load_train_config, set_field

SURFACE = "training-configs"
COUNTER = itertools.count()

ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "\0", "\ud800", "x" * 5000, "1e-3", "true", "[1]"]),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["a", "rank", "steps", ""]), st.integers(-2, 2), max_size=2),
)


def near(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value (seven times in eight), sometimes anything at all."""
    return st.one_of(*[good] * 7, ODD_VALUES)


SELECTORS = st.sampled_from(["aggregator", "injector.0", "injector.0.projector", "injector.cross-attention", "injector.lora", "encoder", "", ".x", "a..b", "unet"])
OPTIMIZER = st.fixed_dictionaries(
    {},
    optional={
        "name": near(st.sampled_from(["adamw", "adamw-8bit", "sgd"])),
        "learning_rate": near(st.floats(0, 2)),
        "weight_decay": near(st.floats(-1, 2)),
        "betas": near(st.lists(st.floats(-0.5, 1.5), min_size=0, max_size=3)),
        "epsilon": near(st.floats(0, 1)),
    },
)
STAGE = st.fixed_dictionaries(
    {"train": near(st.lists(SELECTORS, min_size=0, max_size=3)), "steps": near(st.integers(-2, 20_000_000))},
    optional={
        "name": near(st.sampled_from(["s", "stage-1", "a b", "x" * 70, "../up"])),
        "batch_size": near(st.integers(-1, 5000)),
        "gradient_accumulation": near(st.integers(-1, 5000)),
        "max_grad_norm": near(st.one_of(st.none(), st.floats(-1, 1e7))),
        "optimizer": near(OPTIMIZER),
        "lr_schedule": near(st.sampled_from(["constant", "cosine", "linear", "exponential"])),
        "warmup_steps": near(st.integers(-1, 20_000_000)),
        "ema_decay": near(st.one_of(st.none(), st.floats(-0.5, 1.5))),
        "gradient_checkpointing": near(st.booleans()),
        "encoder_lora": near(st.one_of(st.none(), st.fixed_dictionaries({"rank": near(st.integers(-1, 5000))}, optional={"alpha": near(st.floats(-1, 10)), "targets": near(st.lists(st.text(max_size=8), max_size=3)), "dropout": near(st.floats(-1, 2))}))),
        "dropout": near(st.fixed_dictionaries({}, optional={k: near(st.floats(-0.5, 1.5)) for k in ("references", "text", "both")})),
        "loss": near(st.fixed_dictionaries({}, optional={"snr_gamma": near(st.one_of(st.none(), st.floats(-1, 2000))), "noise_offset": near(st.floats(-1, 2))})),
        "data": near(st.fixed_dictionaries({}, optional={"truncate_rate": near(st.floats(-1, 2)), "max_references": near(st.integers(-1, 100)), "resolution": near(st.integers(0, 4096))})),
        "validation": near(st.fixed_dictionaries({}, optional={"every": near(st.integers(-1, 100)), "prompts": near(st.lists(st.text(max_size=5), max_size=3)), "references": near(st.lists(st.lists(st.text(max_size=5), max_size=2), max_size=2))})),
        "checkpoint_every": near(st.integers(-1, 20_000_000)),
        "keep_last": near(st.integers(-1, 2000)),
        "cache_encodings": near(st.booleans()),
        "batch_sise": st.integers(1, 2),
    },
)


def run_table(data: st.DataObject, data_path: str) -> dict[str, Any]:
    table = data.draw(
        st.fixed_dictionaries(
            {"data": near(st.fixed_dictionaries({"path": near(st.sampled_from([data_path, data_path, "missing.jsonl", ""]))}, optional={"resolution": near(st.integers(0, 4096)), "crop": near(st.sampled_from(["center", "random", "left"]))})),
             "stages": near(st.lists(STAGE, min_size=0, max_size=3))},
            optional={
                "composition": near(st.one_of(st.sampled_from(["ip-adapter", "easyref", "nope"]), st.just({"aggregator": "mean"}))),
                "from": near(st.sampled_from(["runs/a/model.safetensors", ""])),
                "roles": near(st.dictionaries(st.sampled_from(["encoder", "aggregator", "backbone"]), st.just({"config": {}}), max_size=2)),
                "model": near(st.sampled_from(["./sd15", "org/model"])),
                "output": near(st.sampled_from(["runs/x", ""])),
                "seed": near(st.integers(-1, 2**64)),
                "mixed_precision": near(st.sampled_from(["no", "fp16", "bf16", "fp8"])),
                "export": near(st.lists(st.sampled_from(["ip-adapter", "easyref", "x"]), max_size=3)),
                "trackers": near(st.lists(st.sampled_from(["tensorboard", "wandb", "mlflow"]), max_size=2)),
                "encoding_cache": near(st.one_of(st.none(), st.just("cache"))),
                "compositon": st.just("ip-adapter"),
            },
        )
    )  # fmt: skip
    if "composition" not in table and "from" not in table and data.draw(st.booleans()):
        table["composition"] = "ip-adapter"
    return table


def to_toml(value: Any, prefix: str = "") -> str:
    """A TOML text of a table (inline tables for nested ones; non-TOML values written as JSON, which TOML may refuse)."""

    def literal(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {literal(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(literal(x) for x in v) + "]"
        if v is None:
            return '"none"'
        return json.dumps(v)

    return "".join(f"{json.dumps(k)} = {literal(v)}\n" for k, v in value.items())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-training-configs")
    (root / "train.jsonl").write_text('{"references": ["a.png"], "image": "b.png", "caption": "x"}\n')
    return root


def check(source: Any, overrides: dict[str, Any] | None = None) -> None:
    config = guard(SURFACE, lambda: load_train_config(source, overrides))
    if config is None:
        return
    assert isinstance(config, TrainConfig)
    assert load_train_config(config.model_dump(by_alias=True)) == config, "a valid config must validate again from its own dump"


@given(data=st.data())
def test_run_tables_of_every_shape(folder, data):
    check(run_table(data, str(folder / "train.jsonl")))


@given(data=st.data())
def test_run_files_of_every_shape(folder, data):
    text = to_toml(run_table(data, "train.jsonl")).encode("utf-8", "surrogatepass")
    mutation = data.draw(st.sampled_from(["none", "none", "cut", "flip", "latin1", "deep", "huge"]))
    if mutation == "cut" and text:
        text = text[: data.draw(st.integers(0, len(text) - 1))]
    elif mutation == "flip" and text:
        at = data.draw(st.integers(0, len(text) - 1))
        text = text[:at] + bytes([text[at] ^ data.draw(st.integers(1, 255))]) + text[at + 1 :]
    elif mutation == "latin1":
        text += "caption = \"caf\xe9\"\n".encode("latin-1")
    elif mutation == "deep":
        text += b"x = " + b"[" * 100_000 + b"]" * 100_000 + b"\n"
    elif mutation == "huge":
        text += b"# " + b"x" * (2 << 20) + b"\n"
    path = folder / f"run-{next(COUNTER)}{data.draw(st.sampled_from(['.toml', '.toml', '.json', '']))}"
    path.write_bytes(text)
    check(str(path))


@given(data=st.data())
def test_set_overrides_of_every_shape(folder, data):
    table = {"composition": "ip-adapter", "data": {"path": str(folder / "train.jsonl")}, "stages": [{"train": ["injector.0"], "steps": 10}]}
    paths = st.sampled_from(["stages.0.steps", "stages.1.steps", "stages.x.steps", "stages.0.optimizer.learning_rate", "data.resolution",
                             "data.path.x", "seed", "seed.x", "stages", "stages.0", "roles.encoder.config.model", "", "a..b", "stages.0.train.0"])  # fmt: skip

    def action() -> Any:
        for _ in range(data.draw(st.integers(1, 3))):
            set_field(table, data.draw(paths), data.draw(near(st.one_of(st.integers(-1, 100), st.floats(0, 1), st.text(max_size=4)))))
        return load_train_config(table)

    config = guard(SURFACE, action)
    assert config is None or isinstance(config, TrainConfig)


@given(data=st.data())
def test_recipes_with_user_settings_merged_in(folder, data):
    registry = refcond.get_plugins().registry
    recipe = registry.get("recipe", data.draw(st.sampled_from(registry.names("recipe")))).obj
    overrides = data.draw(st.fixed_dictionaries({"data": st.just({"path": str(folder / "train.jsonl")})}, optional={"stages": near(st.lists(STAGE, max_size=2)), "seed": near(st.integers(-1, 10)), "output": near(st.just("runs/r"))}))
    check(recipe, overrides)
