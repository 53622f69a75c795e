"""The generic aggregators ``mean``, ``weighted-mean`` and ``concat``, on hand-built encodings."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import refcond
from refcond import (
    MIXED_SOURCE,
    BuildContext,
    Condition,
    ConfigError,
    ReferenceEncoding,
    aggregators,
)
from refcond.config import validate_config
from refcond.registry import Registry

# Three references of one group, one token each (a pooled encoder), D = 2.
R0, R1, R2 = [1.0, 2.0], [3.0, 4.0], [8.0, 0.0]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return refcond.from_modules(aggregators).registry


def make(registry: Any, name: str, **config: Any) -> Any:
    """Build an aggregator the way refcond does: validate its config, then call its factory."""
    entry = registry.get("aggregator", name)
    return entry.obj(validate_config(entry.config, config, where=f"aggregator {name!r}"), BuildContext())


def group(*references: list[list[float]]) -> ReferenceEncoding:
    """One group; each reference is a list of tokens (all real, source = reference index)."""
    tokens = torch.tensor([tok for ref in references for tok in ref])[None]
    source = torch.tensor([i for i, ref in enumerate(references) for _ in ref])[None]
    return ReferenceEncoding(tokens, torch.ones_like(source, dtype=torch.bool), source)


def test_mean_averages_the_references_of_a_group(registry):
    condition = make(registry, "mean")(group([R0], [R1], [R2]))
    assert isinstance(condition, Condition)
    assert condition.tokens.tolist() == [[[4.0, 2.0]]]
    assert condition.mask.tolist() == [[True]]
    assert condition.source.tolist() == [[MIXED_SOURCE]]  # an average mixes references


def test_mean_averages_position_by_position_when_references_have_several_tokens(registry):
    condition = make(registry, "mean")(group([[0.0, 0.0], [2.0, 2.0]], [[4.0, 2.0], [0.0, 6.0]]))
    assert condition.tokens.tolist() == [[[2.0, 1.0], [1.0, 4.0]]]


def test_mean_is_independent_of_the_number_of_references_and_of_token_order(registry):
    mean = make(registry, "mean")
    assert mean(group([R0], [R1])).tokens.shape == mean(group([R0], [R1], [R2], [R0])).tokens.shape == (1, 1, 2)
    shuffled = ReferenceEncoding(
        torch.tensor([[R2, R0, R1]]), torch.ones(1, 3, dtype=torch.bool), torch.tensor([[2, 0, 1]])
    )
    assert torch.equal(mean(shuffled).tokens, mean(group([R0], [R1], [R2])).tokens)


def test_weighted_mean_uses_the_call_weights(registry):
    condition = make(registry, "weighted-mean")(group([R0], [R1], [R2]), torch.tensor([1.0, 1.0, 2.0]))
    # (1*R0 + 1*R1 + 2*R2) / 4
    assert condition.tokens.tolist() == [[[5.0, 1.5]]]


def test_weighted_mean_uses_its_config_weights_unless_the_call_gives_some(registry):
    aggregator = make(registry, "weighted-mean", weights=[0.0, 1.0, 1.0])
    assert aggregator(group([R0], [R1], [R2])).tokens.tolist() == [[[5.5, 2.0]]]
    assert aggregator(group([R0], [R1], [R2]), torch.tensor([1.0, 0.0, 0.0])).tokens.tolist() == [[[1.0, 2.0]]]


def test_weighted_mean_without_weights_is_the_plain_mean(registry):
    assert make(registry, "weighted-mean")(group([R0], [R1], [R2])).tokens.tolist() == [[[4.0, 2.0]]]


def test_batches_of_groups_with_different_numbers_of_references(registry):
    # group 0 has three references, group 1 one; concat_batches pads group 1 with masked tokens.
    batch = ReferenceEncoding.concat_batches([group([R0], [R1], [R2]), group([R1])])
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]

    mean = make(registry, "mean")(batch)
    assert mean.tokens.tolist() == [[[4.0, 2.0]], [[3.0, 4.0]]]
    assert mean.mask.all()

    # [B, N_max] weights: the row of the smaller group is zero-padded
    weighted = make(registry, "weighted-mean")(batch, torch.tensor([[1.0, 1.0, 2.0], [3.0, 0.0, 0.0]]))
    assert weighted.tokens.tolist() == [[[5.0, 1.5]], [[3.0, 4.0]]]

    concat = make(registry, "concat")(batch)
    assert concat.tokens[0].tolist() == [R0, R1, R2]
    assert concat.tokens[1].tolist() == [R1, [0.0, 0.0], [0.0, 0.0]]
    assert concat.mask.tolist() == [[True, True, True], [True, False, False]]
    assert concat.source.tolist() == [[0, 1, 2], [0, MIXED_SOURCE, MIXED_SOURCE]]


def test_concat_keeps_every_token_in_order_with_its_source(registry):
    encoding = group([R0, R1], [R2])
    condition = make(registry, "concat")(encoding)
    assert torch.equal(condition.tokens, encoding.tokens)
    assert condition.source.tolist() == [[0, 0, 1]]


def test_concat_accepts_tokens_that_mix_references(registry):
    mixed = ReferenceEncoding(torch.ones(1, 2, 2), torch.ones(1, 2, dtype=torch.bool), torch.full((1, 2), MIXED_SOURCE))
    assert make(registry, "concat")(mixed).source.tolist() == [[MIXED_SOURCE, MIXED_SOURCE]]


def test_output_dim_is_the_encoder_dim(registry):
    for name in ("mean", "weighted-mean", "concat"):
        assert make(registry, name).output_dim(768) == 768


def test_mean_rejects_tokens_that_mix_references(registry):
    mixed = ReferenceEncoding(torch.ones(1, 3, 2), torch.ones(1, 3, dtype=torch.bool), torch.tensor([[0, 1, MIXED_SOURCE]]))
    with pytest.raises(ConfigError) as excinfo:
        make(registry, "mean")(mixed)
    message = str(excinfo.value)
    assert "aggregator 'mean'" in message
    assert "group 0 has tokens that mix references (source == -1)" in message
    assert "Use aggregator 'concat'" in message


def test_mean_rejects_weights_and_names_the_aggregator_that_takes_them(registry):
    with pytest.raises(ConfigError, match="aggregator 'mean' takes no reference weights; use aggregator 'weighted-mean'"):
        make(registry, "mean")(group([R0], [R1]), torch.tensor([1.0, 2.0]))


def test_concat_rejects_weights(registry):
    with pytest.raises(ConfigError, match="aggregator 'concat' takes no reference weights; use 'weighted-mean'"):
        make(registry, "concat")(group([R0], [R1]), torch.tensor([1.0, 2.0]))


def test_mean_needs_as_many_tokens_from_every_reference(registry):
    with pytest.raises(ConfigError, match=r"aggregator 'mean' needs the same number of tokens from every reference; group 0 has \[1, 2\]\. Use 'concat'"):
        make(registry, "mean")(group([R0], [R1, R2]))


def test_a_group_without_real_tokens_is_reported(registry):
    empty = ReferenceEncoding(torch.ones(1, 2, 2), torch.zeros(1, 2, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"group 0 has no reference tokens \(its mask is all False\)"):
        make(registry, "mean")(empty)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, 2.0], r"one weight per reference: group 0 has 3 references, got \(2,\) weights"),
        ([1.0, -1.0, 1.0], r"must be non-negative with a positive sum, got \[1\.0, -1\.0, 1\.0\]"),
        ([0.0, 0.0, 0.0], r"must be non-negative with a positive sum"),
        ([1.0, float("nan"), 1.0], r"must be non-negative with a positive sum"),
        ([[1.0, 1.0, 1.0]] * 3, r"3 rows for 1 reference groups: give one row per group, or one list for all"),
    ],
    ids=["count", "negative", "zero-sum", "nan", "rows"],
)
def test_weights_are_validated(registry, weights, message):
    with pytest.raises(ConfigError, match=message):
        make(registry, "weighted-mean")(group([R0], [R1], [R2]), torch.tensor(weights))


def test_weights_in_the_config_are_validated_when_the_composition_is(registry):
    with pytest.raises(ConfigError) as excinfo:
        make(registry, "weighted-mean", weights=[1.0, -2.0])
    assert "aggregator 'weighted-mean'" in str(excinfo.value)
    assert "weights must be finite and non-negative, with a positive sum" in str(excinfo.value)


@pytest.mark.parametrize("weights", [[1e308, 1e308], [1.0, 1001.0], list(range(2000))], ids=["overflowing-sum", "huge", "too-many"])
def test_config_weights_are_bounded_so_the_weighted_sum_stays_finite(registry, weights):
    with pytest.raises(ConfigError, match=r"aggregator 'weighted-mean'.*\n  - weights: "):
        make(registry, "weighted-mean", weights=weights)
    assert make(registry, "weighted-mean", weights=[1000.0, 1.0]).default_weights == [1000.0, 1.0]
