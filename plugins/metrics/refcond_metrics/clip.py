"""The ``clip-i`` and ``clip-t`` metrics: cosines of CLIP's projected image and text embeddings.

Conventions (DreamBooth, arXiv 2208.12242, and the MRBench benchmark of EasyRef, arXiv 2412.09618):

- the model is CLIP ViT-B/32 (``openai/clip-vit-base-patch32``), a ``CLIPModel`` with its
  ``CLIPProcessor``; another CLIP checkpoint (hub id or local folder) is one config option away;
- images are preprocessed by the processor saved with the model, through its Pillow backend (the
  same pixels whether or not torchvision is installed): for ViT-B/32, the short side resized to
  224 pixels (bicubic), the central 224 x 224 square cropped, normalised with CLIP's mean and
  standard deviation;
- embeddings are the projected ones (``get_image_features`` / ``get_text_features``: the pooled
  output through the visual / text projection), compared by cosine similarity;
- ``clip-i`` of a generated image is the mean, over its references, of the cosine between its
  embedding and each reference's; ``clip-t`` is the cosine between its embedding and its prompt's,
  the prompt truncated to CLIP's 77 tokens. Values are raw cosines in [-1, 1] (not the x100 or
  ``2.5 * max(cos, 0)`` CLIPScore scalings some papers print).
"""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch
from pydantic import Field
from transformers import AutoConfig, CLIPModel, CLIPProcessor

from refcond import BuildContext, ConfigError, load_pretrained
from refcond_metrics.base import BatchMetric
from refcond_metrics.batch import MAX_ASPECT_RATIO, Batch
from refcond_metrics.loading import MetricModelConfig, load_model, placement
from refcond_metrics.similarity import cosine, embed, mean_cosine_to_references

#: The CLIP checkpoint of the DreamBooth / MRBench CLIP-I and CLIP-T numbers: ViT-B/32.
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


class ClipMetricConfig(MetricModelConfig):
    """Options of the ``clip-i`` and ``clip-t`` metrics."""

    model: str = Field(
        default=DEFAULT_CLIP_MODEL,
        min_length=1,
        max_length=4096,
        description="Hub id or local folder of a CLIPModel saved with its CLIPProcessor (image processor and tokenizer). "
        "Offline, give a folder (or a hub id already in the local cache).",
    )


class _ClipMetric(BatchMetric):
    """What ``clip-i`` and ``clip-t`` share: a CLIP model and its processor, loaded once when the metric is built."""

    max_aspect_ratio = MAX_ASPECT_RATIO

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, config: ClipMetricConfig):
        self.model = model
        self.processor = processor
        self.config = config

    @classmethod
    def from_config(cls, config: ClipMetricConfig, context: BuildContext) -> _ClipMetric:
        """Load ``config.model`` (model and processor) on the configured device, or the backbone's."""
        who = f"metric {cls.name!r}"
        device, dtype = placement(config, context, who)
        model_type = getattr(load_pretrained(AutoConfig, config.model, who), "model_type", None)
        if model_type != "clip":
            raise ConfigError(
                f"{who}: config model {config.model!r} holds a {model_type!r} model, not a CLIP model (CLIPModel, with both "
                f"towers). Give a CLIP checkpoint such as {DEFAULT_CLIP_MODEL!r}, or a folder saved from one."
            )
        model = load_model(CLIPModel, config.model, who, device, dtype)
        processor = load_pretrained(CLIPProcessor, config.model, who, backend="pil")
        return cls(model, processor, config)

    def image_embeddings(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """``[len(images), projection_dim]`` projected CLIP image embeddings (RGB images, in batches)."""

        def run(chunk: list[PIL.Image.Image]) -> torch.Tensor:
            pixels = self.processor.image_processor(images=chunk, return_tensors="pt").pixel_values
            return _features(self.model.get_image_features(pixel_values=pixels.to(device=self.model.device, dtype=self.model.dtype)))

        return embed(run, images, self.config.batch_size)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """``[len(prompts), projection_dim]`` projected CLIP text embeddings, each prompt truncated to the model's length."""
        length = int(self.model.config.text_config.max_position_embeddings)

        def run(chunk: list[str]) -> torch.Tensor:
            tokens = self.processor.tokenizer(chunk, padding=True, truncation=True, max_length=length, return_tensors="pt")
            return _features(self.model.get_text_features(**{k: v.to(self.model.device) for k, v in tokens.items()}))

        return embed(run, prompts, self.config.batch_size)


class ClipImageMetric(_ClipMetric):
    """CLIP-I: mean cosine between a generated image's CLIP embedding and each of its references' (ViT-B/32 by default)."""

    name = "clip-i"
    reads_references = True
    reads_prompts = False

    def score(self, batch: Batch) -> list[float]:
        embeddings = self.image_embeddings(batch.pool)  # generated images and references together
        return mean_cosine_to_references(embeddings, batch.images, batch.references)


class ClipTextMetric(_ClipMetric):
    """CLIP-T: cosine between a generated image's CLIP embedding and its prompt's (ViT-B/32 by default)."""

    name = "clip-t"
    reads_references = False
    reads_prompts = True

    def score(self, batch: Batch) -> list[float]:
        texts = list(dict.fromkeys(batch.prompts))  # distinct prompts, in order
        text_row = {text: len(batch.pool) + k for k, text in enumerate(texts)}  # text rows follow the image rows
        embeddings = torch.cat([self.image_embeddings(batch.pool), self.text_embeddings(texts)])
        return cosine(embeddings, batch.images, [text_row[prompt] for prompt in batch.prompts]).tolist()


def _features(output: Any) -> torch.Tensor:
    """The projected embeddings from ``get_image_features`` / ``get_text_features``: a tensor (transformers 4)
    or an output whose ``pooler_output`` holds them (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
