"""``refcond train``: train a composition from a TOML config or a registered recipe, resumable, on accelerate."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import click

from refcond.cli.app import state
from refcond.cli.generate import _value
from refcond.config import merge_nested

EPILOG = """\b
Examples:
  # IP-Adapter's recipe on your data, from the command line only
  refcond train --recipe ip-adapter --data train.jsonl --model ./sd15 --output runs/ipa \\
      --steps 20000 --batch-size 8 --learning-rate 1e-4

\b
  # EasyRef's three stages, each starting from the previous one's output
  refcond train --recipe easyref-stage1 --data refs.json --model ./sdxl --output runs/s1
  refcond train --recipe easyref-stage2 --data refs.json --model ./sdxl --from runs/s1/model.safetensors --output runs/s2

\b
  # a config file, one setting changed, continued after an interruption
  refcond train my-run.toml --set stages.0.optimizer.weight_decay=0.01 --resume latest

\b
  # several processes (GPUs, or CPU processes) with accelerate
  accelerate launch --num_processes 2 -m refcond train my-run.toml
"""


@click.command("train", epilog=EPILOG)
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--recipe", default=None, metavar="NAME", help="A registered recipe to start from (see `refcond plugins`): ip-adapter, easyref-stage1, ...")
@click.option("--data", default=None, metavar="FILE", help="The training data: a JSONL file (one sample a line) or an official EasyRef JSON.")
@click.option("-m", "--model", default=None, metavar="ID|FOLDER", help="Hub id or local folder of the diffusers pipeline to train on.")
@click.option("--from", "from_checkpoint", default=None, metavar="PATH", help="Start from this checkpoint (a refcond checkpoint, or an official file).")
@click.option("-o", "--output", default=None, metavar="DIR", help="Folder of the run's checkpoints, states, metrics and validation images.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps of every stage.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Samples per process and micro-batch, in every stage.")
@click.option("--resolution", type=click.IntRange(min=64), default=None, help="Training image side in pixels.")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of fresh weights, data order, noise and dropout.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help="Save a resumable state every this many steps.")
@click.option("--learning-rate", type=float, default=None, help="Learning rate of every stage.")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default=None, help="accelerate's mixed precision (fp16 needs a GPU).")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="Change any setting: stages.0.steps=1000, data.truncate_rate=0.4, roles.encoder.config.model=... Repeatable.")
@click.option("--resume", default=None, metavar="latest|DIR", help="Continue from the newest saved state of --output (latest) or from a state folder.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (output, checkpoint, stages, losses) on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train(
    ctx: click.Context,
    config: Path | None,
    recipe: str | None,
    data: str | None,
    model: str | None,
    from_checkpoint: str | None,
    output: str | None,
    steps: int | None,
    batch_size: int | None,
    resolution: int | None,
    seed: int | None,
    checkpoint_every: int | None,
    learning_rate: float | None,
    mixed_precision: str | None,
    sets: tuple[str, ...],
    resume: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Train a composition: every stage of CONFIG (a .toml file), or of a registered --recipe.

    One trainer for every composition, on accelerate: the same command runs in one process, or in
    several under `accelerate launch` / `torchrun` (data-parallel). It saves a resumable state every
    --checkpoint-every steps (SIGINT and SIGTERM save before stopping), a refcond checkpoint at each
    stage's end, and the formats the recipe exports (the official IP-Adapter or EasyRef layouts).
    """
    from refcond.training import load_train_config, read_train_file, set_field
    from refcond.training import train as run_training

    st = state(ctx)
    st.quiet = quiet
    plugins = st.get_plugins()
    st.warn_failures()
    if (config is None) == (recipe is None):
        raise click.UsageError("give a CONFIG file or a --recipe (one of them).")
    data_table = read_train_file(config) if config is not None else copy.deepcopy(dict(plugins.registry.get("recipe", recipe).obj))
    for key, value in (("model", model), ("from", from_checkpoint), ("output", output), ("seed", seed), ("mixed_precision", mixed_precision)):
        if value is not None:
            data_table[key] = value
    if data is not None:
        set_field(data_table, "data.path", str(Path(data).resolve()))
    if resolution is not None:
        set_field(data_table, "data.resolution", resolution)
    per_stage = {k: v for k, v in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)) if v is not None}
    if learning_rate is not None:
        per_stage["optimizer"] = {"learning_rate": learning_rate}
    if per_stage and isinstance(data_table.get("stages"), list):
        data_table["stages"] = [merge_nested(stage, per_stage) if isinstance(stage, dict) else stage for stage in data_table["stages"]]
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not all(key.strip().split(".")):
            raise click.BadParameter(f"{item!r}: expected FIELD=VALUE, e.g. stages.0.steps=1000 or data.resolution=512.", param_hint="'--set'")
        set_field(data_table, key.strip(), _value(raw))
    run = load_train_config(data_table)
    st.status(f"Training {len(run.stages)} stage(s) into {run.output} ...")
    result = run_training(run, resume=resume, plugins=plugins, progress=not quiet)
    st.status(f"Wrote {result.checkpoint}.")
    if as_json:
        report = {
            "output": str(result.output),
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "stages": [{"name": s.name, "steps": s.steps, "loss": s.loss, "checkpoint": str(s.checkpoint) if s.checkpoint else None, "skipped": s.skipped} for s in result.stages],
            "exports": {k: str(v) for k, v in result.exports.items()},
        }
        click.echo(json.dumps(report, indent=2, sort_keys=True, default=str))


__all__ = ["train"]
