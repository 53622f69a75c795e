"""refcond ablate: every cell of a grid is evaluated on the same samples and seeds, cells that cannot
be built are reported while the others run, and the tables, paired differences and plots agree
with the cells' own numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import refcond
from refcond.cli import cli
from refcond.evaluation import ablation
from refcond.evaluation.ablation import ablate, cells_of, read_grid
from refcond.testing import reference_images, tiny_sd15_pipeline

GRID = """
[base]
composition = "ip-adapter"
data = "set.jsonl"
metrics = ["brightness"]
num_inference_steps = 2
seed = 3

[axes]
"aggregator.name" = ["mean", "concat"]
reference_scale = [1.0, 0.0]
"injectors.0.config.projector" = ["linear", "nope"]
"""


class ToyMetrics:
    __name__ = "toy-metrics"

    @refcond.hookimpl
    def refcond_register_metrics(self, register: Any) -> None:
        def brightness(config: Any, context: Any) -> Any:
            def metric(images: list[PIL.Image.Image], references: Any, prompts: Any) -> dict[str, list[float]]:
                return {"brightness": [float(np.asarray(i.convert("L"), dtype=np.float64).mean() / 255) for i in images]}

            return metric

        register("brightness", brightness, config=refcond.EmptyConfig, description="Mean brightness of each image.")


@pytest.fixture
def grid_file(tmp_path: Path) -> Path:
    for i, image in enumerate(reference_images(3, size=48)):
        image.save(tmp_path / f"{i}.png")
    lines = [{"id": f"s{i}", "references": [f"{i}.png", f"{(i + 1) % 3}.png"], "prompt": f"thing {i}", "seed": i} for i in range(3)]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "grid.toml").write_text(GRID)
    return tmp_path / "grid.toml"


def plugins() -> refcond.Plugins:
    loaded = refcond.load_plugins()
    loaded.register(ToyMetrics(), name="toy-metrics")
    return loaded


def column(path: Path, name: str) -> list[float]:
    with open(path, newline="") as handle:
        return [float(row[name]) for row in csv.DictReader(handle)]


def test_a_grid_runs_every_buildable_cell_pairs_them_with_the_base_and_plots(grid_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds, encodes = [], []
    build = ablation._build

    def counted(*args: Any) -> Any:
        builds.append(args[1].name)
        rp = build(*args)
        encode = rp.encoder.encode
        rp.encoder.encode = lambda *a, **k: encodes.append(1) or encode(*a, **k)
        return rp

    monkeypatch.setattr(ablation, "_build", counted)
    monkeypatch.setattr(refcond.pipeline, "_CACHE_SIZE", 1)  # a pipeline alone keeps one condition: fewer than the set's samples
    result = ablate(read_grid(grid_file), tmp_path / "out", pipeline=tiny_sd15_pipeline(), plugins=plugins(), progress=False)
    out = tmp_path / "out"

    cells = {c.name: c for c in result.cells}
    assert len(cells) == 8 and result.cells[0].base and result.cells[0].values == {"aggregator.name": "mean", "reference_scale": 1.0, "injectors.0.config.projector": "linear"}
    broken = [c for c in result.cells if c.values["injectors.0.config.projector"] == "nope"]
    assert all(c.error and "projector" in c.error for c in broken) and all(not (out / "cells" / c.name).exists() for c in broken)
    ran = [c for c in result.cells if c.error is None]
    assert len(ran) == 4 and len(builds) == 2, "cells differing only in reference_scale share one built composition"
    assert len(encodes) == 2 * 3, "and its encodings: each of the 3 samples is encoded once per built composition"

    def mean_of(values: dict[str, Any]) -> list[float]:
        (cell,) = [c for c in ran if all(c.values[k] == v for k, v in values.items())]
        return column(out / "cells" / cell.name / "samples.csv", "brightness")

    # At reference scale 0 the references have no effect: the two aggregators give the same images.
    assert mean_of({"aggregator.name": "mean", "reference_scale": 0.0}) == mean_of({"aggregator.name": "concat", "reference_scale": 0.0})
    assert mean_of({"aggregator.name": "mean", "reference_scale": 1.0}) != mean_of({"aggregator.name": "concat", "reference_scale": 1.0})

    with open(out / "results.csv", newline="") as handle:
        results = {row["cell"]: row for row in csv.DictReader(handle)}
    for cell in ran:
        assert float(results[cell.name]["mean"]) == pytest.approx(np.mean(column(out / "cells" / cell.name / "samples.csv", "brightness")))
    assert all(results[c.name]["error"] for c in broken)
    base = column(out / "cells" / result.cells[0].name / "samples.csv", "brightness")
    with open(out / "paired.csv", newline="") as handle:
        paired = {row["cell"]: row for row in csv.DictReader(handle)}
    for cell in ran[1:]:
        mine = column(out / "cells" / cell.name / "samples.csv", "brightness")
        assert float(paired[cell.name]["difference"]) == pytest.approx(np.mean(np.subtract(mine, base)))
    assert "(base)" in (out / "results.md").read_text() and "error: " in (out / "results.md").read_text()
    assert PIL.Image.open(out / "plots" / "brightness.png").size[0] > 3 * 300  # a panel per axis
    assert [c["name"] for c in json.loads((out / "grid.json").read_text())["cells"]] == list(cells)

    # Started again, the grid finds every cell done: nothing is generated, and the tables are the same.
    generations = []
    call = refcond.RefcondPipeline.__call__
    monkeypatch.setattr(refcond.RefcondPipeline, "__call__", lambda self, *a, **k: generations.append(1) or call(self, *a, **k))
    table = (out / "results.csv").read_text()
    ablate(read_grid(grid_file), out, pipeline=tiny_sd15_pipeline(), plugins=plugins(), progress=False)
    assert not generations and (out / "results.csv").read_text() == table


def test_a_dry_run_lists_the_cells_and_loads_nothing(grid_file: Path, tmp_path: Path) -> None:
    result = ablate(grid_file, tmp_path / "out", plugins=plugins(), dry_run=True)  # no model is named: nothing may load
    assert [c.base for c in result.cells] == [True] + [False] * 7
    assert not (tmp_path / "out" / "cells").exists()
    listed = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert len(listed["cells"]) == 8 and sum(1 for c in listed["cells"] if c["error"]) == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('[axes]\n"unet.x" = [1]\n', r"axis 'unet\.x' is neither a composition path"),
        ('[axes]\naggregator = ["mean"]\n', r"axis 'aggregator' names a role but no field"),
        ('[axes]\nreference_scale = []\n', r"axis 'reference_scale' has no values"),
        ('[axes]\nreference_scale = [1.0]\n[base]\ndata = "set.jsonl"\nmetrics = ["clip-j"]\n', r"unknown metric 'clip-j'"),
    ],
)
def test_a_bad_grid_is_refused_before_anything_loads(grid_file: Path, tmp_path: Path, change: str, message: str) -> None:
    text = change if "[base]" in change else '[base]\ndata = "set.jsonl"\nmetrics = ["brightness"]\n' + change
    grid_file.write_text(text)
    with pytest.raises(refcond.RefcondError, match=message):
        ablate(grid_file, tmp_path / "out", plugins=plugins(), dry_run=True)


def test_the_cli_lists_the_cells_of_a_dry_run(grid_file: Path, tmp_path: Path) -> None:
    grid_file.write_text(GRID.replace('metrics = ["brightness"]', 'metrics = ["clip-i"]'))
    result = CliRunner().invoke(cli, ["ablate", str(grid_file), "--out", str(tmp_path / "out"), "--dry-run", "--json"])
    if "unknown metric 'clip-i'" in result.output:
        pytest.skip("the refcond-metrics distribution is not installed")
    assert result.exit_code == 0, result.output
    cells = json.loads(result.stdout)["cells"]
    assert len(cells) == 8 and cells[0]["base"] and cells[0]["name"] == "aggregator.name=mean,reference_scale=1.0,injectors.0.config.projector=linear"
    assert len(cells_of(read_grid(grid_file))) == 8


def test_the_documented_grid_and_evaluation_set_are_valid(tmp_path: Path) -> None:
    import tomllib

    from refcond.evaluation import read_eval_set
    from refcond.evaluation.ablation import GridConfig
    from tests.test_docs import DOCS, code_blocks

    blocks = code_blocks(DOCS / "evaluation.md")
    (grid,) = [b for b in blocks if b.lang == "toml"]
    config = refcond.config.validate_config(GridConfig, tomllib.loads(grid.code), where="docs/evaluation.md")
    assert len(cells_of(config)) == 12  # as the page says
    (jsonl,) = [b for b in blocks if b.lang == "json"]
    (tmp_path / "set.jsonl").write_text(jsonl.code)
    assert [s.id for s in read_eval_set(tmp_path / "set.jsonl")] == ["dog-beach", "cat-0"]


def test_the_worked_ablation_runs_as_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shlex

    from tests.test_docs import DOCS, code_blocks

    monkeypatch.chdir(tmp_path)
    page = (DOCS / "evaluation.md").read_text()
    blocks = [b for b in code_blocks(DOCS / "evaluation.md") if b.section == "A worked ablation on CPU"]
    (python,) = [b for b in blocks if b.runs]
    exec(compile(python.code, f"evaluation.md:{python.line}", "exec"), {})
    (command,) = [b for b in blocks if b.lang == "bash"]
    args = shlex.split(command.code)
    assert args[:2] == ["refcond", "ablate"]
    result = CliRunner().invoke(cli, [*args[1:], "--quiet"])
    assert result.exit_code == 0, result.output
    produced = (tmp_path / "runs" / "ablation" / "results.md").read_text().split("\n\n", 1)[1].strip().splitlines()
    shown = [line for line in page.splitlines() if line.startswith("| aggregator.name=") or line.startswith("| cell | clip-i")]
    assert [row.split(" | ")[0] for row in produced[2:]] == [row.split(" | ")[0] for row in shown[1:]], "the page shows the cells the grid makes"
    assert produced[0] == shown[0]
    assert (tmp_path / "runs" / "ablation" / "plots" / "clip-i.png").is_file() and (DOCS / "assets" / "ablation-clip-i.png").is_file()
