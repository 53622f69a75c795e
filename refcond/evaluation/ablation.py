"""``refcond ablate``: evaluate a grid of compositions and settings on the same data and seeds.

A grid (:class:`GridConfig`, TOML) is a base run — the composition, its checkpoint, the model, the
evaluation set, the metrics and the generation settings — and axes, each a config path with the
values it takes. Every combination of the axes' values is a cell; the first value of every axis
makes the base cell. A path is either a composition path (``aggregator.name``,
``encoder.config.output``, ``injectors.0.config.projector``: what :func:`refcond.build` overrides)
or a run setting (``checkpoint``, ``reference_scale``, ``max_references``, ``guidance_scale``,
``num_inference_steps``).

Each cell is :func:`refcond.evaluation.evaluate` into ``cells/<name>/`` with the same samples and
seeds, so the cells' images pair up: paired differences against the base cell use the same
samples and seeds on both sides. The diffusers pipeline is loaded once and the metrics are built
once; cells that differ only in run settings share one built composition and its encodings of
the references (a cell that changes ``max_references`` encodes its own groups). A cell that cannot be
built or run is reported with its error and the others still run; a grid started again skips what
its cells finished. Outputs: ``results.csv`` (a row per cell and metric), ``results.md`` (a table
of means with 95 % bootstrap intervals), ``paired.csv`` / ``paired.md`` (differences against the
base cell with paired bootstrap intervals), ``plots/<metric>.png`` (the metric against each axis),
and ``grid.json`` (the cells, their settings and errors).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from refcond.config import ComponentConfig, merge_nested, validate_config
from refcond.errors import ConfigError, RefcondError
from refcond.evaluation.datasets import load_eval_set
from refcond.evaluation.runner import DEFAULT_METRICS, build_metrics, evaluate
from refcond.evaluation.statistics import Estimate, bootstrap, paired_difference
from refcond.files import atomic_write, write_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Run settings an axis may vary (besides composition paths).
RUN_SETTINGS = ("checkpoint", "reference_scale", "max_references", "guidance_scale", "num_inference_steps")
#: Roles a composition path starts with.
ROLES = ("encoder", "aggregator", "injectors")
#: Cells a grid may have.
MAX_CELLS = 10_000


class BaseRun(ComponentConfig):
    """What every cell shares unless an axis changes it."""

    composition: str | dict[str, Any] = Field(default="ip-adapter", description="A registered composition, a composition file, or a table.")
    checkpoint: str | None = Field(default=None, description="The composition's weights (a refcond checkpoint or an official file).")
    model: str | None = Field(default=None, description="Hub id or local folder of the diffusers pipeline.")
    data: str = Field(min_length=1, description="The evaluation set (JSONL or DreamBench folder), relative to the grid file.")
    metrics: list[str] = Field(default=list(DEFAULT_METRICS), min_length=1, description="Registered metrics.")
    images_per_sample: int = Field(default=1, ge=1, le=1000, description="Images per sample.")
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seed of samples that give none, and of fresh weights.")
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000, description="Denoising steps (None = the pipeline's).")
    guidance_scale: float | None = Field(default=None, ge=0, le=100, description="Guidance scale (None = the pipeline's).")
    reference_scale: float = Field(default=1.0, ge=-100, le=100, description="Strength of the references.")
    max_references: int | None = Field(default=None, ge=1, le=1024, description="Use at most this many references per sample.")
    device: str | None = Field(default=None, description="Device of the pipeline (None = the backbone's default).")


class GridConfig(ComponentConfig):
    """An ablation grid: a base run, axes over config paths, and the metrics' settings."""

    base: BaseRun = Field(description="The settings every cell starts from.")
    axes: dict[str, list[Any]] = Field(min_length=1, description="Config path -> the values it takes; the first value belongs to the base cell.")
    metric_config: dict[str, dict[str, Any]] = Field(default={}, description="Settings of each metric, by name (e.g. {clip-i = {model = './clip'}}).")

    @field_validator("axes")
    @classmethod
    def _axes(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in axes.items():
            if not values:
                raise ValueError(f"axis {path!r} has no values")
            if path not in RUN_SETTINGS and path.split(".")[0] not in ROLES:
                raise ValueError(f"axis {path!r} is neither a composition path (starting with {', '.join(ROLES)}) nor a run setting ({', '.join(RUN_SETTINGS)})")
            if path.split(".")[0] in ROLES and len(path.split(".")) < 2:
                raise ValueError(f"axis {path!r} names a role but no field: use {path}.name or {path}.config.<field>")
        cells = math.prod(len(v) for v in axes.values())
        if cells > MAX_CELLS:
            raise ValueError(f"the axes make {cells} cells, more than {MAX_CELLS}")
        return axes


@dataclass
class Cell:
    """One combination of the axes' values."""

    name: str
    values: dict[str, Any]
    base: bool
    error: str | None = None
    summary: dict[str, Estimate] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class AblationResult:
    """A finished grid: its folder and cells (with their errors and summaries)."""

    out: Path
    cells: list[Cell]


def read_grid(path: str | Path) -> GridConfig:
    """A grid from a TOML file; its ``data``, ``checkpoint`` and composition file paths are relative to the file."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read grid {str(path)!r}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    grid = validate_config(GridConfig, table, where=str(path))
    assert isinstance(grid, GridConfig)
    base = grid.base
    updates: dict[str, Any] = {"data": _relative(path.parent, base.data)}
    if base.checkpoint:
        updates["checkpoint"] = _relative(path.parent, base.checkpoint)
    if isinstance(base.composition, str) and base.composition.endswith((".toml", ".json")):
        updates["composition"] = _relative(path.parent, base.composition)
    axes = dict(grid.axes)
    if "checkpoint" in axes:
        axes["checkpoint"] = [_relative(path.parent, v) if isinstance(v, str) else v for v in axes["checkpoint"]]
    return grid.model_copy(update={"base": base.model_copy(update=updates), "axes": axes})


def cells_of(grid: GridConfig) -> list[Cell]:
    """Every combination of the axes' values, the base cell (every first value) first."""
    paths = list(grid.axes)
    cells = []
    for i, combination in enumerate(itertools.product(*(grid.axes[p] for p in paths))):
        values = dict(zip(paths, combination))
        cells.append(Cell(_cell_name(values), values, base=i == 0))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError("two cells of the grid have the same name: give the axes values that print differently.")
    return cells


def ablate(grid: GridConfig | str | Path, out: str | Path, *, pipeline: Any = None, plugins: Any = None, dry_run: bool = False, progress: bool = True) -> AblationResult:
    """Evaluate every cell of ``grid`` into ``out`` (see the module docstring).

    :param pipeline: a diffusers pipeline to use instead of loading ``base.model``.
    :param dry_run: list the cells (``grid.json``) and evaluate nothing.
    """
    from refcond.contracts import BuildContext
    from refcond.plugins import get_plugins

    grid = read_grid(grid) if isinstance(grid, (str, Path)) else grid
    out = Path(out)
    cells = cells_of(grid)
    samples = load_eval_set(grid.base.data)  # checked before any model loads
    plugins = plugins or get_plugins()
    for name in grid.base.metrics:
        plugins.registry.get("metric", name)  # an unknown metric fails now, listing the registered ones
    for cell in cells:  # composition paths are checked before any model loads too
        try:
            _composition_for(grid, cell, plugins)
        except RefcondError as exc:
            cell.error = str(exc)
    if dry_run:
        _write_grid_json(out, grid, cells)
        return AblationResult(out, cells)
    pipe = pipeline if pipeline is not None else _load_pipeline(grid, plugins)
    scorers: dict[str, Any] | None = None
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        if cell.error is None:
            groups.setdefault(repr(_build_key(grid, cell)), []).append(cell)
    for group in groups.values():
        rp = None
        try:
            rp = _build(grid, group[0], plugins, pipe)
            rp.pipeline.set_progress_bar_config(disable=True)
            rp.cache_size = max(rp.cache_size, len(samples))  # the group's cells reuse each sample's encoding
            if scorers is None:
                scorers = build_metrics({n: grid.metric_config.get(n, {}) for n in grid.base.metrics}, plugins.registry, BuildContext(backbone=rp.backbone))
            for cell in group:
                settings = _run_settings(grid, cell)
                try:
                    result = evaluate(rp, samples, out / "cells" / cell.name, built_metrics=scorers, images_per_sample=grid.base.images_per_sample,
                                      seed=grid.base.seed, progress=progress, **settings)  # fmt: skip
                    cell.summary, cell.rows = result.summary, result.rows
                except RefcondError as exc:
                    cell.error = str(exc)
        except (RefcondError, OSError) as exc:
            for cell in group:
                cell.error = cell.error or str(exc)
        finally:
            if rp is not None:
                rp.detach()
    _write_outputs(out, grid, cells)
    return AblationResult(out, cells)


# -- cells ---------------------------------------------------------------------------------------------


def _cell_name(values: Mapping[str, Any]) -> str:
    text = ",".join(f"{path}={_short(value)}" for path, value in values.items())
    return re.sub(r"[^A-Za-z0-9_.,=-]", "-", text)[:200]


def _short(value: Any) -> str:
    return Path(value).stem if isinstance(value, str) and ("/" in value or value.endswith(".safetensors")) else str(value)


def _composition_overrides(cell: Cell) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for path, value in cell.values.items():
        parts = path.split(".")
        if parts[0] not in ROLES:
            continue
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        overrides = merge_nested(overrides, {parts[0]: nested})
    return overrides


def _run_settings(grid: GridConfig, cell: Cell) -> dict[str, Any]:
    base = grid.base
    settings = {"reference_scale": base.reference_scale, "max_references": base.max_references,
                "guidance_scale": base.guidance_scale, "num_inference_steps": base.num_inference_steps}  # fmt: skip
    settings.update({k: v for k, v in cell.values.items() if k in settings})
    return settings


def _build_key(grid: GridConfig, cell: Cell) -> tuple[Any, ...]:
    """Cells with the same key share one built composition."""
    return (repr(_composition_overrides(cell)), cell.values.get("checkpoint", grid.base.checkpoint))


def _composition_for(grid: GridConfig, cell: Cell, plugins: Any) -> Any:
    from refcond.building import resolve_composition

    recipe = resolve_composition(grid.base.composition, plugins.registry)
    composed = recipe.with_overrides(_composition_overrides(cell))
    if cell.values.get("checkpoint", grid.base.checkpoint) is None:
        composed.validate_components(plugins.registry)
    return composed


def _load_pipeline(grid: GridConfig, plugins: Any) -> Any:
    """The base model's diffusers pipeline, loaded once by its backbone plugin for every cell."""
    from refcond.cli.generate import backbone_for_model
    from refcond.contracts import BuildContext

    if grid.base.model is None:
        raise ConfigError("the grid's base names no model: set base.model (a hub id or a folder of a diffusers pipeline).")
    name = backbone_for_model(grid.base.model, plugins.registry)
    entry = plugins.registry.get("backbone", name)
    config = {"model": grid.base.model, **({"device": grid.base.device} if grid.base.device else {})}
    return entry.obj(validate_config(entry.config, config, where=f"backbone {name!r}"), BuildContext()).pipeline


def _build(grid: GridConfig, cell: Cell, plugins: Any, pipe: Any) -> Any:
    from refcond.building import build
    from refcond.pipeline import RefcondPipeline

    checkpoint = cell.values.get("checkpoint", grid.base.checkpoint)
    built = build(grid.base.composition, plugins, pipeline=pipe, checkpoint=checkpoint, overrides=_composition_overrides(cell), seed=grid.base.seed)
    return RefcondPipeline(built, plugins)


# -- outputs --------------------------------------------------------------------------------------------


def _write_grid_json(out: Path, grid: GridConfig, cells: list[Cell]) -> None:
    write_json(out / "grid.json", {"base": grid.base.model_dump(mode="json"), "axes": grid.axes,
                                   "cells": [{"name": c.name, "values": c.values, "base": c.base, "error": c.error} for c in cells]})  # fmt: skip


def _write_outputs(out: Path, grid: GridConfig, cells: list[Cell]) -> None:
    _write_grid_json(out, grid, cells)
    metrics = list(dict.fromkeys(m for cell in cells for m in cell.summary))
    axes = list(grid.axes)
    results = [{"cell": c.name, **{a: c.values[a] for a in axes}, "metric": m, "mean": e.mean, "low": e.low, "high": e.high, "n": e.n, "error": c.error or ""}
               for c in cells for m, e in (c.summary.items() if c.summary else [("", Estimate(math.nan, math.nan, math.nan, 0))])]  # fmt: skip
    _write_csv(out / "results.csv", results, ["cell", *axes, "metric", "mean", "low", "high", "n", "error"])
    lines = ["| cell | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
    for c in cells:
        shown = " | ".join(c.summary[m].format() if m in c.summary else "" for m in metrics)
        lines.append(f"| {c.name}{' (base)' if c.base else ''} | {shown if not c.error else 'error: ' + c.error.splitlines()[0][:120]} |")
    atomic_write(out / "results.md", lambda tmp: tmp.write_text("Means with 95 % bootstrap intervals.\n\n" + "\n".join(lines) + "\n", encoding="utf-8"))
    base = next((c for c in cells if c.base), None)
    paired: list[dict[str, Any]] = []
    if base is not None and base.rows:
        for c in cells:
            if c.base or not c.rows:
                continue
            for m in metrics:
                mine = {(r["id"], r["image"]): r.get(m, math.nan) for r in c.rows}
                pairs = [(mine[key], r.get(m, math.nan)) for r in base.rows if (key := (r["id"], r["image"])) in mine]
                d = paired_difference([a for a, _ in pairs], [b for _, b in pairs], seed=grid.base.seed)
                paired.append({"cell": c.name, "metric": m, "difference": d.mean, "low": d.low, "high": d.high, "n": d.n})
    _write_csv(out / "paired.csv", paired, ["cell", "metric", "difference", "low", "high", "n"])
    table = ["| cell | metric | difference to the base cell | 95 % CI | n |", "| --- | --- | --- | --- | --- |"]
    table += [f"| {p['cell']} | {p['metric']} | {p['difference']:+.4f} | [{p['low']:+.4f}, {p['high']:+.4f}] | {p['n']} |" for p in paired]
    atomic_write(out / "paired.md", lambda tmp: tmp.write_text(f"Base cell: {base.name if base else '-'}; paired over the same samples and seeds.\n\n" + "\n".join(table) + "\n", encoding="utf-8"))
    for m in metrics:
        _plot(out / "plots" / f"{m}.png", m, axes, cells, grid.base.seed)


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))


def _plot(path: Path, metric: str, axes: list[str], cells: list[Cell], seed: int) -> None:
    """The metric against each axis: for each value, the mean (and interval) over every image of the cells with it."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(axes), figsize=(4 * len(axes), 3.2), squeeze=False)
    for panel, axis in zip(panels[0], axes):
        values = list(dict.fromkeys(str(c.values[axis]) for c in cells))
        estimates = [bootstrap([r[metric] for c in cells if str(c.values[axis]) == v for r in c.rows if metric in r], seed=seed) for v in values]
        means = [e.mean for e in estimates]
        errors = [[e.mean - e.low for e in estimates], [e.high - e.mean for e in estimates]]
        panel.errorbar(range(len(values)), means, yerr=errors, fmt="o-", capsize=4)
        panel.set_xticks(range(len(values)), [_short(v) for v in values], rotation=20)
        panel.set_xlabel(axis)
        panel.set_ylabel(metric)
        panel.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def _relative(base: Path, value: str) -> str:
    path = Path(value)
    if path.is_absolute() or not (base / path).exists():
        return value  # a hub id, or an absolute path
    return str(base / path)
