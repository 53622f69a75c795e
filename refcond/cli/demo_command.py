"""``refcond demo``: the offline end-to-end run of :func:`refcond.demo.run_demo`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from refcond.cli.app import state


@click.command("demo")
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("refcond-demo"),
    show_default=True,
    help="Folder for demo.png, the references and report.json (created if missing).",
)
@click.option("--steps", type=click.IntRange(min=1), default=2, show_default=True, help="Denoising steps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the models, the injector's fresh weights and the noise.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout instead of a summary.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.pass_context
def demo(ctx: click.Context, out_dir: Path, steps: int, seed: int, as_json: bool, quiet: bool) -> None:
    """Run the "ip-adapter" composition offline on tiny random-weight models.

    Builds a tiny Stable-Diffusion-1.5-like pipeline and three synthetic reference images, conditions
    the pipeline on them through the plugin registry, and writes demo.png, reference_*.png and
    report.json (versions, plugins, composition, condition shape, timings per stage). Nothing is
    downloaded and it takes seconds on a CPU; the weights are random, so the image is noise, and the
    same seed gives the same image.

    \b
    Examples:
      refcond demo
      refcond demo --out /tmp/demo --steps 4
      refcond demo --json | jq .timings
    """
    from refcond.demo import run_demo

    st = state(ctx)
    st.quiet = quiet
    plugins = st.get_plugins()
    st.warn_failures()
    report = run_demo(out_dir, steps=steps, seed=seed, plugins=plugins, status=st.status)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    outputs = report["outputs"]
    timings = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in report["timings"].items() if stage != "total")
    click.echo(f"Demo image:  {outputs['image']}")
    click.echo(f"References:  {', '.join(Path(p).name for p in outputs['references'])} (in {outputs['dir']})")
    click.echo(f"Report:      {outputs['report']}")
    click.echo(f"Condition:   {report['condition_shape']} from {report['num_references']} references")
    click.echo(f"Took {report['timings']['total']:.2f} s ({timings}).")
