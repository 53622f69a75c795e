"""The offline demo: ``refcond.demo.run_demo`` and ``refcond demo``."""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import refcond
import refcond.aggregators
from refcond.cli import CliState, cli
from refcond.demo import run_demo
from refcond.testing import IMAGE_SIZE

REPORT_KEYS = {
    "refcond_version", "versions", "plugins", "plugin_failures", "composition", "backbone", "prompt", "steps", "seed",
    "guidance_scale", "reference_scale", "num_references", "condition_shape", "unconditional_shape", "image_size",
    "image_sha256", "timings", "outputs",
}  # fmt: skip


def test_run_demo_writes_the_image_the_references_and_the_report(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, steps=2, seed=0)

    assert set(report) == REPORT_KEYS
    assert json.loads((out / "report.json").read_text()) == report  # the file holds exactly the returned report
    assert sorted(p.name for p in out.iterdir()) == ["demo.png", "reference_0.png", "reference_1.png", "reference_2.png", "report.json"]
    with PIL.Image.open(out / "demo.png") as image:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    assert report["outputs"]["image"] == str((out / "demo.png").resolve())
    assert [Path(p).name for p in report["outputs"]["references"]] == ["reference_0.png", "reference_1.png", "reference_2.png"]

    comp = report["composition"]
    assert comp["name"] == "ip-adapter" and comp["backbone"]["name"] == "sd15" == report["backbone"]
    assert [comp["encoder"]["name"], comp["aggregator"]["name"]] == ["clip", "mean"]
    assert report["condition_shape"] == report["unconditional_shape"]
    assert report["condition_shape"][0] == 1 and report["num_references"] == 3
    assert set(report["timings"]) == {"models", "build", "encode", "generate", "write", "total"}
    assert all(seconds >= 0 for seconds in report["timings"].values())
    plugins = {p["name"]: p["version"] for p in report["plugins"]}
    assert plugins["refcond-aggregators"] == refcond.__version__ == report["refcond_version"]
    assert report["versions"]["torch"] == torch.__version__


def test_run_demo_is_deterministic_and_leaves_the_callers_state_alone(tmp_path):
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    first = run_demo(tmp_path / "a", steps=1, seed=3)
    again = run_demo(tmp_path / "b", steps=1, seed=3)
    other = run_demo(tmp_path / "c", steps=1, seed=4)
    assert first["image_sha256"] == again["image_sha256"] != other["image_sha256"]
    assert (tmp_path / "a" / "demo.png").read_bytes() == (tmp_path / "b" / "demo.png").read_bytes()
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)


def test_demo_command_prints_where_the_files_are(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "d"), "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert f"Demo image:  {(tmp_path / 'd' / 'demo.png').resolve()}" in result.stdout
    assert f"Report:      {(tmp_path / 'd' / 'report.json').resolve()}" in result.stdout
    assert "Generating (1 steps)" in result.stderr

    as_json = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "j"), "--steps", "1", "--json", "--quiet"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == json.loads((tmp_path / "j" / "report.json").read_text())
    assert as_json.stderr == ""


def test_demo_without_the_ip_adapter_composition_is_a_clean_error(tmp_path):
    plugins = refcond.from_modules(refcond.aggregators)
    with pytest.raises(refcond.UnknownComponentError, match="unknown composition 'ip-adapter'"):
        run_demo(tmp_path, plugins=plugins)
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path)], obj=CliState(plugins))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: unknown composition 'ip-adapter'.") and "refcond plugins" in result.stderr
    assert not any(tmp_path.iterdir())  # failed before writing anything
