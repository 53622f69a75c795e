"""The probe's synthetic images: coloured shapes on black, 32 x 32, and the reference groups made of them.

An image has four quadrants; each holds at most one object, a shape (circle, square, upward
triangle, cross) in a saturated colour (red, green, blue, yellow, magenta, cyan): 24 classes,
``class = colour * 4 + shape``. Rendering is vectorised over images and objects.

A group has 3 to 5 references; all hold one *consistent element* (the target class), and no
other class is in all of them:

- ``plain``: the consistent element plus 1-3 random distractors (never the target class);
- ``binding``: the consistent element ``C*S*``, an object of colour ``C2`` whose shape is neither
  ``S*`` nor ``S2``, an object of shape ``S2`` whose colour is neither ``C*`` nor ``C2``, and, half
  the time, one object outside ``{C*, C2} x {S*, S2}``. The colours ``C*``, ``C2`` and the shapes
  ``S*``, ``S2`` are in every reference; only the pair ``C*S*`` is. Counting colours and shapes
  across the references leaves four candidates; only a model that keeps which colour goes with
  which shape in each reference finds the target.

Everything is drawn from the ``torch.Generator`` given, so a seed fixes the groups exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

#: The colours, in class order, as RGB in [0, 1].
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.15, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
#: The shapes, in class order.
SHAPES = ("circle", "square", "triangle", "cross")
#: Number of classes: every colour with every shape.
NUM_CLASSES = len(COLOURS) * len(SHAPES)
#: Side of an image in pixels; each quadrant is half of it.
SIZE = 32
#: Objects per image at most: one per quadrant.
SLOTS = 4
#: The fewest and the most references a group holds.
MIN_REFERENCES, MAX_REFERENCES = 3, 5
#: Radius range of an object, in pixels.
RADIUS = (3.5, 6.5)

Variant = Literal["binding", "plain"]
#: The task variants.
VARIANTS: tuple[Variant, ...] = ("binding", "plain")


@dataclass(frozen=True)
class Scenes:
    """Objects of ``I`` images, one slot per quadrant (absent slots have ``present`` False).

    :ivar colour: ``[I, 4]`` long, colour index per slot.
    :ivar shape: ``[I, 4]`` long, shape index per slot.
    :ivar present: ``[I, 4]`` bool.
    """

    colour: torch.Tensor
    shape: torch.Tensor
    present: torch.Tensor


@dataclass(frozen=True)
class Groups:
    """``G`` reference groups, each padded to :data:`MAX_REFERENCES` references.

    :ivar images: ``[G, 5, 3, 32, 32]`` float in [0, 1]; the images after a group's count are black.
    :ivar target: ``[G]`` long, the consistent element's class.
    :ivar counts: ``[G]`` long, how many references each group holds (3 to 5).
    """

    images: torch.Tensor
    target: torch.Tensor
    counts: torch.Tensor


def class_of(colour: int | torch.Tensor, shape: int | torch.Tensor) -> int | torch.Tensor:
    """The class index of a colour and a shape."""
    return colour * len(SHAPES) + shape


def class_name(index: int) -> str:
    """``"red circle"`` for class 0."""
    return f"{list(COLOURS)[index // len(SHAPES)]} {SHAPES[index % len(SHAPES)]}"


def render(scenes: Scenes, generator: torch.Generator) -> torch.Tensor:
    """Draw ``[I, 3, 32, 32]`` images: each present object in its quadrant, size and position jittered."""
    count = scenes.colour.shape[0]
    radius = RADIUS[0] + (RADIUS[1] - RADIUS[0]) * torch.rand(count, SLOTS, generator=generator)
    half = SIZE // 2
    room = (half / 2 - radius - 0.5).clamp(min=0)  # how far the centre may move and stay in the quadrant
    jitter = (2 * torch.rand(count, SLOTS, 2, generator=generator) - 1) * room[..., None]
    corner = torch.tensor([[0, 0], [half, 0], [0, half], [half, half]], dtype=torch.float32)
    centre = corner + half / 2 + jitter  # [I, 4, (x, y)]
    grid = torch.arange(SIZE, dtype=torch.float32) + 0.5
    dx = grid[None, None, None, :] - centre[..., 0, None, None]
    dy = grid[None, None, :, None] - centre[..., 1, None, None]
    coverage = (_inside(scenes.shape, dx, dy, radius[..., None, None]) + 0.5).clamp(0, 1) * scenes.present[..., None, None]
    palette = torch.tensor(list(COLOURS.values()))
    return torch.einsum("isyx,isc->icyx", coverage, palette[scenes.colour]).clamp(0, 1)


def _inside(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Roughly the signed distance to each shape's edge (positive inside), per pixel: ``[I, 4, 32, 32]``."""
    circle = r - (dx**2 + dy**2).sqrt()
    square = 0.8 * r - torch.maximum(dx.abs(), dy.abs())
    base, apex = 0.75 * r, -r  # an upward triangle: apex above the centre, flat base below it
    slope = (0.95 * r) / (base - apex)
    triangle = torch.minimum(base - dy, (slope * (dy - apex) - dx.abs()) / (1 + slope**2).sqrt())
    arm = 0.3 * r
    cross = torch.maximum(torch.minimum(arm - dx.abs(), r - dy.abs()), torch.minimum(arm - dy.abs(), r - dx.abs()))
    every = torch.stack([circle, square, triangle, cross])  # in SHAPES order
    return every.gather(0, shape[None, ..., None, None].expand(1, *every.shape[1:])).squeeze(0)


def random_scenes(count: int, generator: torch.Generator) -> Scenes:
    """``count`` images of 1 to 4 objects of independent random colours and shapes (the encoder's pretraining images)."""
    objects = torch.randint(1, SLOTS + 1, (count,), generator=generator)
    order = torch.rand(count, SLOTS, generator=generator).argsort(dim=1)  # which quadrants are used
    present = order < objects[:, None]
    colour = torch.randint(len(COLOURS), (count, SLOTS), generator=generator)
    shape = torch.randint(len(SHAPES), (count, SLOTS), generator=generator)
    return Scenes(colour, shape, present)


def presence_labels(scenes: Scenes) -> torch.Tensor:
    """``[I, 10]`` float: which of the 6 colours and which of the 4 shapes an image holds (no pairing)."""
    present = scenes.present[..., None]
    colours = (F.one_hot(scenes.colour, len(COLOURS)).bool() & present).any(dim=1)
    shapes = (F.one_hot(scenes.shape, len(SHAPES)).bool() & present).any(dim=1)
    return torch.cat([colours, shapes], dim=1).float()


def class_labels(scenes: Scenes) -> torch.Tensor:
    """``[I, 24]`` float: which of the 24 colour-shape classes an image holds (the pairing is in the labels)."""
    classes = class_of(scenes.colour, scenes.shape)
    return (F.one_hot(classes, NUM_CLASSES).bool() & scenes.present[..., None]).any(dim=1).float()


def group_scenes(variant: Variant, count: int, generator: torch.Generator) -> tuple[Scenes, torch.Tensor, torch.Tensor]:
    """The objects of ``count`` groups, each group's target class, and how many references each holds.

    Every group has 3 to :data:`MAX_REFERENCES` references, laid out as :data:`MAX_REFERENCES`
    images per group (``count * 5`` images; those after a group's count have no object). Groups
    are drawn from the variant's generator *conditioned on the target being the only class that
    every reference holds* — a drawn group with a second such class (the colour-``C2`` object
    taking the same shape in every reference, say) is drawn again — so each group has exactly one
    right answer. Each reference places its objects in random quadrants.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown probe variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    colour, shape, present, target, counts = _draw(variant, count, generator)
    while True:
        again = _ambiguous(colour, shape, present, counts).nonzero().flatten()
        if again.numel() == 0:
            break
        redrawn = _draw(variant, again.numel(), generator)
        for tensor, fresh in zip((colour, shape, present, target, counts), redrawn):
            tensor[again] = fresh
    quadrant = torch.rand(count, MAX_REFERENCES, SLOTS, generator=generator).argsort(dim=2)
    flat = lambda t: t.gather(2, quadrant).reshape(count * MAX_REFERENCES, SLOTS)  # noqa: E731
    return Scenes(flat(colour), flat(shape), flat(present)), target, counts


def _draw(variant: Variant, count: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Slots ``[G, 5, 4]`` (colour, shape, present; slot 0 is the target), targets ``[G]`` and counts ``[G]``."""
    n_colours, n_shapes, refs = len(COLOURS), len(SHAPES), MAX_REFERENCES
    colours = torch.rand(count, n_colours, generator=generator).argsort(dim=1)  # [C*, C2, four others]
    shapes = torch.rand(count, n_shapes, generator=generator).argsort(dim=1)  # [S*, S2, two others]
    target = class_of(colours[:, 0], shapes[:, 0])
    counts = torch.randint(MIN_REFERENCES, refs + 1, (count,), generator=generator)

    def pick(options: torch.Tensor) -> torch.Tensor:
        """One of each group's ``options`` ``[G, k]`` per reference, uniformly: ``[G, refs]``."""
        index = torch.randint(options.shape[1], (count, refs), generator=generator)
        return options.gather(1, index)

    colour = torch.zeros(count, refs, SLOTS, dtype=torch.long)
    shape = torch.zeros(count, refs, SLOTS, dtype=torch.long)
    present = torch.zeros(count, refs, SLOTS, dtype=torch.bool)
    colour[..., 0], shape[..., 0] = colours[:, :1], shapes[:, :1]  # the consistent element, in every reference
    present[..., 0] = True
    if variant == "binding":
        colour[..., 1], shape[..., 1] = colours[:, 1:2], pick(shapes[:, 2:])  # C2 with a shape outside {S*, S2}
        colour[..., 2], shape[..., 2] = pick(colours[:, 2:]), shapes[:, 1:2]  # S2 with a colour outside {C*, C2}
        colour[..., 3], shape[..., 3] = pick(colours[:, 2:]), pick(shapes[:, 2:])  # outside {C*, C2} x {S*, S2}
        present[..., 1:3] = True
        present[..., 3] = torch.rand(count, refs, generator=generator) < 0.5
    else:
        distractors = torch.randint(1, SLOTS, (count, refs), generator=generator)  # 1 to 3
        present[..., 1:] = torch.arange(1, SLOTS) <= distractors[..., None]
        # A random class other than the target: an offset of 1..23 from it.
        other = (target[:, None, None] + torch.randint(1, NUM_CLASSES, (count, refs, SLOTS - 1), generator=generator)) % NUM_CLASSES
        colour[..., 1:], shape[..., 1:] = other // n_shapes, other % n_shapes
    present &= (torch.arange(refs) < counts[:, None])[..., None]  # references past the count are empty
    return colour, shape, present, target, counts


def _ambiguous(colour: torch.Tensor, shape: torch.Tensor, present: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[G]`` bool: whether a group's references all hold some class besides the target."""
    held = (F.one_hot(class_of(colour, shape), NUM_CLASSES).bool() & present[..., None]).any(dim=2)  # [G, refs, classes]
    unused = torch.arange(MAX_REFERENCES) >= counts[:, None]
    return (held | unused[..., None]).all(dim=1).sum(dim=1) > 1


def sample_groups(variant: Variant, count: int, generator: torch.Generator) -> Groups:
    """``count`` rendered groups of the variant (see :func:`group_scenes`)."""
    scenes, target, counts = group_scenes(variant, count, generator)
    images = render(scenes, generator)
    return Groups(images.reshape(count, MAX_REFERENCES, 3, SIZE, SIZE), target, counts)
