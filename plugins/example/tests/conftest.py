"""Fixtures from refcond.testing (tiny offline pipelines and reference images).

A plugin in its own repository would enable them with one line in its top-level conftest.py::

    pytest_plugins = ["refcond.testing.fixtures"]

This example lives inside refcond's repository, whose test run also collects this folder; pytest
refuses ``pytest_plugins`` in a conftest.py below the root, so the fixtures are imported instead.
Importing works in both places.
"""

from refcond.testing.fixtures import plugins, references, sd15_pipe  # noqa: F401 - fixtures are found by name
