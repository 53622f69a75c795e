"""The ``pixel-stats`` encoder: colour statistics of each reference, projected to a few tokens.

It is deliberately tiny (a single ``Linear``): an example of an encoder with trainable weights, a
validated config and the encoder contract, not a useful image representation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL.Image import Image, Resampling
from pydantic import Field, field_validator

from refcond import BuildContext, ComponentConfig, ReferenceEncoding


class PixelStatsConfig(ComponentConfig):
    """Options of the ``pixel-stats`` encoder.

    Every size has an upper bound (a pydantic constraint), so a typo such as ``dim = 10**9`` is an
    error naming the field, not an attempt to allocate the weights.
    """

    dim: int = Field(default=64, gt=0, le=4096, description="Size of every token: the encoder's embedding_dim, 1 to 4096.")
    tokens: int = Field(default=1, ge=1, le=64, description="Tokens per reference, 1 to 64.")
    image_size: int = Field(default=32, ge=4, le=1024, description="References are resized to image_size x image_size pixels first (4 to 1024).")
    quantiles: tuple[float, ...] = Field(
        default=(0.1, 0.5, 0.9),
        min_length=1,
        max_length=64,
        description="Quantiles of each colour channel taken besides its mean and standard deviation, each in [0, 1] (at most 64).",
    )
    seed: int = Field(
        default=0,
        ge=-(2**63),
        le=2**64 - 1,
        description="Seed of the projection's initial weights, so two builds are identical (-2**63 to 2**64 - 1, torch's range).",
    )

    @field_validator("quantiles")
    @classmethod
    def _in_unit_interval(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        outside = [q for q in value if not 0.0 <= q <= 1.0]
        if outside:
            raise ValueError(f"quantiles must lie in [0, 1]; got {outside}")
        return value


class PixelStatsEncoder(torch.nn.Module):
    """Per reference: mean, standard deviation and quantiles of each RGB channel -> ``tokens`` tokens.

    Every reference yields ``config.tokens`` tokens whose ``source`` is the reference's index, so
    per-reference aggregators (``mean``, ``max``, ``concat``) apply. The unconditional encoding is
    all zeros with the same layout. It reads the images only, not the prompt.
    """

    #: The pipeline calls ``encode(references)`` without prompts, and encodes a group once whatever
    #: the prompt (an encoder that reads the prompt with the images sets this True).
    reads_prompt = False

    def __init__(self, config: PixelStatsConfig):
        super().__init__()
        self.config = config
        self.embedding_dim = config.dim
        features = 3 * (2 + len(config.quantiles))
        generator = torch.Generator().manual_seed(config.seed)
        self.proj = torch.nn.Linear(features, config.tokens * config.dim)
        with torch.no_grad():  # seeded initialisation, not part of any forward pass
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator) / features**0.5)
            self.proj.bias.zero_()

    @classmethod
    def from_config(cls, config: PixelStatsConfig, context: BuildContext) -> PixelStatsEncoder:
        """Build the encoder on the backbone's device and dtype (CPU float32 without a backbone)."""
        encoder = cls(config)
        backbone = context.backbone
        if backbone is not None:
            encoder.to(device=getattr(backbone, "device", None), dtype=getattr(backbone, "dtype", None))
        return encoder

    def statistics(self, images: Sequence[Image]) -> torch.Tensor:
        """``[M, 3 * (2 + len(quantiles))]``: the colour statistics of each image."""
        size = self.config.image_size
        pixels = np.stack([np.asarray(im.convert("RGB").resize((size, size), Resampling.BILINEAR), dtype=np.float32) for im in images])
        x = torch.from_numpy(pixels / 255.0).flatten(1, 2)  # [M, H*W, 3]
        q = torch.quantile(x, torch.tensor(self.config.quantiles), dim=1)  # [Q, M, 3]
        stats = torch.cat([x.mean(dim=1), x.std(dim=1, unbiased=False), *q], dim=-1)
        return stats.to(device=self.proj.weight.device, dtype=self.proj.weight.dtype)

    def encode(self, references: Sequence[Sequence[Image]], prompts: Sequence[str] | None = None) -> ReferenceEncoding:
        """One row per group: ``config.tokens`` tokens per reference. ``prompts`` is not read (``reads_prompt`` is False)."""
        counts = [len(group) for group in references]
        flat = [image for group in references for image in group]
        tokens = self.proj(self.statistics(flat)).reshape(len(flat), self.config.tokens, self.config.dim)
        return ReferenceEncoding.from_references(tokens, counts)

    def encode_unconditional(self, encoding: ReferenceEncoding, references: Sequence[Sequence[Image]]) -> ReferenceEncoding:
        """Zeros with the layout of ``encoding``: "no reference" for classifier-free guidance."""
        return ReferenceEncoding(torch.zeros_like(encoding.tokens), encoding.mask, encoding.source)

