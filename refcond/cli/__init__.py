"""The ``refcond`` command line: ``refcond plugins``, ``refcond generate`` and ``refcond demo``.

``main`` is the console script's entry point; ``cli`` is the click group, for ``CliRunner`` in tests.
"""

from refcond.cli.app import CliState, cli, main

__all__ = ["CliState", "cli", "main"]
