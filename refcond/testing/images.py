"""Deterministic synthetic reference images."""

from __future__ import annotations

import numpy as np
import PIL.Image


def reference_images(count: int = 3, size: int = 48, seed: int = 0) -> list[PIL.Image.Image]:
    """``count`` distinct RGB images: smooth colour gradients with a bright square, seeded."""
    rng = np.random.default_rng(seed)
    images = []
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    for _ in range(count):
        colour_a, colour_b = rng.uniform(0, 255, size=(2, 3))
        t = (x * rng.uniform(0.2, 1.0) + y * rng.uniform(0.2, 1.0))[..., None] / 2.0
        pixels = colour_a * (1 - t) + colour_b * t
        top, left = rng.integers(0, size // 2, size=2)
        pixels[top : top + size // 4, left : left + size // 4] = 255
        images.append(PIL.Image.fromarray(pixels.astype(np.uint8), mode="RGB"))
    return images
