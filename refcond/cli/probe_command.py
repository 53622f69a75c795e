"""``refcond probe``: the offline aggregation benchmark of :func:`refcond.probe.run_probe`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from refcond.cli.app import state
from refcond.probe.encoder import EncoderRecipe
from refcond.probe.runner import SMOKE, ProbeConfig

_DEFAULTS = ProbeConfig()


def _default(value: Any) -> str:
    return f"[default: {','.join(map(str, value)) if isinstance(value, list) else value}]"

EPILOG = """\b
Examples:
  # the documented full run: 5 methods x 2 variants x 3 seeds (10 to 15 minutes on 2 CPU cores)
  refcond probe --out probe/
\b
  # a 20-second check that learned-queries binds what mean cannot
  refcond probe --smoke --out /tmp/probe-smoke
\b
  # a third-party aggregator against mean, with its own config
  refcond probe --aggregators mean@pooled,mean,my-aggregator --config 'my-aggregator={"depth": 2}' --out probe-mine/
\b
  # the control: the binding variant with an encoder that was taught the colour-shape pairs
  refcond probe --variants binding --labels binding=classes --aggregators mean@pooled,mean --out probe-control/
"""


def _list(text: str | None) -> list[str] | None:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def _pairs(items: tuple[str, ...], option: str, example: str, parse: Any = str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE, e.g. {example}.", param_hint=f"'{option}'")
        try:
            out[key.strip()] = parse(raw)
        except ValueError as exc:
            raise click.BadParameter(f"{item!r}: {exc}", param_hint=f"'{option}'") from None
    return out


def _json_table(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        raise ValueError("the value is not JSON; write a JSON object such as {\"layers\": 1}") from None
    if not isinstance(value, dict):
        raise ValueError("the value must be a JSON object such as {\"layers\": 1}")
    return value


@click.command("probe", epilog=EPILOG)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("refcond-probe"), show_default=True,
              help="Folder of results.json, results.md, probe.png and the finished trials (runs/); a second run resumes from them.")
@click.option("--aggregators", default=None, metavar="A,B,...",
              help="Methods to compare: registered aggregators (third-party ones too), 'single' (one reference); NAME@pooled reads one "
              f"pooled embedding per reference. {_default(_DEFAULTS.methods)}")
@click.option("--config", "configs", multiple=True, metavar="NAME=JSON", help="An aggregator's config as a JSON object, merged over the probe's defaults. Repeatable.")
@click.option("--variants", default=None, metavar="V,...", help=f"binding, plain, or both. {_default(_DEFAULTS.variants)}")
@click.option("--labels", "labels", multiple=True, metavar="VARIANT=attributes|classes",
              help=f"What a variant's frozen encoder is pretrained on. {_default([f'{k}={v}' for k, v in _DEFAULTS.labels.items()])}")
@click.option("--seeds", default=None, metavar="S,...", help=f"Training seeds. {_default(_DEFAULTS.seeds)}")
@click.option("--steps", type=click.IntRange(min=1), default=None, help=f"Training steps of every trial. {_default(_DEFAULTS.steps)}")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help=f"Groups per training step. {_default(_DEFAULTS.batch_size)}")
@click.option("--learning-rate", type=float, default=None, help=f"AdamW learning rate. {_default(_DEFAULTS.learning_rate)}")
@click.option("--train-groups", type=click.IntRange(min=1), default=None, help=f"Training groups rendered and encoded. {_default(_DEFAULTS.train_groups)}")
@click.option("--eval-groups", type=click.IntRange(min=1), default=None, help=f"Evaluation groups. {_default(_DEFAULTS.eval_groups)}")
@click.option("--encoder-steps", type=click.IntRange(min=1), default=None, help=f"Pretraining steps of each frozen encoder. {_default(EncoderRecipe().steps)}")
@click.option("--smoke", is_flag=True, help="The test suite's quick settings (binding only, mean@pooled, mean and learned-queries, one seed, about 20 s); other options override them.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of the pretrained encoders, keyed by recipe and code. [default: ~/.cache/refcond/probe]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads. [default: torch's]")
@click.option("--no-plot", is_flag=True, help="Skip probe.png.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json on stdout instead of the table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.pass_context
def probe(
    ctx: click.Context,
    out_dir: Path,
    aggregators: str | None,
    configs: tuple[str, ...],
    variants: str | None,
    labels: tuple[str, ...],
    seeds: str | None,
    steps: int | None,
    batch_size: int | None,
    learning_rate: float | None,
    train_groups: int | None,
    eval_groups: int | None,
    encoder_steps: int | None,
    smoke: bool,
    cache: Path | None,
    threads: int | None,
    no_plot: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Compare aggregators on a synthetic task that only cross-reference aggregation solves.

    Groups of 3 to 5 rendered 32 x 32 references share one colour-shape element; in the "binding"
    variant its colour and its shape are each in every reference but paired only in it, and a
    frozen encoder pretrained on colours and shapes alone reads each reference. Every aggregator
    named, followed by the same one-query readout, trains to name the shared element. Prints a
    table of accuracies with 95 % bootstrap intervals and paired differences, and writes it with a
    plot. Offline, on CPU; an interrupted run resumes where it stopped.
    """
    from refcond.config import validate_config
    from refcond.probe import run_probe

    st = state(ctx)
    st.quiet = quiet
    plugins = st.get_plugins()
    st.warn_failures()
    settings: dict[str, Any] = dict(SMOKE) if smoke else {}
    given = {
        "methods": _list(aggregators),
        "variants": _list(variants),
        "seeds": None if seeds is None else _seeds(seeds),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "train_groups": train_groups,
        "eval_groups": eval_groups,
        "threads": threads,
    }
    settings.update({k: v for k, v in given.items() if v is not None})
    if configs:
        settings["aggregator_configs"] = _pairs(configs, "--config", 'learned-queries={"layers": 1}', _json_table)
    if labels:
        settings["labels"] = {**settings.get("labels", {}), **_pairs(labels, "--labels", "binding=classes")}
    if encoder_steps is not None:
        settings["encoder"] = {**settings.get("encoder", {}), "steps": encoder_steps}
    config = validate_config(ProbeConfig, settings, where="refcond probe")
    st.status(
        f"Probing {', '.join(config.methods)} on {', '.join(config.variants)} with seeds {', '.join(map(str, config.seeds))} into {out_dir} ..."
    )
    result = run_probe(config, out_dir, plugins, cache=cache, make_plot=not no_plot, progress=st.status)
    if as_json:
        click.echo(json.dumps(result.results, indent=2))
        return
    click.echo(result.files["markdown"].read_text(encoding="utf-8"), nl=False)
    st.status("Wrote " + ", ".join(str(path) for path in result.files.values()) + ".")


def _seeds(text: str) -> list[int]:
    try:
        return [int(item) for item in _list(text) or []]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected whole numbers separated by commas, e.g. 0,1,2.", param_hint="'--seeds'") from None


__all__ = ["probe"]
