"""The ``refcond`` command group: shared options, plugin loading, and turning refcond errors into clean messages."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import click

from refcond.errors import RefcondError
from refcond.plugins import Plugins, load_plugins


@dataclass
class CliState:
    """What the group hands to its commands (``ctx.obj``).

    Tests pass their own ``Plugins`` with ``CliRunner().invoke(cli, args, obj=CliState(plugins))``;
    otherwise the installed plugins are loaded on first use (``REFCOND_LOAD_PLUGINS`` applies).
    """

    plugins: Plugins | None = None
    quiet: bool = False
    load_warnings: list[str] = field(default_factory=list)

    def get_plugins(self) -> Plugins:
        # A broken plugin is reported by each command in its own words, not as a Python warning:
        # load the plugins and run their registration hooks (cached afterwards) under a filter.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if self.plugins is None:
                self.plugins = load_plugins()
            self.plugins.registry  # noqa: B018
        return self.plugins

    def status(self, message: str) -> None:
        """One progress line on stderr (hidden by ``--quiet``), so stdout stays clean for ``--json``."""
        if not self.quiet:
            click.echo(message, err=True)

    def warn(self, message: str) -> None:
        """A warning line on stderr, shown even with ``--quiet``."""
        click.echo(f"Warning: {message}", err=True)

    def warn_failures(self) -> None:
        """Name every plugin that failed to load on stderr."""
        for failure in self.get_plugins().failures:
            self.warn(str(failure))


def state(ctx: click.Context) -> CliState:
    """The group's state, created when a command is invoked on its own (e.g. in tests)."""
    obj = ctx.ensure_object(CliState)
    if isinstance(obj, Plugins):  # a test may pass Plugins directly as obj
        obj = ctx.obj = CliState(plugins=obj)
    return obj


class RefcondGroup(click.Group):
    """A click group whose commands report :class:`refcond.RefcondError` as ``Error: ...`` (exit code 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RefcondError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group("refcond", cls=RefcondGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="refcond", prog_name="refcond")
@click.option("-v", "--verbose", is_flag=True, help="Show the log messages of diffusers and transformers.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Condition Stable Diffusion (1.5 and XL) on a group of reference images plus a prompt.

    The conditioning path is an encoder, an aggregator and one or more injectors, each a plugin;
    a composition (such as the built-in "ip-adapter") names them with their settings.

    \b
    Examples:
      refcond plugins                 # what is installed, and from which plugin
      refcond demo --out demo/        # an offline run on tiny random-weight models
      refcond generate --model ./sd15-pipeline --checkpoint ip-adapter_sd15.safetensors \\
          --ref a.png --ref b.png --prompt "a dog on the beach" --out dog.png
      refcond train --recipe ip-adapter --data train.jsonl --model ./sd15-pipeline --output runs/ipa
    """
    state(ctx)
    _configure_logging(verbose)


def _configure_logging(verbose: bool) -> None:
    """Quiet transformers' import-time notices unless ``--verbose``; diffusers' warnings stay visible."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    if verbose:
        diffusers_logging.set_verbosity(logging.INFO)
        transformers_logging.set_verbosity(logging.INFO)
    else:
        transformers_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")


def _register_commands() -> None:
    from refcond.cli.ablate_command import ablate
    from refcond.cli.demo_command import demo
    from refcond.cli.eval_command import eval_command
    from refcond.cli.generate import generate
    from refcond.cli.plugins_command import plugins
    from refcond.cli.probe_command import probe
    from refcond.cli.train_command import train

    for command in (plugins, generate, train, eval_command, ablate, probe, demo):
        cli.add_command(command)


_register_commands()


def main(args: list[str] | None = None) -> Any:
    """Entry point of the ``refcond`` console script and of ``python -m refcond``."""
    return cli.main(args=args, prog_name="refcond")
