"""The ``mllm`` encoder's inference caches: vision-tower outputs per image, decoder states per prefix.

Interactive use repeats work: the same references with a new prompt, a group that grows by one
image. Two caches, both bounded in bytes (least recently used out first), keep what does not change:

* :class:`VisionCache`: the vision tower's output for one image, keyed by the image's pixels and
  the resize rule (:func:`image_key`). A group sharing images with an earlier one runs the tower
  only for its new images.
* :class:`PrefixCache`: for a chat sequence ``[system, images, instruction | prompt, chat suffix]``,
  the decoder's keys and values (one :class:`transformers.DynamicCache`'s worth) and normed outputs
  of the tokens before the prompt. Attention is causal and positions are 1-D, so those tokens do not
  depend on what follows; a new prompt then runs only its own tokens through the decoder.

Both hold tensors computed by the current weights only: :meth:`MllmEncoder` empties them when
:func:`refcond.weights_fingerprint` of the encoder changes. Neither is used while the encoder
trains (its outputs change at every step and must carry gradients).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from cachetools import LRUCache
from PIL.Image import Image
from transformers import DynamicCache

V = TypeVar("V")

MEGABYTE = 2**20


@dataclass(frozen=True)
class Prefix:
    """The decoder's view of a sequence's first tokens.

    :ivar keys_values: per decoder layer, ``(keys, values)`` ``[1, kv_heads, P, head_dim]``.
    :ivar hidden: the normed trunk outputs of the ``P`` tokens, ``[P, hidden]``.
    """

    keys_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    hidden: torch.Tensor

    @classmethod
    def from_cache(cls, cache: DynamicCache, hidden: torch.Tensor) -> Prefix:
        return cls(tuple((layer.keys, layer.values) for layer in cache.layers), hidden)

    def cache(self) -> DynamicCache:
        """A fresh cache holding these keys and values (a copy: running more tokens leaves this prefix as it is)."""
        return DynamicCache(ddp_cache_data=self.keys_values)

    @property
    def length(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def nbytes(self) -> int:
        return self.hidden.nbytes + sum(k.nbytes + v.nbytes for k, v in self.keys_values)


def _tensor_bytes(value: torch.Tensor) -> int:
    return value.nbytes


def _prefix_bytes(value: Prefix) -> int:
    return value.nbytes


class _ByteBoundedCache(Generic[V]):
    """A least-recently-used mapping holding at most ``megabytes`` of values; a value larger than that is not kept."""

    def __init__(self, megabytes: float, size_of: object):
        self.max_bytes = int(megabytes * MEGABYTE)
        self._entries: LRUCache[Hashable, V] | None = LRUCache(maxsize=self.max_bytes, getsizeof=size_of) if self.max_bytes > 0 else None  # type: ignore[arg-type]
        #: Lookups answered, and lookups that found nothing, since the cache was made.
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self._entries is not None

    def get(self, key: Hashable) -> V | None:
        value = None if self._entries is None else self._entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: Hashable, value: V) -> None:
        if self._entries is None:
            return
        try:
            self._entries[key] = value
        except ValueError:  # larger than the whole budget: computing it again is the only option
            pass

    def clear(self) -> None:
        if self._entries is not None:
            self._entries.clear()

    def __len__(self) -> int:
        return 0 if self._entries is None else len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return 0 if self._entries is None else int(self._entries.currsize)


class VisionCache(_ByteBoundedCache[torch.Tensor]):
    """Vision-tower outputs ``[tokens, hidden]`` by :func:`image_key`."""

    def __init__(self, megabytes: float):
        super().__init__(megabytes, _tensor_bytes)


class PrefixCache(_ByteBoundedCache[Prefix]):
    """A :class:`Prefix` per (the images' keys, the prefix's token ids)."""

    def __init__(self, megabytes: float):
        super().__init__(megabytes, _prefix_bytes)


def image_key(image: Image, resize: str) -> str:
    """What the vision tower's output for ``image`` depends on, besides the weights: its pixels and ``resize`` (the rule and processor)."""
    digest = hashlib.sha256(f"{image.mode} {image.size[0]}x{image.size[1]} {resize}\0".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
