"""Generic aggregators: ``mean``, ``weighted-mean`` and ``concat`` over the references of a group,
and ``learned-queries`` (:mod:`refcond.learned_queries`), where the references attend to each other.

The first three read :attr:`ReferenceEncoding.source` to know which tokens belong to which reference, so
they work with any encoder that emits per-reference tokens (pooled or sequences of equal length).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator

from refcond.config import ComponentConfig, EmptyConfig
from refcond.contracts import MIXED_SOURCE, BuildContext, Condition, ReferenceEncoding
from refcond.errors import ConfigError
from refcond.hookspecs import hookimpl
from refcond.learned_queries import LearnedQueriesAggregator, LearnedQueriesConfig
from refcond.registry import Register


def split_references(encoding: ReferenceEncoding, index: int, aggregator: str | None = None) -> list[torch.Tensor]:
    """The tokens of each reference of group ``index``, in reference order: a list of ``[T_i, D]``.

    ``aggregator`` (the caller's registered name) is used in error messages.
    """
    who = f"aggregator {aggregator!r}" if aggregator else "this aggregator"
    valid = encoding.mask[index]
    source = encoding.source[index][valid]
    tokens = encoding.tokens[index][valid]
    if (source == MIXED_SOURCE).any():
        raise ConfigError(
            f"{who} combines references token by token, but group {index} has tokens that mix "
            "references (source == -1), as an encoder that reads all references at once produces. Use aggregator "
            "'concat', or one made for such encoders (e.g. EasyRef's 'reference-tokens')."
        )
    if source.numel() == 0:
        raise ConfigError(f"{who}: group {index} has no reference tokens (its mask is all False).")
    return [tokens[source == ref] for ref in torch.unique(source, sorted=True)]


#: The most default weights (references per group) a ``weighted-mean`` config lists.
MAX_WEIGHTS = 1024
#: The largest default weight: weights are relative, and a weighted sum of features stays finite
#: in float16 (whose largest number is 65504) up to here.
MAX_WEIGHT = 1000.0


class MeanConfig(ComponentConfig):
    """Options of the ``weighted-mean`` aggregator."""

    weights: list[float] | None = Field(
        default=None,
        max_length=MAX_WEIGHTS,
        description="Default weight of each reference (by position); the call's reference_weights override it. None = equal weights. "
        f"Finite, from 0 to {MAX_WEIGHT:g}, with a positive sum; at most {MAX_WEIGHTS} of them.",
    )

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (any(not math.isfinite(w) or not 0 <= w <= MAX_WEIGHT for w in value) or sum(value) <= 0):
            raise ValueError(f"weights must be finite and non-negative, with a positive sum, and at most {MAX_WEIGHT:g} each")
        return value


class MeanAggregator(torch.nn.Module):
    """Average the references of each group, position by position (IP-Adapter-style embedding averaging).

    Every reference must yield the same number of tokens ``T``; the condition has ``T`` tokens.
    With weights, the average is ``sum(w_i x_i) / sum(w_i)``.
    """

    def __init__(self, weighted: bool = False, default_weights: list[float] | None = None):
        super().__init__()
        self.weighted = weighted
        self.default_weights = default_weights

    def output_dim(self, input_dim: int) -> int:
        return input_dim

    def forward(self, encoding: ReferenceEncoding, weights: torch.Tensor | None = None) -> Condition:
        name = "weighted-mean" if self.weighted else "mean"
        if weights is not None and not self.weighted:
            raise ConfigError("aggregator 'mean' takes no reference weights; use aggregator 'weighted-mean' to weigh references.")
        if weights is None and self.default_weights is not None:
            weights = torch.tensor([self.default_weights] * encoding.batch_size)
        groups = []
        for b in range(encoding.batch_size):
            refs = split_references(encoding, b, name)
            lengths = {r.shape[0] for r in refs}
            if len(lengths) != 1:
                raise ConfigError(
                    f"aggregator {name!r} needs the same number of tokens from every reference; group {b} has "
                    f"{sorted(lengths)}. Use 'concat'."
                )
            stacked = torch.stack(refs)  # [N, T, D]
            if weights is None:
                pooled = stacked.mean(dim=0)
            else:
                w = _group_weights(weights, b, len(refs), encoding.batch_size).to(stacked)
                pooled = (w[:, None, None] * stacked).sum(dim=0) / w.sum()
            groups.append(pooled)
        return _stack(groups)


def _group_weights(weights: torch.Tensor, b: int, n: int, batch: int) -> torch.Tensor:
    """Group ``b``'s weights from ``[N]`` (the same for every group) or ``[B, N_max]`` weights (zero-padded)."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.ndim == 2:
        if w.shape[0] != batch:
            raise ConfigError(f"reference weights have {w.shape[0]} rows for {batch} reference groups: give one row per group, or one list for all.")
        w = w[b]
        if w.ndim == 1 and w.shape[0] > n and not w[n:].any():
            w = w[:n]  # rows of a [B, N_max] tensor are zero-padded for groups with fewer references
    if w.shape != (n,):
        raise ConfigError(f"reference weights must give one weight per reference: group {b} has {n} references, got {tuple(w.shape)} weights.")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"reference weights must be non-negative with a positive sum, got {w.tolist()}.")
    return w


def _stack(groups: list[torch.Tensor]) -> Condition:
    return Condition.concat_batches(
        [
            Condition(
                g[None],
                torch.ones(1, g.shape[0], dtype=torch.bool, device=g.device),
                torch.full((1, g.shape[0]), MIXED_SOURCE, dtype=torch.long, device=g.device),
            )
            for g in groups
        ]
    )


class ConcatAggregator(torch.nn.Module):
    """Concatenate the tokens of all references, in order (diffusers' behaviour for several images).

    The condition grows with the number of references; ``source`` keeps each token's reference.
    """

    def output_dim(self, input_dim: int) -> int:
        return input_dim

    def forward(self, encoding: ReferenceEncoding, weights: torch.Tensor | None = None) -> Condition:
        if weights is not None:
            raise ConfigError("aggregator 'concat' takes no reference weights; use 'weighted-mean', or scale with reference_scale.")
        parts = []
        for b in range(encoding.batch_size):
            valid = encoding.mask[b]
            parts.append(
                Condition(
                    encoding.tokens[b][valid][None],
                    encoding.mask[b][valid][None],
                    encoding.source[b][valid][None],
                )
            )
        return Condition.concat_batches(parts)


def require_per_reference_tokens(context: BuildContext, who: str) -> None:
    """Refuse, when the composition is built, an encoder whose tokens mix references (``mixes_references``).

    For components that combine references token by token, which such an encoding cannot feed.
    """
    encoder = context.encoder
    if encoder is not None and getattr(encoder, "mixes_references", False):
        raise ConfigError(
            f"{who} needs tokens that each come from one reference, but encoder {type(encoder).__name__} mixes the references "
            "in every token (it reads them all in one sequence). Use aggregator 'concat', or one made for such encoders "
            "(e.g. EasyRef's 'reference-tokens')."
        )


def _mean(config: EmptyConfig, context: BuildContext) -> MeanAggregator:
    """Equal-weight average of the references (IP-Adapter-style averaging)."""
    require_per_reference_tokens(context, "aggregator 'mean'")
    return MeanAggregator()


def _weighted_mean(config: MeanConfig, context: BuildContext) -> MeanAggregator:
    """Weighted average of the references; weights per call or in the config."""
    require_per_reference_tokens(context, "aggregator 'weighted-mean'")
    return MeanAggregator(weighted=True, default_weights=config.weights)


def _concat(config: EmptyConfig, context: BuildContext) -> ConcatAggregator:
    """Concatenation of all references' tokens (diffusers' multi-image IP-Adapter)."""
    return ConcatAggregator()


@hookimpl
def refcond_register_aggregators(register: Register) -> None:
    register("mean", _mean, config=EmptyConfig)
    register("weighted-mean", _weighted_mean, config=MeanConfig)
    register("concat", _concat, config=EmptyConfig)
    register(
        "learned-queries",
        LearnedQueriesAggregator.from_config,
        config=LearnedQueriesConfig,
        description="K learned queries and all references' tokens attend to each other through L layers; K tokens out.",
    )
