"""``refcond eval``: generate every sample of an evaluation set and score the images with metric plugins.

For each sample, ``images_per_sample`` images are generated from its references and prompt, image
``k`` with seed ``sample.seed + k`` (or, when the set gives none, a seed derived from the run's
seed and the sample's id), so the same set gives the same images in any run, any order and any
number of processes. The references are encoded once per sample (the pipeline caches the
condition). Each image is written with a record of its seed and metric values
(``images/<id>/<k>.png`` and ``.json``, atomically); a run started again skips every image whose
record holds all the requested metrics, scores the images that lack some, and regenerates only what
is missing, so a killed run loses nothing. Across processes (``accelerate launch`` / ``torchrun``)
the samples are split with accelerate's ``split_between_processes``; the main process then writes
``samples.csv`` (one row per image), ``summary.json`` and ``summary.md`` (each metric's mean with
its 95 % bootstrap interval), and every sample has a grid (its references, then its images) in
``grids/<id>.jpg`` (JPEG: a PNG of it costs as much as a tiny model's image).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from tqdm.auto import tqdm

from refcond.building import derive_seed
from refcond.config import validate_config
from refcond.contracts import BuildContext
from refcond.errors import ConfigError
from refcond.evaluation.datasets import EvalSample, load_eval_set
from refcond.evaluation.statistics import Estimate, bootstrap
from refcond.files import atomic_write, write_image, write_json
from refcond.images import load_references

#: The metrics an evaluation computes unless told otherwise (the ``refcond-metrics`` distribution).
DEFAULT_METRICS = ("clip-i", "clip-t", "dino-i")
#: Images per sample at most.
MAX_IMAGES_PER_SAMPLE = 1000
#: Largest side of a reference or generated image in a sample's grid (cells are the generated images' size up to it).
GRID_CELL = 256


@dataclass
class EvalResult:
    """A finished evaluation: its folder, one row per image, and each metric's estimate."""

    out: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Estimate] = field(default_factory=dict)


def build_metrics(metrics: Sequence[str] | Mapping[str, Mapping[str, Any]], registry: Any, context: BuildContext | None = None) -> dict[str, Any]:
    """Build each named metric once: ``{"clip-i": {"model": ...}}`` or ``["clip-i", ...]`` (default configs)."""
    specs = {name: {} for name in metrics} if not isinstance(metrics, Mapping) else {name: dict(cfg or {}) for name, cfg in metrics.items()}
    if not specs:
        raise ConfigError("no metric to compute: name at least one (e.g. clip-i).")
    built = {}
    for name, config in specs.items():
        entry = registry.get("metric", name)  # unknown names list the registered ones
        built[name] = entry.obj(validate_config(entry.config, config, where=f"metric {name!r}"), context or BuildContext())
    return built


def evaluate(
    rp: Any,
    data: str | Path | Sequence[EvalSample],
    out: str | Path,
    *,
    metrics: Sequence[str] | Mapping[str, Mapping[str, Any]] = DEFAULT_METRICS,
    images_per_sample: int = 1,
    seed: int = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    reference_scale: float | dict[str, Any] = 1.0,
    negative_prompt: str | None = None,
    max_references: int | None = None,
    built_metrics: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Generate and score every sample of ``data`` with ``rp`` into ``out`` (see the module docstring).

    :param rp: a :class:`refcond.RefcondPipeline`.
    :param data: a JSONL evaluation set, a DreamBench-style folder, or a list of :class:`EvalSample`.
    :param metrics: registered metric names, or names mapped to their configs.
    :param max_references: use at most this many references of each sample (for ablations over the count).
    :param built_metrics: metrics already built (by :func:`build_metrics`), to share them across evaluations.
    :returns: the rows of ``samples.csv`` and the summary, on every process.
    """
    from accelerate import PartialState

    if not 1 <= images_per_sample <= MAX_IMAGES_PER_SAMPLE:
        raise ConfigError(f"images_per_sample must be 1 to {MAX_IMAGES_PER_SAMPLE}, got {images_per_sample}.")
    if max_references is not None and max_references < 1:
        raise ConfigError(f"max_references must be at least 1, got {max_references}.")
    samples = load_eval_set(data)
    scorers = dict(built_metrics) if built_metrics is not None else build_metrics(metrics, rp.plugins.registry, BuildContext(backbone=rp.backbone))
    names = sorted(scorers)
    out = Path(out)
    state = PartialState()
    call = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "negative_prompt": negative_prompt}
    call = {k: v for k, v in call.items() if v is not None}
    with state.split_between_processes(samples) as mine:
        bar = tqdm(mine, desc="evaluating", unit="sample", disable=not (progress and state.is_main_process), dynamic_ncols=True)
        for sample in bar:
            _evaluate_sample(rp, sample, out, scorers, names, images_per_sample, seed, reference_scale, max_references, call)
    state.wait_for_everyone()
    records = [_read_record(_record_path(out, sample, k)) for sample in samples for k in range(images_per_sample)]
    columns = list(dict.fromkeys(column for record in records for column in record.get("metrics", {})))
    rows = [_row(sample, k, record, columns) for (sample, k), record in zip(((s, k) for s in samples for k in range(images_per_sample)), records)]
    summary = {column: bootstrap([row[column] for row in rows], seed=seed) for column in columns}
    if state.is_main_process:
        _write_table(out / "samples.csv", rows, columns)
        write_json(out / "summary.json", {"samples": len(samples), "images": len(rows), "metrics": {n: vars(e) for n, e in summary.items()}})
        atomic_write(out / "summary.md", lambda tmp: tmp.write_text(summary_markdown(summary, len(samples), len(rows)), encoding="utf-8"))
    state.wait_for_everyone()
    return EvalResult(out, rows, summary)


def image_seed(sample: EvalSample, k: int, seed: int) -> int:
    """The seed of image ``k`` of ``sample``: the sample's own plus ``k``, or derived from the run's seed and the id."""
    base = sample.seed if sample.seed is not None else derive_seed("eval", seed, sample.id)
    return (base + k) % 2**63


def summary_markdown(summary: Mapping[str, Estimate], samples: int, images: int) -> str:
    """A Markdown table: each metric's mean and 95 % bootstrap interval."""
    lines = [f"{samples} samples, {images} images; means with 95 % bootstrap intervals.", "", "| metric | mean | 95 % CI | n |", "| --- | --- | --- | --- |"]
    for name, est in summary.items():
        lines.append(f"| {name} | {est.mean:.4f} | [{est.low:.4f}, {est.high:.4f}] | {est.n} |")
    return "\n".join(lines) + "\n"


# -- one sample --------------------------------------------------------------------------------------


def _evaluate_sample(
    rp: Any,
    sample: EvalSample,
    out: Path,
    scorers: Mapping[str, Any],
    names: list[str],
    count: int,
    seed: int,
    reference_scale: float | dict[str, Any],
    max_references: int | None,
    call: Mapping[str, Any],
) -> None:
    records = [_read_record(_record_path(out, sample, k)) for k in range(count)]
    if all(set(names) <= set(r.get("scored", [])) for r in records) and _grid_path(out, sample).is_file():
        return
    paths = sample.references[:max_references] if max_references is not None else sample.references
    references = load_references(list(paths))
    images: list[PIL.Image.Image] = []
    for k in range(count):
        path = _image_path(out, sample, k)
        image = _read_image(path)
        if image is None:
            generator = torch.Generator("cpu").manual_seed(image_seed(sample, k, seed))
            kwargs: dict[str, Any] = {"references": references, "reference_scale": reference_scale, **call}
            if sample.captions:  # for injectors that learn from the references (lora-tuning)
                kwargs["reference_captions"] = list(sample.captions[: len(references)])
            image = rp(sample.prompt, generator=generator, **kwargs).images[0]
            write_image(path, image)
        images.append(image)
    missing = [name for name in names if any(name not in r.get("scored", []) for r in records)]
    values: dict[str, list[float]] = {}
    for name in missing:
        scored = scorers[name](images, [references] * count, [sample.prompt] * count)
        for key, column in scored.items():
            if len(column) != count:
                raise ConfigError(f"metric {name!r} returned {len(column)} values of {key!r} for {count} images: one per image is the contract.")
            values[key] = [float(v) for v in column]
    for k in range(count):
        record = {"id": sample.id, "image": k, "seed": image_seed(sample, k, seed), "prompt": sample.prompt, "references": len(references),
                  "scored": sorted({*records[k].get("scored", []), *missing}),
                  "metrics": {**records[k].get("metrics", {}), **{column: v[k] for column, v in values.items()}}}  # fmt: skip
        write_json(_record_path(out, sample, k), record)
    _write_grid(_grid_path(out, sample), references, images)


def _image_path(out: Path, sample: EvalSample, k: int) -> Path:
    return out / "images" / sample.id / f"{k:03d}.png"


def _record_path(out: Path, sample: EvalSample, k: int) -> Path:
    return out / "images" / sample.id / f"{k:03d}.json"


def _grid_path(out: Path, sample: EvalSample) -> Path:
    return out / "grids" / f"{sample.id}.jpg"


def _read_record(path: Path) -> dict[str, Any]:
    """A finished image's record, or ``{}`` when it is missing or unreadable (the image is then redone)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("metrics"), dict) else {}


def _read_image(path: Path) -> PIL.Image.Image | None:
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, PIL.Image.DecompressionBombError):
        return None


def _row(sample: EvalSample, k: int, record: Mapping[str, Any], columns: list[str]) -> dict[str, Any]:
    metrics = record.get("metrics", {})
    values = {column: float(metrics[column]) if metrics.get(column) is not None else math.nan for column in columns}
    return {"id": sample.id, "image": k, "seed": record.get("seed"), "prompt": sample.prompt, "references": record.get("references"),
            "path": f"images/{sample.id}/{k:03d}.png", **values}  # fmt: skip


def _write_table(path: Path, rows: list[dict[str, Any]], metrics: list[str]) -> None:
    columns = ["id", "image", "seed", "prompt", "references", "path", *metrics]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))


def _write_grid(path: Path, references: list[PIL.Image.Image], images: list[PIL.Image.Image]) -> None:
    """References on the first row, generated images on the second, each in a square cell."""
    from diffusers.utils import make_image_grid

    side = min(GRID_CELL, max(image.width for image in images))  # no larger than the generated images
    cells = [image.convert("RGB").resize((side, side)) for image in [*references, *images]]
    cols = max(len(references), len(images))
    blank = PIL.Image.new("RGB", (side, side), "white")
    rows = [*cells[: len(references)], *[blank] * (cols - len(references)), *cells[len(references) :], *[blank] * (cols - len(images))]
    write_image(path, make_image_grid(rows, rows=2, cols=cols))
