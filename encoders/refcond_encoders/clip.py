"""The ``clip`` encoder: a CLIP vision model with projection, as IP-Adapter uses it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL.Image import Image
from pydantic import Field
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from refcond import BorrowedWeights, BuildContext, ComponentConfig, ConfigError, ReferenceEncoding, ReferenceImageError, load_pretrained

# The Pillow image processor by name: transformers' CLIPImageProcessor needs torchvision and, without
# it, warns at import and falls back to this one; with torchvision both give the same pixels.
CLIPImageProcessor = CLIPImageProcessorPil

#: The most elongated reference the encoder takes. CLIP's processor scales the short side to the
#: model's size (224) before it crops the central square, so the long side grows with the ratio: a
#: 1x20000 image would become 224x4480000 pixels (seconds and gigabytes for a 20000-pixel input).
MAX_ASPECT_RATIO = 200


#: Bound of ``hidden_layer`` in the config (CLIP models have 12 to 48 layers); the model's own
#: number of layers is checked when the encoder is built.
MAX_LAYERS = 1024


class ClipEncoderConfig(ComponentConfig):
    """Options of the ``clip`` encoder."""

    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Hub id or local folder of a CLIPVisionModelWithProjection. None reuses the pipeline's image_encoder. "
        "A folder must exist when the encoder is built.",
    )
    subfolder: str | None = Field(
        default=None, max_length=4096, description="Subfolder of `model`, e.g. 'models/image_encoder' in h94/IP-Adapter."
    )
    output: Literal["image_embeds", "hidden_states"] = Field(
        default="image_embeds",
        description="'image_embeds': one pooled, projected vector per reference (IP-Adapter base). "
        "'hidden_states': every token of a hidden layer (IP-Adapter Plus).",
    )
    hidden_layer: int = Field(
        default=-2,
        ge=-MAX_LAYERS,
        le=MAX_LAYERS,
        description="Which hidden layer 'hidden_states' reads; -2 is the penultimate, 0 the embeddings. Checked against the "
        "model's layers when the encoder is built: a model with n layers takes -(n + 1) to n.",
    )


class ClipEncoder(torch.nn.Module):
    """CLIP vision encoder: pooled image embeddings or penultimate hidden states, one reference at a time.

    All references of all groups run through CLIP in one batch; a reference more elongated than
    ``MAX_ASPECT_RATIO`` (200:1) is refused before it runs. The CLIP model is borrowed (from the
    pipeline or the hub): it is not part of the module tree or of refcond checkpoints, which name it
    by source and content hash (:meth:`borrowed_weights`).
    """

    reads_prompt = False
    mixes_references = False

    def __init__(self, model: CLIPVisionModelWithProjection, processor: CLIPImageProcessor, config: ClipEncoderConfig):
        super().__init__()
        # Held outside the module tree: the pipeline owns these weights, refcond checkpoints skip them.
        self.__dict__["clip"] = model
        self.processor = processor
        self.config = config
        self.embedding_dim = model.config.projection_dim if config.output == "image_embeds" else model.config.hidden_size

    @classmethod
    def from_config(cls, config: ClipEncoderConfig, context: BuildContext) -> ClipEncoder:
        """Reuse the pipeline's ``image_encoder`` and ``feature_extractor``, or load ``config.model``."""
        pipeline = context.backbone.pipeline if context.backbone is not None else None
        if config.model is not None:
            model = load_pretrained(CLIPVisionModelWithProjection, config.model, "encoder 'clip'", subfolder=config.subfolder or "")
            if context.backbone is not None:
                model.to(device=context.backbone.device, dtype=context.backbone.dtype)
        else:
            model = getattr(pipeline, "image_encoder", None)
            if model is None:
                raise ConfigError(
                    "encoder 'clip': the pipeline has no image_encoder. Load the pipeline with one "
                    "(image_encoder=CLIPVisionModelWithProjection.from_pretrained(...)), or set the encoder's "
                    "config model='h94/IP-Adapter', subfolder='models/image_encoder' (SD1.5) or 'sdxl_models/image_encoder' (SDXL)."
                )
        if not isinstance(model, CLIPVisionModelWithProjection):
            raise ConfigError(f"encoder 'clip' needs a CLIPVisionModelWithProjection, got {type(model).__name__}.")
        layers = int(model.config.num_hidden_layers)
        if config.output == "hidden_states" and not -(layers + 1) <= config.hidden_layer <= layers:
            raise ConfigError(
                f"encoder 'clip': config hidden_layer is {config.hidden_layer}, but the CLIP model has {layers} layers, so its "
                f"hidden states are numbered -{layers + 1} to {layers} (0: the embeddings, -1: the last layer). "
                "Use -2 (the penultimate layer, as IP-Adapter Plus) or a layer within that range."
            )
        processor = getattr(pipeline, "feature_extractor", None)
        if processor is None:
            size = model.config.image_size
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return cls(model, processor, config)

    @property
    def clip(self) -> CLIPVisionModelWithProjection:
        return self.__dict__["clip"]

    def borrowed_weights(self) -> list[BorrowedWeights]:
        """The CLIP vision model, read but not owned (outside the module tree)."""
        source = self.config.model if self.config.model is None or not self.config.subfolder else f"{self.config.model}/{self.config.subfolder}"
        return [BorrowedWeights(module=self.clip, source=source or getattr(self.clip, "name_or_path", None) or None, prefix=None)]

    def _pixels(self, images: Sequence[Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        return pixels.to(device=self.clip.device, dtype=self.clip.dtype)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[M, T, D]``: T = 1 for pooled embeddings, all tokens for hidden states."""
        if self.config.output == "image_embeds":
            return self.clip(pixels).image_embeds[:, None, :]
        return self.clip(pixels, output_hidden_states=True).hidden_states[self.config.hidden_layer]

    def encode(self, references: Sequence[Sequence[Image]]) -> ReferenceEncoding:
        """Encode every reference of every group; refuses a reference over :data:`MAX_ASPECT_RATIO` before anything runs."""
        _check_sizes(references)
        flat = [image for group in references for image in group]
        features = self._features(self._pixels(flat))
        return ReferenceEncoding.from_references(features, [len(group) for group in references])

    def encode_unconditional(self, encoding: ReferenceEncoding, references: Sequence[Sequence[Image]]) -> ReferenceEncoding:
        """Zeros for pooled embeddings; CLIP run on all-zero pixels for hidden states (as diffusers does)."""
        if self.config.output == "image_embeds":
            return ReferenceEncoding(torch.zeros_like(encoding.tokens), encoding.mask, encoding.source)
        size = self.processor.crop_size
        zeros = torch.zeros(1, 3, size["height"], size["width"], device=self.clip.device, dtype=self.clip.dtype)
        blank = self._features(zeros)[0]  # [T, D]; the same for every reference
        counts = [len(group) for group in references]
        return ReferenceEncoding.from_references(blank.expand(sum(counts), -1, -1), counts)


def _check_sizes(references: Sequence[Sequence[Image]]) -> None:
    for b, group in enumerate(references):
        for i, image in enumerate(group):
            width, height = image.size
            filename = getattr(image, "filename", None)
            where = f"encoder 'clip': reference {i} of group {b}" + (f" ({filename!r})" if isinstance(filename, str) and filename else "")
            if width < 1 or height < 1:
                raise ReferenceImageError(f"{where} has no pixels ({width} wide, {height} high). Pass an image at least 1 pixel wide and high.")
            ratio = max(width, height) / min(width, height)
            if ratio > MAX_ASPECT_RATIO:
                raise ReferenceImageError(
                    f"{where} is {width}x{height} pixels, an aspect ratio of {ratio:.4g}:1, but the clip encoder takes at most "
                    f"{MAX_ASPECT_RATIO}:1: CLIP's processor scales the short side up to its input size before it crops the central "
                    "square, so the long side would grow to millions of pixels. Crop the image to the part CLIP should see."
                )
