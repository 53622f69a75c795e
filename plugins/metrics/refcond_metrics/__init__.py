"""refcond-metrics: evaluation metrics for refcond, one value per generated image.

It registers, through the ``refcond`` entry point in ``pyproject.toml``, three metrics (hook
``refcond_register_metrics``), each a :class:`refcond.Metric`:

- ``clip-i``: mean cosine between the CLIP image embedding of a generated image and of each of its
  references (:class:`ClipImageMetric`);
- ``clip-t``: cosine between the CLIP image embedding of a generated image and the CLIP text
  embedding of its prompt (:class:`ClipTextMetric`);
- ``dino-i``: mean cosine between the DINO ViT CLS embedding of a generated image and of each of
  its references (:class:`DinoImageMetric`).

The defaults follow DreamBooth and MRBench: CLIP ViT-B/32 (``openai/clip-vit-base-patch32``) and
DINO ViT-S/16 (``facebook/dino-vits16``), each with the processor saved with it. Models load once,
when a metric is built, and run batched. Tiny offline models for tests are in
:mod:`refcond_metrics.testing`.
"""

from __future__ import annotations

from refcond import Register, hookimpl
from refcond_metrics.base import BatchMetric
from refcond_metrics.batch import MAX_ASPECT_RATIO, Batch, check_batch
from refcond_metrics.clip import DEFAULT_CLIP_MODEL, ClipImageMetric, ClipMetricConfig, ClipTextMetric
from refcond_metrics.dino import DEFAULT_DINO_MODEL, DinoImageMetric, DinoMetricConfig
from refcond_metrics.loading import MetricModelConfig

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "MAX_ASPECT_RATIO",
    "Batch",
    "BatchMetric",
    "ClipImageMetric",
    "ClipMetricConfig",
    "ClipTextMetric",
    "DinoImageMetric",
    "DinoMetricConfig",
    "MetricModelConfig",
    "check_batch",
]


@hookimpl
def refcond_register_metrics(register: Register) -> None:
    for metric, config in ((ClipImageMetric, ClipMetricConfig), (ClipTextMetric, ClipMetricConfig), (DinoImageMetric, DinoMetricConfig)):
        register(metric.name, metric.from_config, config=config, description=(metric.__doc__ or "").splitlines()[0])
