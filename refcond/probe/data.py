"""Encoded reference groups, and the :class:`refcond.ReferenceEncoding` batches aggregators read.

The frozen encoder runs once per reference: a pool of groups is rendered and encoded up front, and
training batches are drawn from it, each group's references in a new random order every time.
Evaluation groups keep the order they were drawn in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from refcond.contracts import MIXED_SOURCE, ReferenceEncoding
from refcond.probe.encoder import ProbeEncoder, pool_tokens
from refcond.probe.render import MAX_REFERENCES, Variant, sample_groups

#: Groups rendered and encoded at once.
CHUNK = 256


@dataclass(frozen=True)
class EncodedGroups:
    """Groups as frozen-encoder tokens.

    :ivar tokens: ``[G, 5, T, D]``: ``T`` tokens of size ``D`` for each of up to 5 references.
    :ivar target: ``[G]`` long, the consistent element's class.
    :ivar counts: ``[G]`` long, how many references each group holds (3 to 5); the tokens after them are padding.
    """

    tokens: torch.Tensor
    target: torch.Tensor
    counts: torch.Tensor

    def __len__(self) -> int:
        return self.target.shape[0]

    def pooled(self) -> EncodedGroups:
        """The same groups with one token per reference, the mean of its tokens (a pooled image embedding, as CLIP's)."""
        return EncodedGroups(pool_tokens(self.tokens, "mean"), self.target, self.counts)


def encode_groups(
    encoder: ProbeEncoder, variant: Variant, count: int, seed: int, progress: Callable[[str], None] | None = None
) -> EncodedGroups:
    """Render ``count`` groups of ``variant`` from ``seed`` and encode them with the frozen ``encoder``."""
    generator = torch.Generator().manual_seed(seed)
    tokens, targets, counts = [], [], []
    for start in range(0, count, CHUNK):
        groups = sample_groups(variant, min(CHUNK, count - start), generator)
        tokens.append(encoder.encode_images(groups.images))
        targets.append(groups.target)
        counts.append(groups.counts)
        if progress is not None and (start // CHUNK) % 8 == 7:
            progress(f"{variant}: encoded {start + CHUNK}/{count} groups")
    return EncodedGroups(torch.cat(tokens), torch.cat(targets), torch.cat(counts))


def layout(tokens: torch.Tensor, counts: torch.Tensor) -> ReferenceEncoding:
    """The encoding of groups ``[B, R, T, D]`` whose first ``counts[b]`` references are real.

    References after ``counts[b]`` are padding (mask ``False``, source -1); every real token has its
    reference's index as ``source``.
    """
    batch, refs, per_reference, dim = tokens.shape
    real = torch.arange(refs) < counts[:, None]  # [B, R]
    mask = real.repeat_interleave(per_reference, dim=1)
    source = torch.arange(refs).repeat_interleave(per_reference).expand(batch, -1).masked_fill(~mask, MIXED_SOURCE)
    return ReferenceEncoding(tokens.reshape(batch, refs * per_reference, dim), mask, source)


def training_batch(pool: EncodedGroups, size: int, generator: torch.Generator, single: bool = False) -> tuple[ReferenceEncoding, torch.Tensor]:
    """A random batch: groups from the pool, each with its references in a random order (only the first if ``single``)."""
    index = torch.randint(len(pool), (size,), generator=generator)
    counts = pool.counts[index]
    shuffle = torch.rand(size, MAX_REFERENCES, generator=generator)
    order = shuffle.masked_fill(torch.arange(MAX_REFERENCES) >= counts[:, None], 2.0).argsort(dim=1)  # padding stays last
    if single:
        counts = torch.ones_like(counts)
    tokens = pool.tokens[index[:, None], order]  # [B, 5, T, D]
    return _trim(tokens, counts), pool.target[index]


def evaluation_batches(groups: EncodedGroups, size: int, single: bool = False) -> Iterator[tuple[ReferenceEncoding, torch.Tensor]]:
    """The groups in order, ``size`` at a time, each with its fixed number of references (1 if ``single``)."""
    for start in range(0, len(groups), size):
        counts = groups.counts[start : start + size]
        if single:
            counts = torch.ones_like(counts)
        yield _trim(groups.tokens[start : start + size], counts), groups.target[start : start + size]


def _trim(tokens: torch.Tensor, counts: torch.Tensor) -> ReferenceEncoding:
    """Drop the references no group of the batch uses, then lay the batch out."""
    return layout(tokens[:, : int(counts.max())], counts)
