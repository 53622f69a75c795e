"""refcond eval: evaluation sets are read and checked, every image is generated with its own seed and
scored once, a run started again loses and redoes nothing, and two processes write what one does.

Everything runs on the tiny offline models, on CPU; the metric here is a toy one computed again
independently in the tests (the CLIP and DINO metrics have their own tests)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import refcond
from refcond.cli import cli
from refcond.evaluation import EvalSample, bootstrap, evaluate, image_seed, paired_difference, read_dreambench, read_eval_set
from refcond.testing import reference_images, tiny_sd15_pipeline

STEPS = 2


def brightness(images: list[PIL.Image.Image], references: list[list[PIL.Image.Image]], prompts: list[str]) -> dict[str, list[float]]:
    """A toy metric: each image's mean brightness, and how far it is from its references' mean brightness."""
    mean = [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255) for image in images]
    refs = [float(np.mean([np.asarray(r.convert("L"), dtype=np.float64).mean() / 255 for r in group])) for group in references]
    return {"brightness": mean, "brightness-gap": [abs(a - b) for a, b in zip(mean, refs)]}


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("eval-set")
    for i, image in enumerate(reference_images(4, size=48)):
        image.save(folder / f"{i}.png")
    lines = [
        {"id": "a", "references": ["0.png", "1.png"], "prompt": "a photo of thing a", "seed": 11},
        {"id": "b", "references": ["2.png", "3.png", "0.png"], "prompt": "thing b"},
        {"references": ["3.png"], "prompt": "the third, no id, no seed"},
    ]
    (folder / "set.jsonl").write_text("# an evaluation set\n" + "".join(json.dumps(line) + "\n" for line in lines))
    return folder / "set.jsonl"


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# -- evaluation sets -----------------------------------------------------------------------------------


def test_an_evaluation_set_is_read_with_paths_relative_to_it(eval_set: Path) -> None:
    samples = read_eval_set(eval_set)
    assert [s.id for s in samples] == ["a", "b", "000004"]  # a missing id is the line number
    assert samples[0].references == (eval_set.parent / "0.png", eval_set.parent / "1.png") and samples[0].seed == 11
    assert samples[1].seed is None and samples[2].prompt == "the third, no id, no seed"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "x", "references": ["a.png"], "prompt": "p"}', '{"id": "x", "references": ["b.png"], "prompt": "q"}'], r":2: id 'x' is used on line 1 too"),
        (['{"references": ["a.png", "b.png"], "prompt": "p", "captions": ["one"]}'], r":1: 1 captions for 2 references"),
        (['{"references": [], "prompt": "p"}'], r":1:\n  - references: List should have at least 1 item"),
        (['{"references": ["a.png"], "prompt": "p", "sede": 3}'], r":1:\n  - unknown field 'sede'\. Did you mean 'seed'\?"),
        (['{"references": ["a.png"], "prompt": "p", "id": "a/b"}'], r":1:\n  - id: 'a/b' is not a sample id"),
        (["[1, 2]"], r":1: a sample is a JSON object"),
        (["{oops"], r":1: not a JSON line"),
        (["# nothing but a comment"], r"has no samples"),
    ],
)
def test_a_bad_evaluation_set_names_the_line_and_the_field(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(refcond.ConfigError, match=message):
        read_eval_set(path)


def test_a_dreambench_folder_pairs_every_subject_with_every_prompt(tmp_path: Path) -> None:
    for subject, count in (("red_cup", 3), ("dog", 2)):
        (tmp_path / subject).mkdir()
        for i, image in enumerate(reference_images(count, seed=len(subject))):
            image.save(tmp_path / subject / f"{i:02d}.jpg")
    (tmp_path / "notes").mkdir()  # no images: not a subject
    (tmp_path / "prompts.txt").write_text("a {0} {1} on the beach\n\n# a comment\na photo of {}\n")
    samples = read_dreambench(tmp_path, tmp_path / "prompts.txt", max_references=2)
    assert [(s.id, s.prompt, len(s.references)) for s in samples] == [
        ("dog-000", "a dog dog on the beach", 2),
        ("dog-001", "a photo of dog", 2),
        ("red_cup-000", "a red cup red cup on the beach", 2),
        ("red_cup-001", "a photo of red cup", 2),
    ]
    assert refcond.evaluation.load_eval_set(tmp_path) == read_dreambench(tmp_path, tmp_path / "prompts.txt")  # a folder reads its prompts.txt


# -- statistics ----------------------------------------------------------------------------------------


def test_bootstrap_intervals_match_an_independent_resampling() -> None:
    values = list(np.random.default_rng(1).normal(0.5, 0.1, size=200))
    estimate = bootstrap(values, seed=3, resamples=4000)
    assert estimate.mean == pytest.approx(float(np.mean(values))) and estimate.n == 200
    half = 1.96 * float(np.std(values, ddof=1)) / np.sqrt(200)  # the normal approximation the bootstrap should agree with
    assert estimate.low == pytest.approx(estimate.mean - half, abs=0.15 * half)
    assert estimate.high == pytest.approx(estimate.mean + half, abs=0.15 * half)
    assert bootstrap(values, seed=3, resamples=4000) == estimate  # reproducible
    assert bootstrap([0.7] * 5) == refcond.evaluation.Estimate(0.7, 0.7, 0.7, 5)
    assert bootstrap([]).n == 0 and np.isnan(bootstrap([]).mean)
    better = [v + 0.05 for v in values]
    difference = paired_difference(better, values)
    assert difference.mean == pytest.approx(0.05) and difference.high - difference.low < 1e-9  # paired: no spread at all


# -- evaluate --------------------------------------------------------------------------------------------


def counting(rp: refcond.RefcondPipeline) -> list[int]:
    """Count the pipeline's generations (wraps the diffusers pipeline's __call__)."""
    calls: list[int] = []
    original = rp.pipeline.__class__.__call__

    class Counting(rp.pipeline.__class__):  # type: ignore[misc, name-defined]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return original(self, *args, **kwargs)

    rp.pipeline.__class__ = Counting
    return calls


def test_evaluate_generates_each_image_with_its_seed_scores_it_and_summarises(eval_set: Path, tmp_path: Path) -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    result = evaluate(rp, eval_set, tmp_path / "eval", built_metrics={"brightness": brightness}, images_per_sample=2, seed=5,
                      num_inference_steps=STEPS, progress=False)  # fmt: skip
    out = tmp_path / "eval"
    rows = rows_of(out / "samples.csv")
    assert [(r["id"], r["image"]) for r in rows] == [("a", "0"), ("a", "1"), ("b", "0"), ("b", "1"), ("000004", "0"), ("000004", "1")]
    assert [int(r["seed"]) for r in rows[:2]] == [11, 12]  # the sample's seed, then +1
    samples = read_eval_set(eval_set)
    for row in rows:
        sample = next(s for s in samples if s.id == row["id"])
        image = PIL.Image.open(out / row["path"]).convert("RGB")
        expected = brightness([image], [[PIL.Image.open(p).convert("RGB") for p in sample.references]], [sample.prompt])
        assert float(row["brightness"]) == pytest.approx(expected["brightness"][0])
        assert float(row["brightness-gap"]) == pytest.approx(expected["brightness-gap"][0])
    # Image 1 of sample b is what one call with its seed gives.
    b = samples[1]
    alone = rp("thing b", references=[str(p) for p in b.references], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(image_seed(b, 1, 5))).images[0]
    assert np.array_equal(np.asarray(alone), np.asarray(PIL.Image.open(out / "images" / "b" / "001.png")))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 6 and summary["metrics"]["brightness"]["mean"] == pytest.approx(np.mean([float(r["brightness"]) for r in rows]))
    assert result.summary["brightness"].low <= result.summary["brightness"].mean <= result.summary["brightness"].high
    assert "| brightness |" in (out / "summary.md").read_text()
    grid = PIL.Image.open(out / "grids" / "b.jpg")
    assert grid.size == (3 * 32, 2 * 32)  # three references over two images, at the tiny pipeline's 32 px
    rp.detach()


def test_a_run_started_again_redoes_only_what_is_missing(eval_set: Path, tmp_path: Path) -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    out = tmp_path / "eval"
    evaluate(rp, eval_set, out, built_metrics={"brightness": brightness}, images_per_sample=2, num_inference_steps=STEPS, progress=False)
    first = (out / "samples.csv").read_text()
    calls = counting(rp)

    (out / "images" / "b" / "001.json").unlink()  # killed after writing the image, before its record
    (out / "images" / "000004" / "000.png").unlink()  # killed before writing the image
    (out / "images" / "000004" / "000.json").unlink()
    (out / "images" / "a" / "000.json").write_text("{trunc")  # killed while writing (atomic writes prevent it; a damaged file is redone)
    evaluate(rp, eval_set, out, built_metrics={"brightness": brightness}, images_per_sample=2, num_inference_steps=STEPS, progress=False)
    assert len(calls) == 1, "only the missing image is generated again"
    assert (out / "samples.csv").read_text() == first

    def darkness(images: list[PIL.Image.Image], references: Any, prompts: Any) -> dict[str, list[float]]:
        return {"darkness": [1 - v for v in brightness(images, references, prompts)["brightness"]]}

    evaluate(rp, eval_set, out, built_metrics={"brightness": brightness, "darkness": darkness}, images_per_sample=2, num_inference_steps=STEPS, progress=False)
    assert len(calls) == 1, "a new metric scores the images already there"
    rows = rows_of(out / "samples.csv")
    assert all(float(r["darkness"]) == pytest.approx(1 - float(r["brightness"])) for r in rows)
    rp.detach()


def test_a_metric_must_give_one_value_per_image(eval_set: Path, tmp_path: Path) -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    with pytest.raises(refcond.ConfigError, match="metric 'one' returned 1 values of 'one' for 2 images"):
        evaluate(rp, eval_set, tmp_path, built_metrics={"one": lambda i, r, p: {"one": [0.0]}}, images_per_sample=2, num_inference_steps=STEPS, progress=False)
    with pytest.raises(refcond.UnknownComponentError, match="clip-j"):
        evaluate(rp, eval_set, tmp_path, metrics=["clip-j"], progress=False)
    rp.detach()


SCRIPT = """
import sys
import refcond
from refcond.evaluation import evaluate
from refcond.testing import tiny_sd15_pipeline
sys.path.insert(0, {tests!r})
from test_evaluation import brightness
rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
evaluate(rp, {data!r}, {out!r}, built_metrics={{"brightness": brightness}}, images_per_sample=2, num_inference_steps={steps}, progress=False)
"""


def test_two_processes_write_the_csv_one_process_writes(eval_set: Path, tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), data=str(eval_set), out=str(tmp_path / "two"), steps=STEPS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    evaluate(rp, eval_set, tmp_path / "one", built_metrics={"brightness": brightness}, images_per_sample=2, num_inference_steps=STEPS, progress=False)
    assert (tmp_path / "two" / "samples.csv").read_text() == (tmp_path / "one" / "samples.csv").read_text()
    rp.detach()


# -- the command line --------------------------------------------------------------------------------


def test_the_cli_checks_its_input_before_loading_a_model(eval_set: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"), "-m", "./nowhere"])
    assert result.exit_code == 1 and "missing.jsonl' is not a file" in result.output
    result = runner.invoke(cli, ["eval", "--data", str(eval_set), "--out", str(tmp_path / "o"), "--metrics", "clip-i", "--metric-set", "dino-i.model=x"])
    assert result.exit_code == 2 and "--metric-set names ['dino-i'], which --metrics does not compute" in result.output
    result = runner.invoke(cli, ["eval", "--data", str(eval_set), "--out", str(tmp_path / "o"), "--metric-set", "clip-i=x"])
    assert result.exit_code == 2 and "expected METRIC.FIELD=VALUE" in result.output


def test_samples_can_be_given_in_python(tmp_path: Path) -> None:
    refs = reference_images(2)
    for i, image in enumerate(refs):
        image.save(tmp_path / f"{i}.png")
    samples = [EvalSample("x", (tmp_path / "0.png", tmp_path / "1.png"), "a prompt", seed=3)]
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    result = evaluate(rp, samples, tmp_path / "out", built_metrics={"brightness": brightness}, max_references=1, num_inference_steps=STEPS, progress=False)
    assert result.rows[0]["references"] == 1 and result.rows[0]["seed"] == 3
    rp.detach()


def test_the_cli_evaluates_with_the_metric_plugins(eval_set: Path, tmp_path: Path) -> None:
    from refcond_metrics.testing import save_tiny_clip, save_tiny_dino

    tiny_sd15_pipeline().save_pretrained(tmp_path / "sd15")
    clip, dino = save_tiny_clip(tmp_path / "clip"), save_tiny_dino(tmp_path / "dino")
    args = ["eval", "--data", str(eval_set), "--out", str(tmp_path / "out"), "-m", str(tmp_path / "sd15"), "--steps", "2",
            "--metrics", "clip-i,clip-t,dino-i", "--metric-set", f"clip-i.model={clip}", "--metric-set", f"clip-t.model={clip}",
            "--metric-set", f"dino-i.model={dino}", "--json", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 3 and set(report["metrics"]) == {"clip-i", "clip-t", "dino-i"}
    rows = rows_of(tmp_path / "out" / "samples.csv")
    assert all(-1 <= float(r[m]) <= 1 for r in rows for m in ("clip-i", "clip-t", "dino-i"))
