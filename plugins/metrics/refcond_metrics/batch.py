"""The arguments of a metric call, checked and laid out for batched embedding.

A metric receives three parallel lists, one entry per generated image: ``images[i]`` was generated
from the reference group ``references[i]`` and the prompt ``prompts[i]``. :func:`check_batch`
refuses bad input with an error naming the position (``images[2]``, ``references[1][0]``,
``prompts[3]``), converts the images a metric reads to RGB as :func:`refcond.load_references` does,
and gathers them into one list of distinct images (:attr:`Batch.pool`): an image object that
appears several times (the same reference group behind several generated images, the same object
as generated image and reference) is embedded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image

from refcond import ConfigError, ReferenceImageError, load_references

#: The most elongated image the CLIP metrics take. CLIP's processor scales the short side to its
#: input size (224) before it crops the central square, so a 1x20000 image would grow to millions
#: of pixels: such images are refused before anything runs.
MAX_ASPECT_RATIO = 200.0


@dataclass(frozen=True)
class Batch:
    """A checked metric call: distinct RGB images, and where each generated image and reference sits among them.

    :ivar pool: the distinct images (by object identity) the metric reads, as RGB PIL images.
    :ivar images: ``images[i]`` is the position in :attr:`pool` of generated image ``i``.
    :ivar references: ``references[i]`` lists the positions in :attr:`pool` of the references of
        image ``i``; empty lists when the metric does not read references.
    :ivar prompts: the prompt of each generated image (as given; checked to be strings only when
        the metric reads them).
    """

    pool: list[PIL.Image.Image]
    images: list[int]
    references: list[list[int]]
    prompts: list[Any]

    def __len__(self) -> int:
        return len(self.images)


def check_batch(
    who: str,
    images: Sequence[PIL.Image.Image],
    references: Sequence[Sequence[PIL.Image.Image]],
    prompts: Sequence[str],
    *,
    reads_references: bool,
    reads_prompts: bool,
    max_aspect_ratio: float | None = None,
) -> Batch:
    """Check a metric call and lay it out as a :class:`Batch`.

    Every call must give three lists (or tuples) of the same, non-zero length; every reference
    group must be a non-empty list. Generated images must be PIL images; references may be anything
    :func:`refcond.load_references` reads (PIL images, paths, arrays). Both are converted to RGB the
    same way. Prompts are checked to be strings, and references are loaded, only when the metric
    reads them (``reads_prompts``, ``reads_references``).

    :param who: names the metric in messages (``"metric 'clip-i'"``).
    :param max_aspect_ratio: refuse images more elongated than this (``None``: any shape).
    :raises refcond.ConfigError: an argument is not a list, the lists are empty or of different
        lengths, a prompt is not a string.
    :raises refcond.ReferenceImageError: a generated image is not a PIL image, a reference group is
        not a list or is empty, an image cannot be read or is too elongated. The message names the
        position, e.g. ``references[1][0]``.
    """
    for name, value, kind in (("images", images, "PIL images"), ("references", references, "reference groups"), ("prompts", prompts, "strings")):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{who}: {name} must be a list of {kind}, one per generated image; got {_kind(value)}. "
                f"For one image, pass {name}=[...] with one entry."
            )
    if not images:
        raise ConfigError(f"{who}: images is empty; pass at least one generated image (with its reference group and prompt).")
    if not len(images) == len(references) == len(prompts):
        raise ConfigError(
            f"{who}: got {len(images)} images, {len(references)} reference groups and {len(prompts)} prompts; pass one "
            "reference group and one prompt per generated image (repeat a group or a prompt for several images of one sample)."
        )
    for i, group in enumerate(references):
        if not isinstance(group, (list, tuple)):
            raise ReferenceImageError(
                f"{who}: references[{i}] is {_kind(group)}, not a list: each entry of references is the group of references of one "
                "generated image, a list of images ([image] for a single reference)."
            )
        if not group:
            raise ReferenceImageError(f"{who}: references[{i}] is empty; every generated image needs at least one reference image.")
    if reads_prompts:
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ConfigError(f"{who}: prompts[{i}] is {_kind(prompt)}, not a string; pass the prompt image {i} was generated from.")

    pool: list[PIL.Image.Image] = []
    seen: dict[int, int] = {}  # id(object given) -> position in pool; every object stays alive during the call

    def place(item: Any, where: str) -> int:
        position = seen.get(id(item))
        if position is None:
            image = _load(item, where)
            if max_aspect_ratio is not None:
                _check_aspect_ratio(image, where, max_aspect_ratio)
            position = seen[id(item)] = len(pool)
            pool.append(image)
        return position

    image_at = []
    for i, image in enumerate(images):
        where = f"{who}: images[{i}]"
        if not isinstance(image, PIL.Image.Image):
            raise ReferenceImageError(
                f"{where} is {_kind(image)}, not a PIL image. Pass the generated images as PIL images (a diffusers pipeline's "
                "output .images); convert an array with PIL.Image.fromarray(array)."
            )
        image_at.append(place(image, where))
    references_at = [
        [place(item, f"{who}: references[{i}][{j}]") for j, item in enumerate(group)] if reads_references else []
        for i, group in enumerate(references)
    ]
    return Batch(pool=pool, images=image_at, references=references_at, prompts=list(prompts))


def _load(item: Any, where: str) -> PIL.Image.Image:
    """``item`` as an RGB PIL image, read as refcond reads a reference; errors name ``where`` instead of "reference 0"."""
    try:
        return load_references([item])[0]
    except ReferenceImageError as exc:
        message = str(exc)
        raise ReferenceImageError(where + message.removeprefix("reference 0") if message.startswith("reference 0") else f"{where}: {message}") from None


def _check_aspect_ratio(image: PIL.Image.Image, where: str, limit: float) -> None:
    width, height = image.size
    ratio = max(width, height) / min(width, height)
    if ratio > limit:
        raise ReferenceImageError(
            f"{where} is {width}x{height} pixels, an aspect ratio of {ratio:.4g}:1; this metric takes at most {limit:g}:1 (its "
            "processor scales the short side up to the model's input size before cropping the centre, so the long side would "
            "grow to millions of pixels). Crop the image to the part the metric should see."
        )


def _kind(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, str):
        return f"a string ({value[:40]!r}{'...' if len(value) > 40 else ''})"
    if isinstance(value, PIL.Image.Image):
        return "a PIL image"
    return f"a {type(value).__name__}"
