"""Training data: reference groups with a target image and a caption, as a deterministic endless stream.

A data file is read and validated once, when :class:`TrainingData` is made; images are read only
when a sample is made (:meth:`TrainingData.__getitem__`, in the DataLoader's workers), through
:func:`refcond.images.load_reference`, the boundary every reference image goes through.

Two formats (``DataConfig.format``; ``"auto"`` picks ``jsonl`` for a ``.jsonl`` / ``.ndjson`` file,
and otherwise ``easyref`` when the first character is ``[`` and ``jsonl`` when it is ``{`` or ``#``):

**JSONL**, one record (a JSON object) per line::

    {"references": ["dog/1.jpg", "dog/2.jpg"], "image": "dog/3.jpg", "caption": "a dog on a beach"}
    {"references": ["cat/1.jpg"], "image": "cat/2.jpg", "caption": ["a cat", "a grey cat, indoors"]}
    # a comment line; blank lines are skipped too

- ``references`` (required): a list of 1 to :data:`MAX_LISTED_REFERENCES` image paths;
- ``image``: the target image's path; required unless ``self_reconstruction`` is 1, in which
  case a record without it reconstructs one of its references;
- ``caption`` (required): a string (``""`` for none) or a non-empty list of strings, one of which
  is chosen per sample;
- any other key is refused (with the closest known key suggested).

**EasyRef** (the official training JSON of TempleX98/EasyRef): one JSON array of records::

    [{"image_file": ["2.jpg", "3.jpg"], "text": ["A fantasy character."], "target": "1.jpg"},
     {"face": [[555.5, 71.1, 668.4, 233.4, 0.99]], "text": ["A fantasy character."], "target": "1.jpg"}]

- ``target`` (required): the target image; ``text`` (required): a caption or a list of them (an
  empty list means no caption, as in the official code);
- ``image_file``: a path or a list of paths, the references; or ``face``: face boxes
  ``[x1, y1, x2, y2(, score)]`` (as a list of boxes, or nested once more as the official README
  writes them), of which the first is used: the reference is then a square crop of the target
  around that box, expanded by a random 0-49 % on each side, shifted inside the image and flipped
  horizontally with probability 1/2. A record holds ``image_file`` or ``face``, not both.

In both formats a relative path is relative to the folder of the data file, strings are UTF-8
without NUL characters or unpaired surrogates, and JSON keys may not repeat. Every problem is a
:class:`~refcond.ConfigError` naming the file, the line (and the record of an EasyRef file), the
field, and what to write instead, raised before any image is opened.

Sample ``k`` of the stream (:meth:`TrainingData.__getitem__`) is a function of ``(seed, k)`` only:
epoch ``k // len(data)`` visits the records in a permutation seeded by ``(seed, epoch)``, and every
random choice of the sample comes from a generator seeded by ``(seed, k)``. The same ``k`` gives the
same sample in any DataLoader worker, process, or resumed run; :class:`SampleOrder` hands each
process of a distributed run its own share of the stream.
"""

from __future__ import annotations

import codecs
import errno
import functools
import itertools
import json
import math
import operator
import os
import random
import reprlib
import stat
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import numpy as np
import PIL.Image
import torch
from pydantic import Field, field_validator, model_validator

from refcond.config import ComponentConfig, validate_config
from refcond.errors import ConfigError, RefcondError, ReferenceImageError, did_you_mean
from refcond.images import _show_path, load_reference

__all__ = [
    "MAX_CAPTIONS",
    "MAX_CAPTION_CHARS",
    "MAX_DATA_FILE_BYTES",
    "MAX_LISTED_REFERENCES",
    "MAX_PATH_CHARS",
    "MAX_RECORDS",
    "MAX_RECORD_BYTES",
    "DataConfig",
    "Sample",
    "SampleOrder",
    "TrainingData",
    "collate",
    "make_loader",
]

#: The most records a data file may hold: 10 million.
MAX_RECORDS = 10_000_000
#: The most references one record may list (a sample uses at most ``max_references`` of them).
MAX_LISTED_REFERENCES = 1024
#: The most captions one record may list.
MAX_CAPTIONS = 1024
#: The longest caption, in characters.
MAX_CAPTION_CHARS = 100_000
#: The longest image path, in characters.
MAX_PATH_CHARS = 4096
#: The largest record: one line of a JSONL file, one element of an EasyRef array (4 MiB).
MAX_RECORD_BYTES = 4 * 1024 * 1024
#: The largest data file (16 GiB), checked from ``os.stat`` before the file is opened.
MAX_DATA_FILE_BYTES = 16 * 1024**3
#: The most boxes a ``face`` entry of an EasyRef record may list (the first is used).
MAX_FACES = 1024
#: The largest face-box coordinate, in magnitude (pixels).
MAX_COORDINATE = 2.0**31
#: The largest ``seed``, ``batch_size``, ``world``.
MAX_SEED = 2**64 - 1
MAX_BATCH_SIZE = 65_536
MAX_WORLD = 1 << 20

_JSONL_KEYS = ("references", "image", "caption")
_EASYREF_KEYS = ("image_file", "text", "target", "face")
_CHUNK = 1 << 20
_WHITESPACE = " \t\r\n"


class DataConfig(ComponentConfig):
    """Where the training data is and how samples are drawn from it."""

    path: str = Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="A JSONL file (one record a line) or an official EasyRef training JSON; paths inside it are relative to its folder.",
    )
    format: Literal["auto", "jsonl", "easyref"] = Field(
        default="auto", description="'jsonl', 'easyref', or 'auto': jsonl for a .jsonl/.ndjson file, else by the first character ('[' easyref, '{' or '#' jsonl)."
    )
    resolution: int = Field(default=512, ge=64, le=2048, description="Side of the square target image, 64 to 2048, a multiple of 8.")
    crop: Literal["center", "random"] = Field(
        default="center", description="The target is resized so that its short side is 'resolution', then cropped square at the 'center' or at a 'random' place."
    )
    min_references: int = Field(default=1, ge=1, le=64, description="References every sample has at least (1 to 64); a record listing fewer is refused.")
    max_references: int = Field(default=28, ge=1, le=64, description="References a sample uses at most (1 to 64, the official EasyRef uses 28); the rest are left out.")
    shuffle_references: bool = Field(default=True, description="Shuffle each sample's references (before max_references leaves some out).")
    truncate_rate: float = Field(
        default=0.0, ge=0, le=1, description="Probability (0 to 1) of keeping a random 2..n-1 of a sample's n > 2 references (official EasyRef stage 3: 0.4)."
    )
    self_reconstruction: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Probability (0 to 1) that the target is one of the sample's references, which then gets the target's resize and crop; "
        "at 1, JSONL records may leave out 'image'.",
    )
    on_bad_file: Literal["skip", "error"] = Field(
        default="skip", description="A missing or unreadable image: 'skip' the sample (it is reported as skipped) or raise an 'error'."
    )
    workers: int = Field(default=0, ge=0, le=64, description="DataLoader worker processes reading images (0 to 64; 0 reads in the training process).")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples by 8), got {value}; e.g. {max(64, value // 8 * 8)}")
        return value

    @model_validator(mode="after")
    def _references_range(self) -> DataConfig:
        if self.min_references > self.max_references:
            raise ValueError(f"min_references ({self.min_references}) is more than max_references ({self.max_references}): lower one or raise the other")
        return self


@dataclass
class Sample:
    """One sample of the stream: a target, its references and its caption (or why it was skipped)."""

    #: The global sample number ``k`` it was made for.
    number: int
    #: Which record of the data file (0-based, in file order).
    record: int
    #: The target, ``[3, R, R]`` float32 in [-1, 1]; ``None`` when the sample was skipped.
    image: torch.Tensor | None
    #: The references, RGB PIL images (encoders resize them themselves); empty when skipped.
    references: list[PIL.Image.Image]
    #: The caption chosen for this sample (``""`` for none).
    caption: str
    #: ``(height, width)`` of the target before it was resized and cropped (SDXL's added time ids).
    original_size: tuple[int, int]
    #: ``(top, left)`` of the crop in the resized target (SDXL's added time ids).
    crop_top_left: tuple[int, int]
    #: Why the sample was skipped (the file and the reason), or ``None``.
    skipped: str | None = None


class TrainingData(torch.utils.data.Dataset):
    """The samples of a data file, as an endless deterministic stream indexed by the sample number ``k``.

    The file is read and validated once, here; it is kept as one compact block of bytes (not one
    Python object per record), so that DataLoader workers share it without copying it.

    :param config: a :class:`DataConfig`, or a mapping of its fields.
    :param seed: seeds the order of the records and every random choice of every sample (0 to 2**64 - 1).
    :raises ConfigError: the config, the seed or the data file is invalid: the message names the
        file, the line (and record), the field, and what to write instead.
    """

    def __init__(self, config: DataConfig | Mapping[str, Any], seed: int = 0):
        if not isinstance(config, DataConfig):
            config = validate_config(DataConfig, config, where="the training data")  # type: ignore[assignment,arg-type]
        self.config: DataConfig = config  # type: ignore[assignment]
        self.seed = _bounded_int(seed, "seed", 0, MAX_SEED)
        self._shown = config.path
        self._path = os.path.abspath(config.path)
        self._folder = os.path.dirname(self._path)
        self._permutation_cache: tuple[int, np.ndarray] | None = None
        self._blob, self._offsets, self._lines = _read_data_file(self._path, self._shown, config)

    def __len__(self) -> int:
        """The number of records."""
        return len(self._lines)

    def __getitem__(self, k: int) -> Sample:
        """Sample number ``k`` (any ``k >= 0``): record ``permutation(seed, k // len)[k % len]``, drawn with a generator seeded by ``(seed, k)``.

        :raises ReferenceImageError: an image of the sample cannot be read and ``on_bad_file`` is
            ``"error"`` (with ``"skip"`` the sample comes back with ``skipped`` set instead).
        """
        k = operator.index(k)
        record = self.record_of(k)
        target, references, captions, face = self._record(record)
        rng = random.Random(f"refcond.training.data/{self.seed}/{k}")
        caption = captions[rng.randrange(len(captions))] if len(captions) > 1 else (captions[0] if captions else "")
        try:
            image, chosen, original_size, crop_top_left = self._draw(record, rng, target, references, face)
        except _BadFile as bad:
            if self.config.on_bad_file == "error":
                raise ReferenceImageError(f"{bad.path}: {bad.reason}") from None
            return Sample(k, record, None, [], caption, (0, 0), (0, 0), skipped=f"{bad.path}: {bad.reason}")
        return Sample(k, record, image, chosen, caption, original_size, crop_top_left)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_permutation_cache"] = None  # recomputed where needed: no reason to send it to every worker
        return state

    def record_of(self, k: int) -> int:
        """Which record sample number ``k`` is made from (nothing is read): ``permutation(seed, k // len)[k % len]``."""
        try:
            k = operator.index(k)
        except TypeError:
            raise TypeError(f"a sample number is an integer, not {type(k).__name__}") from None
        if k < 0:
            raise IndexError(f"sample numbers start at 0, got {k}")
        epoch, position = divmod(k, len(self))
        return int(self._permutation(epoch)[position])

    def line(self, record: int) -> int:
        """The line of the data file where ``record`` starts (1-based)."""
        return int(self._lines[record])

    # -- one sample -------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        cached = self._permutation_cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch]))).permutation(len(self))
        if len(self) < 2**31:
            order = order.astype(np.int32)
        self._permutation_cache = (epoch, order)
        return order

    def _record(self, record: int) -> tuple[str | None, list[str] | None, list[str], list[float] | None]:
        start, end = int(self._offsets[record]), int(self._offsets[record + 1])
        target, references, captions, face = json.loads(self._blob[start:end])
        return target, references, captions, face

    def _resolve(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self._folder, path)

    def _draw(
        self, record: int, rng: random.Random, target: str | None, references: list[str] | None, face: list[float] | None
    ) -> tuple[torch.Tensor, list[PIL.Image.Image], tuple[int, int], tuple[int, int]]:
        config = self.config
        where = f"line {self.line(record)} of {self._shown}"
        # Which references: a face crop (drawn once the target is read), or the listed ones shuffled, capped and truncated.
        listed: list[str | None] = [None] if references is None else list(references)
        if config.shuffle_references and len(listed) > 1:
            rng.shuffle(listed)
        listed = listed[: config.max_references]
        low = max(2, config.min_references)
        if rng.random() < config.truncate_rate and len(listed) > 2 and low <= len(listed) - 1:
            listed = listed[: rng.randint(low, len(listed) - 1)]
        # Whether the target is one of the references (a record without a target always reconstructs one).
        reconstruct = target is None or rng.random() < config.self_reconstruction
        pick = rng.randrange(len(listed)) if reconstruct else -1

        loaded: dict[str, PIL.Image.Image] = {}

        def read(path: str, role: str, index: int) -> PIL.Image.Image:
            full = self._resolve(path)
            if full not in loaded:
                try:
                    loaded[full] = load_reference(full, index, group=record)
                except RefcondError as exc:
                    reason = str(exc).removeprefix(f"reference {index} of group {record} ({_show_path(full)}): ")  # the path is said once
                    raise _BadFile(full, f"{reason} ({role} of record {record}, {where})") from None
            return loaded[full]

        needed = target is not None and (not reconstruct or references is None)  # a face record crops its reference from the target
        target_image = read(target, "target", 0) if needed else None  # type: ignore[arg-type]
        images: list[PIL.Image.Image] = []
        for index, path in enumerate(listed):
            if path is None:  # the face crop of the target
                assert target is not None and target_image is not None and face is not None
                images.append(_face_crop(target_image, face, rng, self._resolve(target), f"the face box of record {record}, {where}"))
            else:
                images.append(read(path, f"reference {index}", index))
        source = images[pick] if reconstruct else target_image
        assert source is not None
        resized, tensor, original_size, crop_top_left = _resize_and_crop(source, config.resolution, config.crop, rng)
        # A reference that is the target itself gets the target's resize and crop: the model sees what it reconstructs.
        target_full = self._resolve(target) if target is not None and not reconstruct else None
        for index, path in enumerate(listed):
            if index == pick or (target_full is not None and path is not None and self._resolve(path) == target_full):
                images[index] = resized.copy()
        return tensor, images, original_size, crop_top_left


class _BadFile(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = path, reason


def _resize_and_crop(image: PIL.Image.Image, size: int, crop: str, rng: random.Random) -> tuple[PIL.Image.Image, torch.Tensor, tuple[int, int], tuple[int, int]]:
    """The image resized so that its short side is ``size`` and cropped square: ``(crop, tensor, (h, w), (top, left))``.

    Only the crop is resampled (``resize(box=...)`` reads the pixels around it as a resize of the
    whole image would), so an image of extreme aspect ratio never becomes a huge one.
    """
    width, height = image.size
    if width <= height:
        new_width, new_height = size, max(size, round(height * size / width))
    else:
        new_width, new_height = max(size, round(width * size / height)), size
    if crop == "random":
        top, left = rng.randint(0, new_height - size), rng.randint(0, new_width - size)
    else:
        top, left = (new_height - size) // 2, (new_width - size) // 2
    scale_x, scale_y = width / new_width, height / new_height
    box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
    cropped = image.resize((size, size), PIL.Image.Resampling.BILINEAR, box=box)
    tensor = torch.from_numpy(np.asarray(cropped, dtype=np.float32)).permute(2, 0, 1).contiguous() / 127.5 - 1.0
    return cropped, tensor, (height, width), (top, left)


def _face_crop(image: PIL.Image.Image, face: list[float], rng: random.Random, path: str, where: str) -> PIL.Image.Image:
    """A square crop of ``image`` around the face box, expanded by a random 0-49 % a side, kept inside the image, flipped with probability 1/2."""
    width, height = image.size
    x1, y1, x2, y2 = face
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise _BadFile(
            path,
            f"{where}: the face box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] lies outside the image ({width} wide, {height} high). "
            "Check that the box was detected on this image.",
        )
    ratio = rng.randrange(50) / 100
    side = max(x2 - x1, y2 - y1) * (1 + 2 * ratio)
    side = max(1, min(round(side), width, height))
    left = min(max(round((x1 + x2) / 2 - side / 2), 0), width - side)
    top = min(max(round((y1 + y2) / 2 - side / 2), 0), height - side)
    crop = image.crop((left, top, left + side, top + side))
    if rng.random() < 0.5:
        crop = crop.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    return crop


# -- batches and order ----------------------------------------------------------------------------


def collate(samples: list[Sample], *, resolution: int | None = None) -> dict[str, Any]:
    """A batch of samples; skipped ones are left out of everything but ``"skipped"``.

    :returns: ``{"numbers", "pixel_values" [B, 3, R, R], "references" (a list of PIL lists),
        "captions", "original_sizes" [B, 2] long, "crops_top_left" [B, 2] long, "skipped"}``;
        ``B`` may be 0 (every sample skipped), and ``pixel_values`` is then ``[0, 3, R, R]`` with
        ``R = resolution`` (0 when not given).
    """
    kept = [sample for sample in samples if sample.skipped is None]
    if kept:
        pixel_values = torch.stack([sample.image for sample in kept])  # type: ignore[misc]
    else:
        side = resolution or 0
        pixel_values = torch.empty((0, 3, side, side), dtype=torch.float32)
    return {
        "numbers": [sample.number for sample in kept],
        "pixel_values": pixel_values,
        "references": [sample.references for sample in kept],
        "captions": [sample.caption for sample in kept],
        "original_sizes": torch.tensor([sample.original_size for sample in kept], dtype=torch.long).reshape(-1, 2),
        "crops_top_left": torch.tensor([sample.crop_top_left for sample in kept], dtype=torch.long).reshape(-1, 2),
        "skipped": [sample.skipped for sample in samples if sample.skipped is not None],
    }


class SampleOrder(torch.utils.data.Sampler[int]):
    """The sample numbers one process takes, forever: ``start * world + rank``, then every ``world``-th.

    Process ``rank`` of ``world`` takes ``k = rank, rank + world, ...``; ``start`` skips the first
    ``start`` of its own (a resumed run passes the number of samples it already used).
    """

    def __init__(self, start: int = 0, rank: int = 0, world: int = 1):
        super().__init__()
        self.world = _bounded_int(world, "world", 1, MAX_WORLD)
        self.rank = _bounded_int(rank, "rank", 0, self.world - 1)
        self.start = _bounded_int(start, "start", 0, None)

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start * self.world + self.rank, self.world)


def make_loader(data: TrainingData, batch_size: int, *, start: int = 0, rank: int = 0, world: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader over ``data`` in :class:`SampleOrder`, batched by :func:`collate`, with ``config.workers`` workers."""
    if not isinstance(data, TrainingData):
        raise ConfigError(f"make_loader reads a TrainingData, not {_kind(data)}.")
    batch_size = _bounded_int(batch_size, "batch_size", 1, MAX_BATCH_SIZE)
    workers = data.config.workers
    return torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        sampler=SampleOrder(start, rank, world),
        collate_fn=functools.partial(collate, resolution=data.config.resolution),
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )


def _bounded_int(value: Any, name: str, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, not {_kind(value)}.")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name} must be {bound}, got {_shorter(value)}.")
    return value


# -- reading and validating the data file ----------------------------------------------------------


def _read_data_file(path: str, shown: str, config: DataConfig) -> tuple[bytes, np.ndarray, np.ndarray]:
    """``(blob, offsets, lines)``: every record, validated and normalised, as compact JSON one after the other."""
    handle = _open_regular(path, shown)
    with handle:
        data_format = config.format
        if data_format == "auto":
            data_format = _detect_format(handle, path, shown)
            handle.seek(0)
        blob = bytearray()
        offsets = array("q", [0])
        lines = array("q")
        records = _jsonl_records(handle, shown) if data_format == "jsonl" else _easyref_records(handle, shown)
        for index, (line, value) in enumerate(records):
            if index >= MAX_RECORDS:
                raise ConfigError(f"{shown}:{line}: more than {MAX_RECORDS:,} records, the most a data file may hold. Split the data, or sample from it.")
            where = f"{shown}:{line}" if data_format == "jsonl" else f"{shown}:{line} (record {index})"
            normal = _jsonl_record(value, where, config) if data_format == "jsonl" else _easyref_record(value, where)
            listed = 1 if normal[1] is None else len(normal[1])
            if listed < config.min_references:
                raise ConfigError(
                    f"{where}: lists {listed} reference{'s' if listed != 1 else ''}, fewer than min_references = {config.min_references}. "
                    "Give the record more references, remove it, or lower min_references."
                )
            blob += json.dumps(normal, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            offsets.append(len(blob))
            lines.append(line)
    if not lines:
        raise ConfigError(
            f"{shown}: holds no records. Write one JSON object per line (JSONL), or a JSON array of records (EasyRef); see docs/training-data.md."
        )
    return bytes(blob), np.frombuffer(offsets, dtype=np.int64).copy(), np.frombuffer(lines, dtype=np.int64).copy()


def _open_regular(path: str, shown: str) -> BinaryIO:
    """The data file opened for reading, refused without opening it unless ``stat`` says it is a regular file of a sane size."""
    what = f"data file {shown!r}"
    if "\0" in path:
        raise ConfigError(f"{what}: the path contains a NUL character, which no file name can hold. Check how the path was built.")
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{what}: {_os_problem(exc)}") from None
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{what} is a folder. Give the path of the .jsonl or .json file inside it.")
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
        raise ConfigError(f"{what} is {kind}, not a regular file; refcond does not open it (reading could wait forever). Save the data to a file.")
    if info.st_size > MAX_DATA_FILE_BYTES:
        raise ConfigError(
            f"{what} holds {info.st_size:,} bytes, more than the {MAX_DATA_FILE_BYTES:,} a data file may "
            "(refcond.training.data.MAX_DATA_FILE_BYTES). Split it, or check that the path names the data file."
        )
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError(f"{what}: {_os_problem(exc)}") from None
    handle = os.fdopen(fd, "rb")
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino) or not stat.S_ISREG(opened.st_mode):
        handle.close()
        raise ConfigError(f"{what} was replaced while it was being opened. Try again once it is written.")
    return handle


def _os_problem(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "not found. Check the path (a relative path is relative to the current folder, or to the training config's folder)."
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied. Make the file (and the folders above it) readable."
    if exc.errno == errno.ENAMETOOLONG:
        return "the path, or a name in it, is too long for the file system. Move the file to a shorter path."
    if exc.errno == errno.ENOTDIR:
        return "a part of the path that should be a folder is a file. Check the path."
    if exc.errno == errno.ELOOP:
        return "too many levels of symbolic links. Fix the link."
    return f"cannot be read ({exc.strerror or exc}). Check the path and the disk."


def _detect_format(handle: BinaryIO, path: str, shown: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    while True:
        chunk = handle.read(_CHUNK)
        if not chunk:
            raise ConfigError(f"{shown}: holds no records (it is empty, or only whitespace).")
        text = chunk.lstrip(b" \t\r\n")
        if text.startswith(codecs.BOM_UTF8):
            text = text[len(codecs.BOM_UTF8) :].lstrip(b" \t\r\n")
        if text:
            break
    first = text[:1]
    if first == b"[":
        return "easyref"
    if first in (b"{", b"#"):
        return "jsonl"
    raise ConfigError(
        f"{shown}: cannot tell the format: it starts with {_short(text[:20])}, neither '[' (an EasyRef training JSON array) nor "
        "'{' (a JSONL record). Fix the file, or set format = 'jsonl' or 'easyref'."
    )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)


def _json_problem(exc: BaseException) -> str:
    """What a JSON decoding failure means, in one sentence."""
    if isinstance(exc, _DuplicateKey):
        return f"the key {_short(exc.key)} appears twice in one object; keep one"
    if isinstance(exc, RecursionError):
        return "nested too deeply; a record nests at most a few levels"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {exc.msg} (column {exc.colno})"
    reason = str(exc)
    if "integer string conversion" in reason or "exceeds the limit" in reason:
        return "holds an integer of more than 4300 digits, which no field takes"
    return f"not valid JSON: {reason[:200]}"


def _jsonl_records(handle: BinaryIO, shown: str) -> Iterator[tuple[int, Any]]:
    """``(line, value)`` for every record line of a JSONL file (blank and ``#`` lines skipped)."""
    for number in itertools.count(1):
        raw = handle.readline(MAX_RECORD_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_RECORD_BYTES:
            raise ConfigError(
                f"{shown}:{number}: the line is longer than {MAX_RECORD_BYTES:,} bytes, the most one record may take "
                "(refcond.training.data.MAX_RECORD_BYTES). Check that the file is a JSONL file (one record a line)."
            )
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{shown}:{number}: not UTF-8 text (byte {exc.start + 1} of the line is {_short(raw[exc.start : exc.start + 1])}). Save the file as UTF-8.") from None
        stripped = text.strip(_WHITESPACE)
        if not stripped or stripped.startswith("#"):
            continue
        try:
            value = _DECODER.decode(stripped)
        except (ValueError, RecursionError, _DuplicateKey) as exc:
            hint = ""
            if stripped.startswith("["):
                hint = " This looks like a JSON array: for an EasyRef training JSON set format = 'easyref'."
            elif isinstance(exc, json.JSONDecodeError):
                hint = " Each line of a JSONL file is one complete JSON object."
            raise ConfigError(f"{shown}:{number}: {_json_problem(exc)}.{hint}") from None
        yield number, value


def _easyref_records(handle: BinaryIO, shown: str) -> Iterator[tuple[int, Any]]:
    """``(line, value)`` for every element of the JSON array an EasyRef file holds, read a chunk at a time."""
    reader = _ArrayReader(handle, shown)
    yield from reader.elements()


class _ArrayReader:
    """Reads a JSON array element by element: memory stays within a few records, whatever the file's size."""

    def __init__(self, handle: BinaryIO, shown: str):
        self.handle, self.shown = handle, shown
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.buffer, self.pos, self.eof = "", 0, False
        self.line_base = 1  # the line of buffer[0]
        self.raw_newlines = 0  # newlines in the bytes decoded so far
        self.first = True

    def line(self, pos: int | None = None) -> int:
        return self.line_base + self.buffer.count("\n", 0, self.pos if pos is None else pos)

    def more(self) -> None:
        if self.eof:
            return
        if self.pos > _CHUNK:  # drop what was read
            self.line_base += self.buffer.count("\n", 0, self.pos)
            self.buffer, self.pos = self.buffer[self.pos :], 0
        chunk = self.handle.read(_CHUNK)
        if self.first and chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8) :]
        self.first = False
        try:
            text = self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            line = 1 + self.raw_newlines + chunk[: max(0, exc.start)].count(b"\n")
            raise ConfigError(f"{self.shown}:{line}: not UTF-8 text. Save the file as UTF-8.") from None
        self.raw_newlines += chunk.count(b"\n")
        self.buffer += text
        self.eof = not chunk

    def skip_whitespace(self) -> str:
        """The next character that is not whitespace ('' at the end of the file)."""
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if self.eof:
                return ""
            self.more()

    def elements(self) -> Iterator[tuple[int, Any]]:
        first = self.skip_whitespace()
        if first != "[":
            if first == "{":
                raise ConfigError(
                    f"{self.shown}:{self.line()}: an EasyRef training file is a JSON array of records ([{{...}}, ...]), but this one starts with an object. "
                    "For one record a line, set format = 'jsonl'."
                )
            raise ConfigError(f"{self.shown}:{self.line()}: an EasyRef training file is a JSON array of records ([{{...}}, ...]); it starts with {_short(first)}.")
        self.pos += 1
        index = 0
        while True:
            char = self.skip_whitespace()
            if char == "]" and index == 0:
                self.pos += 1
                break
            if char == "":
                raise ConfigError(f"{self.shown}:{self.line()}: the file ends inside the array (a ']' is missing, or the file was cut short).")
            line = self.line()
            yield line, self.element(line, index)
            index += 1
            char = self.skip_whitespace()
            if char == ",":
                self.pos += 1
                continue
            if char == "]":
                self.pos += 1
                break
            if char == "":
                raise ConfigError(f"{self.shown}:{self.line()}: the file ends inside the array (a ']' is missing, or the file was cut short).")
            raise ConfigError(f"{self.shown}:{self.line()}: expected ',' or ']' after record {index - 1}, found {_short(char)}.")
        if self.skip_whitespace() != "":
            raise ConfigError(f"{self.shown}:{self.line()}: text after the array's closing ']'. An EasyRef training file holds one JSON array.")

    def element(self, line: int, index: int) -> Any:
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as exc:
                if not self.eof and len(self.buffer) - self.pos <= MAX_RECORD_BYTES:
                    self.more()  # the record may continue in the next chunk
                    continue
                where = f"{self.shown}:{self.line(exc.pos)} (record {index})"
                if not self.eof:
                    raise ConfigError(
                        f"{where}: a record larger than {MAX_RECORD_BYTES:,} characters (refcond.training.data.MAX_RECORD_BYTES), or {_json_problem(exc)}."
                    ) from None
                raise ConfigError(f"{where}: {_json_problem(exc)}.") from None
            except (ValueError, RecursionError, _DuplicateKey) as exc:
                raise ConfigError(f"{self.shown}:{line} (record {index}): {_json_problem(exc)}.") from None
            self.pos = end
            return value


# -- records -------------------------------------------------------------------------------------


def _jsonl_record(value: Any, where: str, config: DataConfig) -> list[Any]:
    """A JSONL record as ``[target or None, references, captions, None]``."""
    if not isinstance(value, dict):
        hint = " This line is a JSON array: for an EasyRef training JSON set format = 'easyref'." if isinstance(value, list) else ""
        raise ConfigError(f'{where}: a record is a JSON object {{"references": [...], "image": "...", "caption": "..."}}, not {_kind(value)}.{hint}')
    if value and not set(value) & set(_JSONL_KEYS) and set(value) <= set(_EASYREF_KEYS):
        raise ConfigError(
            f"{where}: this is a record of the official EasyRef format ({', '.join(repr(k) for k in value)}), read as JSONL. An EasyRef training "
            "file is one JSON array of such records ([{...}, ...]); or write JSONL records with 'references', 'image' and 'caption'."
        )
    _known_keys(value, _JSONL_KEYS, where)
    if "references" not in value:
        raise ConfigError(f'{where}: the record has no "references": add the list of reference image paths, e.g. "references": ["a.jpg", "b.jpg"].')
    references = _path_list(value["references"], "references", where, single_ok=False)
    if "image" in value:
        target = _path(value["image"], "image", where)
    elif config.self_reconstruction == 1:
        target = None
    else:
        raise ConfigError(
            f'{where}: the record has no "image": add the target image\'s path ("image": "target.jpg"), or set self_reconstruction = 1 '
            "to train on reconstructing a reference."
        )
    if "caption" not in value:
        raise ConfigError(f'{where}: the record has no "caption": add one ("caption": "a dog on a beach"), or "caption": "" for none.')
    captions = _captions(value["caption"], "caption", where, empty_ok=False)
    return [target, references, captions, None]


def _easyref_record(value: Any, where: str) -> list[Any]:
    """An EasyRef record as ``[target, references or None, captions, face box or None]``."""
    if not isinstance(value, dict):
        raise ConfigError(f'{where}: a record is a JSON object {{"image_file": [...], "text": [...], "target": "..."}}, not {_kind(value)}.')
    _known_keys(value, _EASYREF_KEYS, where)
    for key in ("target", "text"):
        if key not in value:
            raise ConfigError(f'{where}: the record has no "{key}": every record needs "target" (the target image) and "text" (its captions).')
    target = _path(value["target"], "target", where)
    captions = _captions(value["text"], "text", where, empty_ok=True)
    if "face" in value and "image_file" in value:
        raise ConfigError(f'{where}: the record has both "image_file" and "face": give the reference images ("image_file") or a face box of the target ("face"), not both.')
    if "face" in value:
        return [target, None, captions, _face_box(value["face"], where)]
    if "image_file" not in value:
        raise ConfigError(f'{where}: the record has neither "image_file" (the reference images) nor "face" (a face box of the target to crop the reference from).')
    return [target, _path_list(value["image_file"], "image_file", where, single_ok=True), captions, None]


def _known_keys(value: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in value:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {_short(key)}.{did_you_mean(key, known)} A record holds {', '.join(repr(k) for k in known)}.")


def _path(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {field} is {_kind(value)}, not a path: write the image's path as a JSON string.")
    if not value.strip():
        raise ConfigError(f"{where}: {field} is an empty path: write the image's path.")
    if len(value) > MAX_PATH_CHARS:
        raise ConfigError(f"{where}: {field} is a path of {len(value):,} characters, more than the {MAX_PATH_CHARS} a path may have.")
    if "\0" in value:
        raise ConfigError(f"{where}: {field} contains a NUL character (\\u0000), which no file name can hold.")
    _utf8(value, field, where)
    return value


def _utf8(value: str, field: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{where}: {field} holds an unpaired surrogate (a \\ud800-\\udfff escape), which is not text. Fix the escape.") from None


def _path_list(value: Any, field: str, where: str, *, single_ok: bool) -> list[str]:
    if single_ok and isinstance(value, str):
        return [_path(value, field, where)]
    if not isinstance(value, list):
        also = "a path or " if single_ok else ""
        raise ConfigError(f'{where}: {field} is {_kind(value)}: give {also}a list of image paths, e.g. ["a.jpg", "b.jpg"].')
    if not value:
        raise ConfigError(f"{where}: {field} is an empty list: give at least one image path (or remove the record).")
    if len(value) > MAX_LISTED_REFERENCES:
        raise ConfigError(
            f"{where}: {field} lists {len(value):,} images, more than the {MAX_LISTED_REFERENCES} a record may (a sample uses at most 64). "
            "Split the group into several records."
        )
    return [_path(item, f"{field}[{i}]", where) for i, item in enumerate(value)]


def _captions(value: Any, field: str, where: str, *, empty_ok: bool) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(f'{where}: {field} is {_kind(value)}: give a caption ("a dog") or a list of captions (one is chosen per sample).')
    if not items and not empty_ok:
        raise ConfigError(f'{where}: {field} is an empty list: give at least one caption, or "" for none.')
    if len(items) > MAX_CAPTIONS:
        raise ConfigError(f"{where}: {field} lists {len(items):,} captions, more than the {MAX_CAPTIONS} a record may.")
    for i, item in enumerate(items):
        name = field if isinstance(value, str) else f"{field}[{i}]"
        if not isinstance(item, str):
            raise ConfigError(f"{where}: {name} is {_kind(item)}, not a caption: write captions as JSON strings.")
        if len(item) > MAX_CAPTION_CHARS:
            raise ConfigError(f"{where}: {name} has {len(item):,} characters, more than the {MAX_CAPTION_CHARS:,} a caption may.")
        _utf8(item, name, where)
    return list(items)


def _face_box(value: Any, where: str) -> list[float]:
    """The first face box of an EasyRef ``face`` entry: ``[[x1, y1, x2, y2, score], ...]`` or the README's ``[[[...]], ...]``."""
    shape = "[[x1, y1, x2, y2, score]] (a list of boxes; the first is used)"
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: face is {_kind(value)}: give {shape}.")
    if len(value) > MAX_FACES:
        raise ConfigError(f"{where}: face lists {len(value):,} entries, more than the {MAX_FACES} a record may (only the first is used).")
    box, field = value[0], "face[0]"
    if isinstance(box, list) and box and isinstance(box[0], list):  # the official README nests the boxes once more
        box, field = box[0], "face[0][0]"
    if not isinstance(box, list) or len(box) not in (4, 5):
        raise ConfigError(f"{where}: {field} is {_kind(box)}: a face box is [x1, y1, x2, y2] or [x1, y1, x2, y2, score]; give {shape}.")
    numbers: list[float] = []
    for i, number in enumerate(box):
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{where}: {field}[{i}] is {_kind(number)}, not a number: a face box is [x1, y1, x2, y2, score] in pixels.")
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"{where}: {field}[{i}] is {number}; face boxes take finite numbers only.")
        if abs(number) > MAX_COORDINATE:
            raise ConfigError(f"{where}: {field}[{i}] is {_shorter(number)}, beyond the ±{MAX_COORDINATE:.0f} pixels a coordinate may be.")
        numbers.append(float(number))
    x1, y1, x2, y2 = numbers[:4]
    if not (x2 > x1 and y2 > y1):
        raise ConfigError(f"{where}: {field} is [{x1:g}, {y1:g}, {x2:g}, {y2:g}]: a face box needs x2 > x1 and y2 > y1 (corners in pixels: left, top, right, bottom).")
    return [x1, y1, x2, y2]


# -- messages ------------------------------------------------------------------------------------


def _short(value: Any) -> str:
    shortener = reprlib.Repr()
    shortener.maxstring, shortener.maxother, shortener.maxlong = 60, 60, 40
    shortener.maxlist = shortener.maxdict = 6
    shortener.maxlevel = 3
    try:
        return shortener.repr(value)
    except Exception:  # noqa: BLE001 - an integer too long for text, or a repr that fails
        return f"<a {type(value).__name__}>"


def _shorter(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    return _short(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    name = names.get(type(value), f"a {type(value).__name__}")
    return f"{name} ({_shorter(value)})"
