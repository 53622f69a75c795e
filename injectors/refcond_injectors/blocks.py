"""Per-block weights in diffusers' format (``{"down": {"block_2": [...]}, "mid": x, "up": {...}}``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def unknown_blocks(unet: Any, scale: Mapping[str, Any]) -> tuple[str, list[str], list[str]] | None:
    """The first side (``down``/``up``) naming blocks without attention layers, as ``(side, unknown, valid)``.

    diffusers silently ignores such blocks (``block_9``), so a typo would change nothing; callers
    raise an error naming them instead. ``None`` when every named block exists.
    """
    for side, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        chosen = scale.get(side)
        if not isinstance(chosen, Mapping):
            continue
        valid = [f"block_{i}" for i, block in enumerate(blocks) if hasattr(block, "attentions")]
        unknown = sorted(set(chosen) - set(valid))
        if unknown:
            return side, unknown, valid
    return None
