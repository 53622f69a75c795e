"""The frame every built-in metric shares: check the call, run under ``torch.inference_mode``, one value per image."""

from __future__ import annotations

from typing import ClassVar

import PIL.Image
import torch

from refcond_metrics.batch import Batch, check_batch


class BatchMetric:
    """A :class:`refcond.Metric` reporting one measure, named after the metric: ``{name: [one value per image]}``.

    A subclass sets what it reads (:attr:`reads_references`, :attr:`reads_prompts`) and implements
    :meth:`score`; the call checks its arguments (:func:`refcond_metrics.batch.check_batch`) before
    any model runs, and runs :meth:`score` under ``torch.inference_mode``.
    """

    #: The registered name, and the key of the values the metric returns.
    name: ClassVar[str]
    #: Whether the metric reads the reference images (they are then loaded and embedded).
    reads_references: ClassVar[bool]
    #: Whether the metric reads the prompts (they are then checked to be strings).
    reads_prompts: ClassVar[bool]
    #: Images more elongated than this are refused; ``None`` takes any shape.
    max_aspect_ratio: ClassVar[float | None] = None

    def __call__(
        self,
        images: list[PIL.Image.Image],
        references: list[list[PIL.Image.Image]],
        prompts: list[str],
    ) -> dict[str, list[float]]:
        """``{name: [value of images[0], value of images[1], ...]}``; ``images[i]`` was generated from
        ``references[i]`` and ``prompts[i]``. Every distinct image object is embedded once."""
        batch = check_batch(
            f"metric {self.name!r}",
            images,
            references,
            prompts,
            reads_references=self.reads_references,
            reads_prompts=self.reads_prompts,
            max_aspect_ratio=self.max_aspect_ratio,
        )
        with torch.inference_mode():
            values = self.score(batch)
        if len(values) != len(batch):  # a subclass's bug, not the caller's
            raise RuntimeError(f"metric {self.name!r} scored {len(values)} values for {len(batch)} images")
        return {self.name: values}

    def score(self, batch: Batch) -> list[float]:
        """One value per generated image of a checked batch, in order."""
        raise NotImplementedError
