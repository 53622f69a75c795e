"""refcond-example: the smallest complete third-party refcond plugin.

It registers an aggregator, ``max``, and an encoder, ``pixel-stats``. refcond finds this module
through the entry point in ``pyproject.toml``::

    [project.entry-points.refcond]
    refcond-example = "refcond_example"

and calls the ``@hookimpl`` functions below once when it builds its registry.
"""

from __future__ import annotations

from refcond import EmptyConfig, Register, hookimpl
from refcond_example.max_aggregator import MaxAggregator, build_max
from refcond_example.pixel_stats import PixelStatsConfig, PixelStatsEncoder

__all__ = ["MaxAggregator", "PixelStatsConfig", "PixelStatsEncoder"]


@hookimpl
def refcond_register_aggregators(register: Register) -> None:
    register("max", build_max, config=EmptyConfig, description="Element-wise maximum over the references, position by position.")


@hookimpl
def refcond_register_encoders(register: Register) -> None:
    register(
        "pixel-stats",
        PixelStatsEncoder.from_config,
        config=PixelStatsConfig,
        description="Colour statistics of each reference, projected to a few tokens.",
    )
