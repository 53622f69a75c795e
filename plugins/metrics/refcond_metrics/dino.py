"""The ``dino-i`` metric: cosines of DINO ViT CLS embeddings, a generated image against each of its references.

Conventions (DreamBooth, arXiv 2208.12242, and the MRBench benchmark of EasyRef, arXiv 2412.09618):

- the model is DINO ViT-S/16 (``facebook/dino-vits16``, a transformers ``ViTModel``), self-supervised
  and so sensitive to what distinguishes one subject from another of its class, unlike CLIP;
- images are preprocessed by the image processor saved with the model, through its Pillow backend:
  for ``facebook/dino-vits16``, resized to 224 x 224 (bilinear, aspect not kept, no crop) and
  normalised with the ImageNet mean and standard deviation;
- the embedding of an image is the CLS token of the last layer after the final layer norm
  (``last_hidden_state[:, 0]``), not the pooler output;
- ``dino-i`` of a generated image is the mean, over its references, of the cosine between its
  embedding and each reference's, in [-1, 1].

Any vision transformer loadable with ``AutoModel`` whose ``last_hidden_state[:, 0]`` is a CLS
token works as ``model`` (DINOv2's ``facebook/dinov2-small`` too, with its own processor).
"""

from __future__ import annotations

import PIL.Image
import torch
from pydantic import Field
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from refcond import BuildContext, ConfigError, load_pretrained
from refcond_metrics.base import BatchMetric
from refcond_metrics.batch import Batch
from refcond_metrics.loading import MetricModelConfig, load_model, placement
from refcond_metrics.similarity import embed, mean_cosine_to_references

#: The DINO checkpoint of the DreamBooth / MRBench DINO-I numbers: ViT-S/16.
DEFAULT_DINO_MODEL = "facebook/dino-vits16"


class DinoMetricConfig(MetricModelConfig):
    """Options of the ``dino-i`` metric."""

    model: str = Field(
        default=DEFAULT_DINO_MODEL,
        min_length=1,
        max_length=4096,
        description="Hub id or local folder of a DINO vision transformer (ViTModel; DINOv2 works too) saved with its image "
        "processor. Offline, give a folder (or a hub id already in the local cache).",
    )


class DinoImageMetric(BatchMetric):
    """DINO-I: mean cosine between a generated image's DINO CLS embedding and each of its references' (ViT-S/16 by default)."""

    name = "dino-i"
    reads_references = True
    reads_prompts = False

    def __init__(self, model: torch.nn.Module, processor: object, config: DinoMetricConfig):
        self.model = model
        self.processor = processor
        self.config = config

    @classmethod
    def from_config(cls, config: DinoMetricConfig, context: BuildContext) -> DinoImageMetric:
        """Load ``config.model`` (model and image processor) on the configured device, or the backbone's."""
        who = f"metric {cls.name!r}"
        device, dtype = placement(config, context, who)
        model_type = getattr(load_pretrained(AutoConfig, config.model, who), "model_type", None)
        options = {"add_pooling_layer": False} if model_type == "vit" else {}  # the pooler is not read: do not build it
        model = load_model(AutoModel, config.model, who, device, dtype, **options)
        if getattr(model, "main_input_name", None) != "pixel_values":
            raise ConfigError(
                f"{who}: config model {config.model!r} holds a {type(model).__name__}, which does not read images alone. Give a "
                f"DINO vision transformer such as {DEFAULT_DINO_MODEL!r} (a ViTModel), or a folder saved from one."
            )
        processor = load_pretrained(AutoImageProcessor, config.model, who, backend="pil")
        return cls(model, processor, config)

    def image_embeddings(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """``[len(images), hidden_size]`` CLS embeddings of the last layer (RGB images, in batches)."""

        def run(chunk: list[PIL.Image.Image]) -> torch.Tensor:
            pixels = self.processor(images=chunk, return_tensors="pt").pixel_values  # type: ignore[operator]
            return self.model(pixel_values=pixels.to(device=self.model.device, dtype=self.model.dtype)).last_hidden_state[:, 0]

        return embed(run, images, self.config.batch_size)

    def score(self, batch: Batch) -> list[float]:
        """Mean cosine to the references of every generated image (generated images and references embedded together)."""
        return mean_cosine_to_references(self.image_embeddings(batch.pool), batch.images, batch.references)
