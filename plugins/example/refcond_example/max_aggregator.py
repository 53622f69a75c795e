"""The ``max`` aggregator: the element-wise maximum over the references of a group."""

from __future__ import annotations

import torch

from refcond import (
    MIXED_SOURCE,
    BuildContext,
    Condition,
    ConfigError,
    EmptyConfig,
    ReferenceEncoding,
    split_references,
)


class MaxAggregator(torch.nn.Module):
    """Keep, for every token position and feature, the largest value over the references of a group.

    Like the built-in ``mean``, it reads ``source`` to tell references apart, needs the same number
    of tokens ``T`` from every reference, and returns ``T`` tokens per group whatever the number of
    references. Every condition token mixes references, so its ``source`` is -1. It has no
    weights, and refuses ``reference_weights``: a maximum has no natural weighting.
    """

    def output_dim(self, input_dim: int) -> int:
        """The maximum keeps the feature size."""
        return input_dim

    def forward(self, encoding: ReferenceEncoding, weights: torch.Tensor | None = None) -> Condition:
        if weights is not None:
            raise ConfigError("aggregator 'max' takes no reference weights; use 'weighted-mean' to weigh references.")
        rows = []
        for b in range(encoding.batch_size):
            references = split_references(encoding, b)  # one [T_i, D] tensor per reference
            lengths = sorted({r.shape[0] for r in references})
            if len(lengths) != 1:
                raise ConfigError(
                    f"aggregator 'max' needs the same number of tokens from every reference; group {b} has {lengths}. "
                    "Use an encoder with a fixed token count per reference, or the 'concat' aggregator."
                )
            pooled = torch.stack(references).amax(dim=0)  # [T, D]
            length = pooled.shape[0]
            rows.append(
                Condition(
                    pooled[None],
                    torch.ones(1, length, dtype=torch.bool, device=pooled.device),
                    torch.full((1, length), MIXED_SOURCE, dtype=torch.long, device=pooled.device),
                )
            )
        return Condition.concat_batches(rows)


def build_max(config: EmptyConfig, context: BuildContext) -> MaxAggregator:
    """Element-wise maximum over the references, position by position."""
    return MaxAggregator()
