"""``refcond ablate``: evaluate a grid of compositions and settings, with tables, paired differences and plots."""

from __future__ import annotations

import json
from pathlib import Path

import click

from refcond.cli.app import state

EPILOG = """\b
Example grid (grid.toml):
  [base]
  composition = "ip-adapter"
  checkpoint = "ip-adapter_sd15.safetensors"
  model = "./sd15"
  data = "set.jsonl"
  metrics = ["clip-i", "clip-t", "dino-i"]
  images_per_sample = 2

\b
  [axes]
  "aggregator.name" = ["mean", "concat"]
  reference_scale = [1.0, 0.5]

\b
Examples:
  refcond ablate grid.toml --out runs/ablation --dry-run     # list the 4 cells
  refcond ablate grid.toml --out runs/ablation               # run them (again: skips what is done)
"""


@click.command("ablate", epilog=EPILOG)
@click.argument("grid", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder of the cells, results, paired differences and plots.")
@click.option("--dry-run", is_flag=True, help="List the cells (and whether each can be built) without evaluating.")
@click.option("--json", "as_json", is_flag=True, help="Print the cells and their summaries as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or lines on stderr.")
@click.pass_context
def ablate(ctx: click.Context, grid: Path, out_dir: Path, dry_run: bool, as_json: bool, quiet: bool) -> None:
    """Evaluate every cell of GRID (a .toml file): a base run and axes over config paths.

    Every combination of the axes' values is a cell, evaluated as `refcond eval` does with the same
    samples and seeds; the first value of every axis makes the base cell. Axes are composition
    paths (aggregator.name, encoder.config.output, injectors.0.config.projector) or run settings
    (checkpoint, reference_scale, max_references, guidance_scale, num_inference_steps). Writes
    results.csv and results.md (means with 95 % bootstrap intervals), paired.csv and paired.md
    (each cell against the base cell, paired bootstrap intervals) and plots/<metric>.png. A cell that
    cannot be built is reported with its error and the others still run.
    """
    from refcond.evaluation.ablation import ablate as run_ablation
    from refcond.evaluation.ablation import read_grid

    st = state(ctx)
    st.quiet = quiet
    config = read_grid(grid)
    plugins = st.get_plugins()
    st.warn_failures()
    result = run_ablation(config, out_dir, plugins=plugins, dry_run=dry_run, progress=not quiet)
    if as_json:
        cells = [{"name": c.name, "values": c.values, "base": c.base, "error": c.error, "metrics": {m: vars(e) for m, e in c.summary.items()}} for c in result.cells]
        click.echo(json.dumps({"out": str(out_dir), "cells": cells}, indent=2, default=str))
        return
    for cell in result.cells:
        status = "error: " + cell.error.splitlines()[0] if cell.error else ("listed" if dry_run else ", ".join(f"{m} {e.format(3)}" for m, e in cell.summary.items()))
        click.echo(f"{cell.name}{' (base)' if cell.base else ''}: {status}")
    if not dry_run:
        st.status(f"Wrote {out_dir / 'results.md'}, {out_dir / 'paired.md'} and {out_dir / 'plots'}.")
