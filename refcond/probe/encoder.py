"""The probe's frozen per-image encoder, its pretraining recipe, and its on-disk cache.

A small CNN turns one 32 x 32 image into 4 x 4 = 16 tokens (each sees mostly one quadrant, so
one object) plus a learned position embedding. It is pretrained to tell what an image holds from
its pooled tokens — their mean (the default: the pooled embedding that ``NAME@pooled`` methods
read, as an IP-Adapter-style average reads CLIP's, is then what pretraining read out) or their max
(presence is "some token sees it", learnt in a few hundred steps: the quick recipe of ``refcond
probe --smoke``) — then frozen; every aggregator of the probe reads the same frozen tokens. Two
label sets:

- ``attributes`` (the binding variant's): which of the 6 colours and which of the 4 shapes an
  image holds — nothing in its training says which colour goes with which shape;
- ``classes`` (the plain variant's control): which of the 24 colour-shape classes it holds.

Pretraining takes about a minute on two CPU cores; the weights are cached in a folder, under a key
that hashes the recipe and the source of this module and of :mod:`refcond.probe.render` (what
defines the data and the model), so a changed recipe or model never reuses stale weights.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from refcond.config import ComponentConfig
from refcond.files import atomic_write
from refcond.probe import render

#: Tokens per image: the 4 x 4 grid of the last convolution.
TOKENS_PER_IMAGE = 16
#: Warm-up steps of pretraining.
WARMUP = 50
#: Images encoded per forward pass when encoding many.
CHUNK = 1024


class EncoderRecipe(ComponentConfig):
    """How the probe's frozen encoder is made: its labels, its size and its pretraining."""

    labels: Literal["attributes", "classes"] = Field(
        default="attributes",
        description="What pretraining predicts from the pooled tokens: 'attributes', which of the 6 colours and which of the 4 shapes "
        "an image holds (nothing pairs them); 'classes', which of the 24 colour-shape classes it holds (the pairing is in the labels).",
    )
    pool: Literal["mean", "max"] = Field(
        default="mean",
        description="How pretraining pools the 16 tokens of an image before its linear head: 'mean' (the pooled embedding "
        "NAME@pooled methods read) or 'max' (learns in fewer steps).",
    )
    width: int = Field(default=64, ge=8, le=512, description="Token size (the encoder's embedding_dim), 8 to 512.")
    steps: int = Field(default=1500, ge=1, le=100_000, description="Pretraining steps (AdamW), up to 100000.")
    batch_size: int = Field(default=64, ge=1, le=4096, description="Images per pretraining step, up to 4096.")
    learning_rate: float = Field(default=1e-2, gt=0, le=1, description="Peak learning rate (linear warm-up over 50 steps, then cosine decay to zero).")
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seed of the initial weights and of the pretraining images.")


class ProbeEncoder(torch.nn.Module):
    """CNN (4x4 s2, 3x3 s2, 3x3, 3x3 s2 convolutions; batch norm and GELU between) -> 16 tokens of size ``width`` per image.

    It follows the part of :class:`refcond.Encoder` that aggregators read: ``embedding_dim``,
    ``reads_prompt`` and ``mixes_references``; its tokens each come from one reference.
    """

    reads_prompt = False
    mixes_references = False

    def __init__(self, width: int = 64):
        super().__init__()
        self.embedding_dim = width
        self.convolutions = torch.nn.Sequential(
            torch.nn.Conv2d(3, width // 2, 4, stride=2, padding=1),
            torch.nn.BatchNorm2d(width // 2),
            torch.nn.GELU(),
            torch.nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
            torch.nn.BatchNorm2d(width),
            torch.nn.GELU(),
            torch.nn.Conv2d(width, width, 3, padding=1),
            torch.nn.BatchNorm2d(width),
            torch.nn.GELU(),
            torch.nn.Conv2d(width, width, 3, stride=2, padding=1),
        )
        self.position = torch.nn.Parameter(0.02 * torch.randn(TOKENS_PER_IMAGE, width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[I, 3, 32, 32]`` images -> ``[I, 16, width]`` tokens."""
        features = self.convolutions(images)  # [I, width, 4, 4]
        return features.flatten(2).transpose(1, 2) + self.position

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens of many images, in chunks, without gradients: ``[..., 3, 32, 32]`` -> ``[..., 16, width]``."""
        flat = images.reshape(-1, *images.shape[-3:])
        with torch.no_grad():
            tokens = torch.cat([self(flat[i : i + CHUNK]) for i in range(0, flat.shape[0], CHUNK)])
        return tokens.reshape(*images.shape[:-3], TOKENS_PER_IMAGE, self.embedding_dim)


def pool_tokens(tokens: torch.Tensor, how: Literal["mean", "max"]) -> torch.Tensor:
    """One embedding per image from its tokens ``[..., T, D]``: their mean or max, as ``[..., 1, D]``."""
    return tokens.mean(dim=-2, keepdim=True) if how == "mean" else tokens.amax(dim=-2, keepdim=True)


def recipe_key(recipe: EncoderRecipe) -> str:
    """The cache key of the encoder a recipe makes: SHA-256 of the recipe and of the code that defines data and model."""
    digest = hashlib.sha256()
    digest.update(json.dumps(recipe.model_dump(), sort_keys=True).encode())
    for module in (render, inspect.getmodule(ProbeEncoder)):
        digest.update(inspect.getsource(module).encode())  # type: ignore[arg-type]
    return digest.hexdigest()


def pretrain(recipe: EncoderRecipe, progress: Callable[[str], None] | None = None) -> tuple[ProbeEncoder, float]:
    """Train an encoder on the recipe's labels; return it (frozen, in eval mode) and its exact-set accuracy.

    The accuracy is the fraction of 2048 held-out images whose presence labels (10 or 24) are all right.
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    encoder = ProbeEncoder(recipe.width)
    labels = render.presence_labels if recipe.labels == "attributes" else render.class_labels
    head = torch.nn.Linear(recipe.width, len(render.COLOURS) + len(render.SHAPES) if recipe.labels == "attributes" else render.NUM_CLASSES)
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / recipe.steps)))
    started = time.monotonic()
    for step in range(recipe.steps):
        scenes = render.random_scenes(recipe.batch_size, generator)
        logits = head(pool_tokens(encoder(render.render(scenes, generator)), recipe.pool).squeeze(-2))
        loss = F.binary_cross_entropy_with_logits(logits, labels(scenes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None and (step + 1) % 200 == 0:
            progress(f"encoder pretraining: step {step + 1}/{recipe.steps}, loss {loss.item():.4f}, {time.monotonic() - started:.0f} s")
    encoder.eval().requires_grad_(False)
    held_out = torch.Generator().manual_seed(recipe.seed + 1)
    scenes = render.random_scenes(2048, held_out)
    with torch.no_grad():
        predicted = head(pool_tokens(encoder.encode_images(render.render(scenes, held_out)), recipe.pool).squeeze(-2)) > 0
    accuracy = float((predicted == labels(scenes).bool()).all(dim=1).float().mean())
    return encoder, accuracy


def default_cache() -> Path:
    """Where the encoder is cached unless told: ``$XDG_CACHE_HOME/refcond/probe`` (``~/.cache/refcond/probe``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "refcond" / "probe"


def cache_path(recipe: EncoderRecipe, cache: str | Path) -> Path:
    """The file in ``cache`` that holds the encoder of ``recipe``."""
    return Path(cache) / f"probe-encoder-{recipe_key(recipe)[:32]}.safetensors"


def read_cached(recipe: EncoderRecipe, cache: str | Path) -> tuple[ProbeEncoder, dict[str, Any]] | None:
    """The cached encoder of ``recipe`` and its facts, or ``None`` when absent.

    Raises what reading raises for a damaged file (:func:`load_or_pretrain` then pretrains again).
    """
    path = cache_path(recipe, cache)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    key = recipe_key(recipe)
    if meta.get("key") != key:
        raise ValueError(f"it holds the encoder of another recipe (key {meta.get('key')!r})")
    encoder = ProbeEncoder(recipe.width)
    encoder.load_state_dict(load_file(str(path)))
    facts = {"key": key, "accuracy": float(meta["accuracy"]), "seconds": float(meta["seconds"]), "cached": True}
    return encoder.eval().requires_grad_(False), facts


def load_or_pretrain(
    recipe: EncoderRecipe, cache: str | Path | None, progress: Callable[[str], None] | None = None
) -> tuple[ProbeEncoder, dict[str, Any]]:
    """The recipe's encoder from ``cache`` (a folder), or pretrained and stored there; with facts about it.

    The facts: ``key`` (:func:`recipe_key`), ``accuracy`` (exact-set accuracy on held-out images),
    ``seconds`` (pretraining time) and ``cached`` (whether it was read from the cache). A cache file
    that cannot be read is replaced. ``cache`` ``None`` pretrains every time.
    """
    if cache is not None:
        try:
            found = read_cached(recipe, cache)
        except Exception as exc:  # a damaged or foreign file: make it again
            found = None
            if progress is not None:
                progress(f"encoder cache {cache_path(recipe, cache)} unreadable ({type(exc).__name__}: {exc}); pretraining again")
        if found is not None:
            return found
    started = time.monotonic()
    encoder, accuracy = pretrain(recipe, progress)
    seconds = time.monotonic() - started
    key = recipe_key(recipe)
    if cache is not None:
        metadata = {"key": key, "accuracy": repr(accuracy), "seconds": repr(seconds), "recipe": json.dumps(recipe.model_dump())}
        state = {name: tensor.contiguous() for name, tensor in encoder.state_dict().items()}
        atomic_write(cache_path(recipe, cache), lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return encoder, {"key": key, "accuracy": accuracy, "seconds": seconds, "cached": False}
