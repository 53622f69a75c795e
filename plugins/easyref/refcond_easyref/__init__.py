"""refcond-easyref: EasyRef (arXiv 2412.09618) for refcond.

It registers the aggregator ``reference-tokens``: learnable reference tokens appended to the
``mllm`` encoder's output and run through a copy of the MLLM's last decoder layer. refcond finds
this module through the ``refcond`` entry point in ``pyproject.toml``.
"""

from __future__ import annotations

from refcond import hookimpl
from refcond.registry import Register
from refcond_easyref.reference_tokens import (
    ReferenceTokensAggregator,
    ReferenceTokensConfig,
)

__all__ = ["ReferenceTokensAggregator", "ReferenceTokensConfig"]


@hookimpl
def refcond_register_aggregators(register: Register) -> None:
    register(
        "reference-tokens",
        ReferenceTokensAggregator.from_config,
        config=ReferenceTokensConfig,
        description=ReferenceTokensAggregator.__doc__.splitlines()[0],
    )
