"""``refcond eval``: generate an evaluation set with a composition and score it with metric plugins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from refcond.cli.app import state
from refcond.cli.generate import _parse_device, _parse_scale, _value, load_composition, prepare_composition

EPILOG = """\b
Examples:
  # IP-Adapter on SD1.5, two images per sample, the three default metrics
  refcond eval -c ip-adapter --checkpoint ip-adapter_sd15.safetensors -m ./sd15 \\
      --data mrbench.jsonl --out runs/eval-ipa --images-per-sample 2

\b
  # a trained composition (its checkpoint names it), CLIP-T only, with a local CLIP
  refcond eval --checkpoint runs/s3/model.safetensors -m ./sdxl --data set.jsonl --out runs/eval-s3 \\
      --metrics clip-t --metric-set clip-t.model=./clip-vit-base-patch32

\b
  # the same on 4 GPUs: samples are split between the processes
  accelerate launch --num_processes 4 -m refcond eval ... --device cuda
"""


def _parse_metric_sets(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, field = key.strip().partition(".")
        if not sep or not dot or not name or not field:
            raise click.BadParameter(f"{item!r}: expected METRIC.FIELD=VALUE, e.g. clip-i.model=./clip or dino-i.batch_size=8.", param_hint="'--metric-set'")
        configs.setdefault(name, {})[field] = _value(raw, item)
    return configs


@click.command("eval", epilog=EPILOG)
@click.option("-c", "--composition", default=None, metavar="NAME|FILE", help="A registered composition or a composition file (default: the checkpoint's, else ip-adapter).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None, help="The composition's weights: a refcond checkpoint or an official file.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle checkpoints (.bin, .pt): only for files you trust.")
@click.option("-m", "--model", default=None, metavar="ID|FOLDER", help="Hub id or local folder of the diffusers pipeline.")
@click.option("--backbone", default=None, help="sd15 or sdxl; read from the model's model_index.json when omitted.")
@click.option("--data", required=True, metavar="FILE|FOLDER", help="The evaluation set: a JSONL file, or a DreamBench-style folder with prompts.txt.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder of the images, samples.csv, summary.json/.md and grids.")
@click.option("--metrics", default=",".join(("clip-i", "clip-t", "dino-i")), show_default=True, help="Comma-separated registered metrics.")
@click.option("--metric-set", "metric_sets", multiple=True, metavar="METRIC.FIELD=VALUE", help="A metric's setting, e.g. clip-i.model=./clip (a local folder). Repeatable.")
@click.option("--images-per-sample", type=click.IntRange(1, 1000), default=1, show_default=True, help="Images generated per sample (seeds seed, seed+1, ...).")
@click.option("--max-references", type=click.IntRange(min=1), default=None, help="Use at most this many references of each sample.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of samples that give none, and of fresh weights.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Denoising steps (default: the pipeline's).")
@click.option("--guidance-scale", type=float, default=None, help="Classifier-free guidance scale (default: the pipeline's).")
@click.option("--scale", default=None, callback=_parse_scale, help="Strength of the references: a number or a per-block JSON object.")
@click.option("--set", "sets", multiple=True, metavar="ROLE[.FIELD]=VALUE", help="Override the composition, as refcond generate --set. Repeatable.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="Weights dtype of the pipeline.")
@click.option("--device", default=None, callback=_parse_device, help="Device to run on, e.g. cuda, cuda:1, mps, cpu.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or lines on stderr.")
@click.pass_context
def eval_command(
    ctx: click.Context,
    composition: str | None,
    checkpoint: Path | None,
    allow_pickle: bool,
    model: str | None,
    backbone: str | None,
    data: str,
    out_dir: Path,
    metrics: str,
    metric_sets: tuple[str, ...],
    images_per_sample: int,
    max_references: int | None,
    seed: int,
    steps: int | None,
    guidance_scale: float | None,
    scale: float | dict[str, Any] | None,
    sets: tuple[str, ...],
    dtype: str | None,
    device: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Generate every sample of an evaluation set and score the images.

    Each sample (references, a prompt, a seed) gets --images-per-sample images; each image is
    scored by every metric (CLIP-I, CLIP-T and DINO-I by default, from the refcond-metrics plugin).
    Writes the images, samples.csv (one row per image), summary.json and summary.md (means with
    95 % bootstrap intervals) and a grid per sample. Started again on the same --out it skips what
    is done; under accelerate launch or torchrun the samples are split between the processes.
    """
    from refcond.contracts import BuildContext
    from refcond.evaluation import build_metrics, evaluate, load_eval_set

    st = state(ctx)
    st.quiet = quiet
    samples = load_eval_set(data)  # cheap checks first
    names = [n.strip() for n in metrics.split(",") if n.strip()]
    configs = _parse_metric_sets(metric_sets)
    unknown = sorted(set(configs) - set(names))
    if unknown:
        raise click.BadParameter(f"--metric-set names {unknown}, which --metrics does not compute ({names}).", param_hint="'--metric-set'")
    plugins = st.get_plugins()
    st.warn_failures()
    recipe, overrides = prepare_composition(plugins, composition, sets, checkpoint, model=model, backbone=backbone, dtype=dtype, device=device)
    rp = load_composition(st, plugins, recipe, overrides, checkpoint, allow_pickle=allow_pickle, seed=seed, quiet=quiet)
    rp.pipeline.set_progress_bar_config(disable=True)
    st.status(f"Loading metrics {', '.join(names)}...")
    scorers = build_metrics({n: configs.get(n, {}) for n in names}, plugins.registry, BuildContext(backbone=rp.backbone))
    st.status(f"Evaluating {len(samples)} samples x {images_per_sample} image(s) into {out_dir} ...")
    result = evaluate(
        rp,
        samples,
        out_dir,
        built_metrics=scorers,
        images_per_sample=images_per_sample,
        seed=seed,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        reference_scale=1.0 if scale is None else scale,
        max_references=max_references,
        progress=not quiet,
    )
    st.status(f"Wrote {out_dir / 'samples.csv'} and {out_dir / 'summary.md'}.")
    if as_json:
        click.echo(json.dumps({"out": str(out_dir), "images": len(result.rows), "metrics": {n: vars(e) for n, e in result.summary.items()}}, indent=2))
    elif not quiet:
        for name, estimate in result.summary.items():
            click.echo(f"{name}: {estimate.format()}")
