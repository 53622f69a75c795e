"""The tensors that flow between stages: ReferenceEncoding and Condition."""

from __future__ import annotations

import pytest
import torch

from refcond import MIXED_SOURCE, Condition, ReferenceEncoding


def encoding(batch: int, length: int, dim: int = 4, start: float = 0.0) -> ReferenceEncoding:
    """``batch`` groups of ``length`` tokens, one token per reference, numbered from ``start``."""
    tokens = torch.arange(batch * length * dim, dtype=torch.float32).reshape(batch, length, dim) + start
    mask = torch.ones(batch, length, dtype=torch.bool)
    source = torch.arange(length).repeat(batch, 1)
    return ReferenceEncoding(tokens, mask, source)


def test_a_valid_encoding_reports_its_sizes():
    enc = encoding(batch=2, length=3, dim=5)
    assert enc.batch_size == 2
    assert enc.dim == 5


def test_tokens_must_be_batch_length_dim():
    with pytest.raises(ValueError, match=r"ReferenceEncoding\.tokens must be \[batch, length, dim\], got shape \(3, 4\)"):
        ReferenceEncoding(torch.zeros(3, 4), torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long))


def test_mask_shape_must_match_tokens():
    with pytest.raises(ValueError, match=r"Condition\.mask must have shape \(2, 3\) \(batch, length\), got \(2, 4\)"):
        Condition(torch.zeros(2, 3, 8), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.long))


def test_source_shape_must_match_tokens():
    with pytest.raises(ValueError, match=r"ReferenceEncoding\.source must have shape \(2, 3\) \(batch, length\), got \(3,\)"):
        ReferenceEncoding(torch.zeros(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), torch.zeros(3, dtype=torch.long))


def test_mask_must_be_bool():
    with pytest.raises(ValueError, match=r"Condition\.mask must be a bool tensor, got torch\.float32; build it with dtype=torch\.bool"):
        Condition(torch.zeros(1, 2, 8), torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.long))


def test_source_must_hold_integer_reference_indices():
    with pytest.raises(ValueError, match=r"ReferenceEncoding\.source must hold reference indices as torch\.long, got torch\.float32"):
        ReferenceEncoding(torch.zeros(1, 2, 8), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2))


def test_repeat_interleave_repeats_each_group_in_place():
    enc = encoding(batch=2, length=3)
    repeated = enc.repeat_interleave(2)
    assert isinstance(repeated, ReferenceEncoding)
    assert repeated.tokens.shape == (4, 3, 4)
    # group order a, a, b, b (as num_images_per_prompt expects), for every field
    for field in ("tokens", "mask", "source"):
        original, out = getattr(enc, field), getattr(repeated, field)
        assert torch.equal(out[0], original[0]) and torch.equal(out[1], original[0])
        assert torch.equal(out[2], original[1]) and torch.equal(out[3], original[1])
    assert enc.repeat_interleave(1) is enc


def test_to_casts_tokens_but_keeps_mask_and_source_dtypes():
    moved = encoding(batch=1, length=2).to("cpu", torch.float64)
    assert moved.tokens.dtype == torch.float64
    assert moved.mask.dtype == torch.bool
    assert moved.source.dtype == torch.long


def test_concat_batches_pads_shorter_sequences_and_masks_the_padding():
    short = encoding(batch=1, length=2, start=100.0)
    long = encoding(batch=2, length=4)
    both = ReferenceEncoding.concat_batches([short, long])

    assert isinstance(both, ReferenceEncoding)
    assert both.tokens.shape == (3, 4, 4)
    assert torch.equal(both.tokens[0, :2], short.tokens[0])
    assert torch.equal(both.tokens[0, 2:], torch.zeros(2, 4))
    assert both.mask[0].tolist() == [True, True, False, False]
    assert both.source[0].tolist() == [0, 1, MIXED_SOURCE, MIXED_SOURCE]
    assert torch.equal(both.tokens[1:], long.tokens)
    assert both.mask[1:].all()


def test_concat_batches_of_conditions_returns_a_condition():
    one = Condition(torch.ones(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), torch.full((1, 2), MIXED_SOURCE))
    assert isinstance(Condition.concat_batches([one, one]), Condition)


def test_concat_batches_rejects_nothing_and_mixed_token_sizes():
    with pytest.raises(ValueError, match="needs at least one item"):
        ReferenceEncoding.concat_batches([])
    with pytest.raises(ValueError, match=r"needs one token size, got \[4, 6\]"):
        ReferenceEncoding.concat_batches([encoding(1, 2, dim=4), encoding(1, 2, dim=6)])


def test_from_references_lays_out_one_row_per_group_with_sources():
    features = torch.arange(5 * 2 * 3, dtype=torch.float32).reshape(5, 2, 3)  # 5 references, 2 tokens each
    encoding = ReferenceEncoding.from_references(features, [3, 2])
    assert encoding.tokens.shape == (2, 6, 3)
    assert encoding.source.tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, -1, -1]]
    assert encoding.mask.tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    assert torch.equal(encoding.tokens[1, :4], features[3:].reshape(4, 3))
    with pytest.raises(ValueError, match=r"add up to 4, but there are features for 5 references"):
        ReferenceEncoding.from_references(features, [2, 2])
