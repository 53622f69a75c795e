"""What ``refcond eval`` costs over a hand-written loop, and how ``refcond ablate`` scales with cells.

Run: ``OMP_NUM_THREADS=1 python -m pytest benchmarks/test_bench_evaluation.py -q --benchmark-only -s``

**eval against a hand loop.** The same work both ways, on the tiny SD1.5 pipeline with the
``ip-adapter`` composition: 4 samples of 2 references, 2 images each, 4 denoising steps, scored by
``clip-i``, ``clip-t`` and ``dino-i`` on tiny random CLIP and DINO models (``refcond_metrics.testing``).
The hand loop loads each sample's references, calls the pipeline once per image with the image's
seed, writes the PNG, calls every metric once per sample on its images, and writes a CSV: what
``evaluate`` does, without its records, grids, resumability and summary. The variants alternate
for several rounds in one process; per image, the median over rounds of the process's CPU time
(with ``OMP_NUM_THREADS=1`` the work done; the wall clock on a shared machine moved the ratio
between 0.89 and 1.28 from run to run). Both produce the same images
(checked).

**ablate and cells.** A grid whose cells differ only in ``reference_scale`` (1, 2 and 4 cells),
after a one-cell warm-up: CPU seconds per cell with the cells sharing one built composition and its encodings (as ``ablate``
runs them), and with every cell run alone (a one-cell grid each, on the same loaded pipeline: each
builds the composition and encodes the references again, as separate ``refcond eval`` runs would).
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest

import refcond
from refcond.contracts import BuildContext
from refcond.evaluation import EvalSample, build_metrics, evaluate, image_seed
from refcond.evaluation.ablation import GridConfig, ablate
from refcond.images import load_references
from refcond.testing import reference_images, tiny_sd15_pipeline

STEPS = 4
IMAGES = 2
ROUNDS = 7
RESULTS = Path(__file__).parent / "results" / "evaluation.json"


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from refcond_metrics.testing import save_tiny_clip, save_tiny_dino

    root = tmp_path_factory.mktemp("bench-eval")
    clip, dino = save_tiny_clip(root / "clip"), save_tiny_dino(root / "dino")
    for i, image in enumerate(reference_images(8, size=64)):
        image.save(root / f"{i}.png")
    samples = [EvalSample(f"s{i}", (root / f"{2 * i}.png", root / f"{2 * i + 1}.png"), f"a photo of thing {i}", seed=10 * i) for i in range(4)]
    configs = {"clip-i": {"model": str(clip)}, "clip-t": {"model": str(clip)}, "dino-i": {"model": str(dino)}}
    return {"root": root, "samples": samples, "configs": configs}


def hand_loop(rp: Any, samples: list[EvalSample], metrics: dict[str, Any], out: Path) -> None:
    import torch

    rows = []
    for sample in samples:
        references = load_references(list(sample.references))
        images = []
        for k in range(IMAGES):
            generator = torch.Generator("cpu").manual_seed(image_seed(sample, k, 0))
            image = rp(sample.prompt, references=references, num_inference_steps=STEPS, generator=generator).images[0]
            (out / sample.id).mkdir(parents=True, exist_ok=True)
            image.save(out / sample.id / f"{k:03d}.png")
            images.append(image)
        values: dict[str, list[float]] = {}
        for metric in metrics.values():
            values.update(metric(images, [references] * IMAGES, [sample.prompt] * IMAGES))
        rows += [{"id": sample.id, "image": k, **{n: v[k] for n, v in values.items()}} for k in range(IMAGES)]
    with open(out / "samples.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_eval_against_a_hand_loop(benchmark: Any, setting: dict[str, Any], tmp_path: Path) -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    rp.pipeline.set_progress_bar_config(disable=True)
    metrics = build_metrics(setting["configs"], rp.plugins.registry, BuildContext(backbone=rp.backbone))
    samples, images = setting["samples"], len(setting["samples"]) * IMAGES
    times: dict[str, list[float]] = {"eval": [], "hand": []}

    def run(variant: str, round_: int) -> float:
        out = tmp_path / f"{variant}-{round_}"
        shutil.rmtree(out, ignore_errors=True)
        rp.clear_cache()
        started = time.process_time()  # CPU time: with one thread, the work done, which other jobs disturb far less than the wall clock
        if variant == "eval":
            evaluate(rp, samples, out, built_metrics=metrics, images_per_sample=IMAGES, num_inference_steps=STEPS, progress=False)
        else:
            hand_loop(rp, samples, metrics, out)
        return time.process_time() - started

    for round_ in range(ROUNDS):
        for variant in ("eval", "hand") if round_ % 2 == 0 else ("hand", "eval"):
            times[variant].append(run(variant, round_) / images)
    a = np.asarray(PIL.Image.open(tmp_path / "eval-0" / "images" / "s1" / "001.png"))
    b = np.asarray(PIL.Image.open(tmp_path / "hand-0" / "s1" / "001.png"))
    assert np.array_equal(a, b), "the two loops must generate the same images"
    per_image = {v: statistics.median(t) for v, t in times.items()}
    ratio = per_image["eval"] / per_image["hand"]
    paired = statistics.median(e / h for e, h in zip(times["eval"], times["hand"]))
    benchmark.extra_info.update({"suite": "evaluation", "per_image_s": per_image, "eval/hand": ratio, "eval/hand paired": paired})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n[eval] CPU time per image: eval {per_image['eval'] * 1000:.1f} ms, hand {per_image['hand'] * 1000:.1f} ms; eval/hand {ratio:.3f} (paired median {paired:.3f})")
    _record("eval_vs_hand", {"per_image_ms": {k: v * 1000 for k, v in per_image.items()}, "ratio": ratio, "paired": paired, "rounds": ROUNDS})
    rp.detach()


@pytest.mark.parametrize("cells", [1, 2, 4])
def test_ablate_seconds_per_cell(benchmark: Any, setting: dict[str, Any], tmp_path: Path, cells: int) -> None:
    data = setting["root"] / "set.jsonl"
    data.write_text("".join(json.dumps({"id": s.id, "references": [str(p) for p in s.references], "prompt": s.prompt, "seed": s.seed}) + "\n" for s in setting["samples"]))
    grid = GridConfig.model_validate({
        "base": {"composition": "ip-adapter", "data": str(data), "metrics": ["clip-i", "dino-i"], "num_inference_steps": STEPS},
        "axes": {"reference_scale": [1.0 - 0.1 * i for i in range(cells)]},
        "metric_config": {k: v for k, v in setting["configs"].items() if k != "clip-t"},
    })  # fmt: skip
    pipe = tiny_sd15_pipeline()
    ablate(grid.model_copy(update={"axes": {"reference_scale": [0.5]}}), tmp_path / "warm-up", pipeline=pipe, progress=False)
    started = time.process_time()
    ablate(grid, tmp_path / "shared", pipeline=pipe, progress=False)
    seconds = {True: (time.process_time() - started) / cells}
    started = time.process_time()
    for i, scale in enumerate(grid.axes["reference_scale"]):  # separate runs: each builds and encodes again
        ablate(grid.model_copy(update={"axes": {"reference_scale": [scale]}}), tmp_path / f"alone-{i}", pipeline=pipe, progress=False)
    seconds[False] = (time.process_time() - started) / cells
    benchmark.extra_info.update({"suite": "evaluation", "cells": cells, "seconds_per_cell": seconds})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n[ablate] {cells} cell(s): {seconds[True]:.2f} CPU s per cell with shared encodings, {seconds[False]:.2f} s without")
    _record(f"ablate_{cells}_cells", {"seconds_per_cell_shared": seconds[True], "seconds_per_cell_unshared": seconds[False]})


def _record(key: str, value: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2))
