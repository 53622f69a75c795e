"""docs/training.md: the worked example runs as written (Python and command line), the config
example validates, and every field of a run and of a stage is documented."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from refcond.cli import cli
from refcond.training import StageConfig, TrainConfig
from tests.test_docs import DOCS, code_blocks

GUIDE = DOCS / "training.md"


def test_the_worked_example_trains_loads_and_generates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (example,) = [b for b in code_blocks(GUIDE) if b.section == "A worked example on CPU" and b.runs]
    namespace: dict = {}
    exec(compile(example.code, f"{GUIDE.name}:{example.line}", "exec"), namespace)
    result = namespace["result"]
    assert result.checkpoint == Path("runs/tiny/model.safetensors") and result.checkpoint.is_file()
    assert Path("runs/tiny/exports/ip-adapter.safetensors").is_file()
    assert namespace["image"].mode == "RGB"
    losses = [line["loss"] for line in map(__import__("json").loads, Path("runs/tiny/metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5]), f"the worked example's loss did not go down: {losses}"

    # The same run from the command line, exactly as the guide writes it.
    (command,) = [b for b in code_blocks(GUIDE) if b.section == "A worked example on CPU" and b.lang == "bash"]
    args = shlex.split(command.code.replace("\\\n", " "))
    assert args[:2] == ["refcond", "train"]
    outcome = CliRunner().invoke(cli, [*args[1:], "--quiet"])
    assert outcome.exit_code == 0, outcome.output
    assert Path("runs/cli/model.safetensors").is_file() and Path("runs/cli/exports/ip-adapter.safetensors").is_file()


def test_the_config_example_validates_and_loads_from_python(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (toml,) = [b for b in code_blocks(GUIDE) if b.lang == "toml" and b.section == "The training config"]
    Path("my-run.toml").write_text(toml.code)
    Path("refs.jsonl").write_text('{"references": ["a.png"], "image": "b.png", "caption": "x"}\n')
    (python,) = [b for b in code_blocks(GUIDE) if b.section == "From Python" and b.runs]
    namespace: dict = {}
    exec(compile(python.code, f"{GUIDE.name}:{python.line}", "exec"), namespace)
    config = namespace["config"]
    assert config.seed == 1 and config.output == "runs/seed-1"
    assert config.stages[0].train == ["aggregator", "injector.cross-attention"] and config.stages[0].loss.snr_gamma == 5.0


@pytest.mark.parametrize("model", [TrainConfig, StageConfig])
def test_every_field_is_documented(model: type) -> None:
    text = GUIDE.read_text(encoding="utf-8")
    names = [field.alias or name for name, field in model.model_fields.items()]
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"docs/training.md does not document {model.__name__} fields {missing}"
