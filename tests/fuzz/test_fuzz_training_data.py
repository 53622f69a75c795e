"""Fuzzing the training data: data files of every shape are read, or refused with a RefcondError.

Generated inputs: JSONL files and official EasyRef training JSONs whose records are near the schema
(every field of every type: paths to good, missing, damaged, empty, huge-header, FIFO, folder and
symlink-loop images, NaN, infinite, huge and boolean face-box coordinates, lone surrogates, NUL,
empty and oversized lists, unknown and repeated keys) or any JSON value at all; the text cut short,
with bytes flipped, not UTF-8, with a byte-order mark, comments and blank lines; arbitrary bytes,
nesting hundreds of thousands of levels deep, integers of thousands of digits; data paths that are
FIFOs, folders or missing; data settings and seeds within and beyond their bounds. Each goes
through :class:`refcond.training.data.TrainingData` and a few samples (any sample number, however
large), collated into a batch, on the surface ``"training-data"``: accepted (then every sample is
well formed, and the same number gives the same sample again) or refused with a
:class:`refcond.RefcondError`; never a raw exception, a hang or an allocation beyond the cap.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from fuzzing import guard
from hypothesis import given
from hypothesis import strategies as st

from refcond.training.data import MAX_LISTED_REFERENCES, TrainingData, collate

SURFACE = "training-data"
#: True one time in eight: how often a setting is drawn beyond its bounds.
RARELY = st.sampled_from([False] * 7 + [True])
COUNTER = itertools.count()

#: Image paths a record may name (relative to the data file's folder, unless absolute).
GOOD = ["good.png", "wide.png", "tall.jpg", "gray.png", "rgba.png", "tiny.png"]
BAD = ["missing.png", "corrupt.png", "empty.png", "huge.png", "pipe.png", "folder", "loop.png", "sub/../good.png", "nowhere/x.png"]
ODD = ["", " ", "a\0b.png", "\ud800.png", "x" * 5000, "/", "."]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-training-data")
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(root / "good.png")
    PIL.Image.fromarray(rng.integers(0, 256, (3, 90, 3), dtype=np.uint8)).save(root / "wide.png")
    PIL.Image.fromarray(rng.integers(0, 256, (70, 5, 3), dtype=np.uint8)).save(root / "tall.jpg")
    PIL.Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(root / "gray.png")
    PIL.Image.fromarray(rng.integers(0, 256, (10, 8, 4), dtype=np.uint8)).save(root / "rgba.png")
    PIL.Image.new("RGB", (1, 1)).save(root / "tiny.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
    (root / "empty.png").write_bytes(b"")
    (root / "huge.png").write_bytes(png_header(100_000, 100_000))
    os.mkfifo(root / "pipe.png")
    os.mkfifo(root / "pipe.jsonl")
    (root / "folder").mkdir()
    (root / "sub").mkdir()
    os.symlink("loop.png", root / "loop.png")
    return root


# -- JSON values -----------------------------------------------------------------------------------

FLOATS = st.one_of(st.floats(-60, 120), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -0.0, 2.0**31 + 1]))
NUMBERS = st.one_of(FLOATS, st.integers(-100, 200), st.sampled_from([2**70, -(2**64), True, False]))
PATHS = st.one_of(st.sampled_from(GOOD), st.sampled_from(GOOD), st.sampled_from(BAD), st.sampled_from(ODD), st.builds(lambda name: f"/absolute/{name}", st.sampled_from(GOOD)))
KEYS = st.sampled_from(["references", "image", "caption", "image_file", "text", "target", "face", "captoin", "images", "", "\ud800"])
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12), PATHS)
ANY_JSON = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(KEYS, st.text(max_size=6)), inner, max_size=4)), max_leaves=16)

PATH_LISTS = st.one_of(st.lists(PATHS, min_size=1, max_size=6), st.lists(PATHS, max_size=0), PATHS, ANY_JSON, st.just(["good.png"] * (MAX_LISTED_REFERENCES + 1)))
CAPTIONS = st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=4), ANY_JSON, st.just("x" * 100_001), st.just(["a"] * 1025))
BOX = st.lists(NUMBERS, min_size=3, max_size=6)
SANE_BOX = st.tuples(st.floats(-10, 15), st.floats(-10, 12), st.floats(1, 40), st.floats(1, 40)).map(lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3], 0.9])
FACES = st.one_of(st.lists(st.one_of(SANE_BOX, BOX), min_size=1, max_size=3), st.lists(st.lists(st.one_of(SANE_BOX, BOX), min_size=1, max_size=2), min_size=1, max_size=2), ANY_JSON)


def near(record: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """``record`` with some keys dropped, some added (unknown, or of the other format), or set to any value."""
    record = dict(record)
    for key in list(record):
        if data.draw(st.integers(0, 9)) == 0:
            del record[key]
    if data.draw(st.integers(0, 7)) == 0:
        record[data.draw(KEYS)] = data.draw(ANY_JSON)
    return record


WELL_FORMED_PATHS = st.sampled_from(GOOD * 3 + BAD[:3])
WELL_FORMED_CAPTIONS = st.one_of(st.text(max_size=10), st.lists(st.text(max_size=8), min_size=1, max_size=3))


def jsonl_record(data: st.DataObject, clean: bool) -> Any:
    if clean:
        return {"references": data.draw(st.lists(WELL_FORMED_PATHS, min_size=1, max_size=5)), "image": data.draw(WELL_FORMED_PATHS), "caption": data.draw(WELL_FORMED_CAPTIONS)}
    if data.draw(st.integers(0, 9)) == 0:
        return data.draw(ANY_JSON)
    record = {"references": data.draw(PATH_LISTS), "image": data.draw(PATHS), "caption": data.draw(CAPTIONS)}
    return near(record, data)


def easyref_record(data: st.DataObject, clean: bool) -> Any:
    if clean:
        target, text = data.draw(WELL_FORMED_PATHS), data.draw(st.one_of(st.text(max_size=8), st.lists(st.text(max_size=8), max_size=3)))
        if data.draw(st.booleans()):
            return {"face": data.draw(st.one_of(st.lists(SANE_BOX, min_size=1, max_size=2), st.lists(st.lists(SANE_BOX, min_size=1, max_size=1), min_size=1, max_size=1))), "text": text, "target": target}
        return {"image_file": data.draw(st.one_of(WELL_FORMED_PATHS, st.lists(WELL_FORMED_PATHS, min_size=1, max_size=5))), "text": text, "target": target}
    if data.draw(st.integers(0, 9)) == 0:
        return data.draw(ANY_JSON)
    target = data.draw(st.one_of(st.sampled_from(GOOD), PATHS))
    if data.draw(st.booleans()):
        record = {"face": data.draw(FACES), "text": data.draw(CAPTIONS), "target": target}
    else:
        record = {"image_file": data.draw(PATH_LISTS), "text": data.draw(CAPTIONS), "target": target}
    return near(record, data)


def dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, allow_nan=True)


def damage(text: bytes, data: st.DataObject) -> bytes:
    """The bytes of a file as written, or cut short, with bytes flipped, with a byte-order mark, with bytes that are not UTF-8."""
    kind = data.draw(st.sampled_from(["none", "none", "none", "cut", "flip", "bom", "latin1"]))
    if kind == "cut" and text:
        return text[: data.draw(st.integers(0, len(text) - 1))]
    if kind == "flip" and text:
        array = bytearray(text)
        for spot in data.draw(st.lists(st.integers(0, len(text) - 1), min_size=1, max_size=4)):
            array[spot] ^= data.draw(st.integers(1, 255))
        return bytes(array)
    if kind == "bom":
        return b"\xef\xbb\xbf" + text
    if kind == "latin1" and text:
        spot = data.draw(st.integers(0, len(text) - 1))
        return text[:spot] + b"\xe9\xff" + text[spot:]
    return text


def jsonl_file(data: st.DataObject) -> bytes:
    clean, lines = data.draw(st.booleans()), []
    for _ in range(data.draw(st.integers(0 if not clean else 1, 6))):
        kind = data.draw(st.integers(0, 9))
        lines.append("# a comment" if kind == 0 else "   " if kind == 1 else dumps(jsonl_record(data, clean)))
    text = "\n".join(lines).encode("utf-8", "surrogatepass") + data.draw(st.sampled_from([b"", b"\n", b"\r\n"]))
    return text if clean else damage("\n".join(lines).encode("utf-8", "surrogatepass") + data.draw(st.sampled_from([b"", b"\n", b"\r\n"])), data)


def easyref_file(data: st.DataObject) -> bytes:
    clean = data.draw(st.booleans())
    records = [easyref_record(data, clean) for _ in range(data.draw(st.integers(1 if clean else 0, 5)))]
    text = dumps(records, indent=data.draw(st.sampled_from([None, 2, 4])))
    if clean:
        return text.encode("utf-8")
    if data.draw(st.integers(0, 9)) == 0:
        text = dumps(data.draw(ANY_JSON))  # any JSON document
    return damage(text.encode("utf-8", "surrogatepass"), data)


SPECIAL_FILES = st.sampled_from(
    [
        b"",
        b"\n\n  \n",
        b"[" * 300_000,
        b"{" * 300_000,
        b'{"references": [' * 50_000,
        b"[" + b'{"a": 1},' * 20_000,
        b'{"references": ["good.png"], "image": "good.png", "caption": ' + b"9" * 5000 + b"}",
        b'[{"image_file": ["good.png"], "text": [], "target": "good.png", "face": [[NaN, 1, 2, 3]]}]',
        b'{"references": ["good.png"], "image": "good.png", "caption": "a", "caption": "b"}',
        b" " * (5 * 1024 * 1024) + b"x",
        b"\xff\xfe[\x00]\x00",
        b"[]",
        b"[[]]",
        b"null",
        b"#",
    ]
)

#: Each setting's values within its bounds, then beyond them (drawn one time in eight).
CONFIG_VALUES = {
    "format": (st.just("auto"), st.sampled_from(["csv", None, 1])),
    "resolution": (st.sampled_from([64, 72, 128]), st.sampled_from([60, 0, 4096, "64", 64.5])),
    "crop": (st.sampled_from(["center", "random"]), st.just("middle")),
    "min_references": (st.sampled_from([1, 1, 2]), st.sampled_from([0, 65, 3.5])),
    "max_references": (st.sampled_from([28, 1, 2, 4, 64]), st.sampled_from([0, 1000])),
    "shuffle_references": (st.booleans(), st.just("yes")),
    "truncate_rate": (st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0])), st.sampled_from([-0.1, 1.5, float("nan")])),
    "self_reconstruction": (st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 1.0])), st.sampled_from([2.0, float("inf")])),
    "on_bad_file": (st.sampled_from(["skip", "skip", "error"]), st.just("ignore")),
    "workers": (st.just(0), st.sampled_from([-1, 65])),
    "unknown": (st.nothing(), st.just(1)),
}


def settings(data: st.DataObject, path: str) -> dict[str, Any]:
    config: dict[str, Any] = {"path": path}
    for name in data.draw(st.lists(st.sampled_from(sorted(CONFIG_VALUES)), max_size=6, unique=True)):
        within, beyond = CONFIG_VALUES[name]
        if name == "unknown" and not data.draw(RARELY):
            continue
        config[name] = data.draw(beyond if name == "unknown" or data.draw(RARELY) else within)
    return config


def write(folder: Path, content: bytes, suffix: str) -> str:
    path = folder / f"data{next(COUNTER)}{suffix}"
    path.write_bytes(content)
    return str(path)


# -- the property ------------------------------------------------------------------------------------


def run(config: dict[str, Any], seed: Any, numbers: list[int]) -> None:
    def action() -> tuple[TrainingData, list[Any], dict[str, Any]]:
        dataset = TrainingData(config, seed=seed)
        samples = [dataset[k] for k in numbers]
        again = dataset[numbers[0]]
        return dataset, samples + [again], collate(samples, resolution=dataset.config.resolution)

    result = guard(SURFACE, action)
    if result is None:
        return
    dataset, samples, batch = result
    settings_ = dataset.config
    side = settings_.resolution
    *samples, again = samples
    assert _same(samples[0], again), "the same sample number gave another sample"
    for k, sample in zip(numbers, samples):
        assert sample.number == k and 0 <= sample.record < len(dataset)
        if sample.skipped is not None:
            assert isinstance(sample.skipped, str) and sample.image is None and sample.references == []
            continue
        assert sample.image.shape == (3, side, side) and sample.image.dtype == torch.float32
        assert float(sample.image.min()) >= -1 and float(sample.image.max()) <= 1
        assert 1 <= len(sample.references) <= settings_.max_references
        assert all(isinstance(r, PIL.Image.Image) and r.mode == "RGB" for r in sample.references)
        height, width = sample.original_size
        top, left = sample.crop_top_left
        assert height >= 1 and width >= 1 and top >= 0 and left >= 0 and isinstance(sample.caption, str)
    kept = [s for s in samples if s.skipped is None]
    assert batch["pixel_values"].shape == (len(kept), 3, side, side) and len(batch["skipped"]) == len(samples) - len(kept)


def _same(a: Any, b: Any) -> bool:
    if (a.record, a.caption, a.original_size, a.crop_top_left, a.skipped) != (b.record, b.caption, b.original_size, b.crop_top_left, b.skipped):
        return False
    if a.image is not None and not torch.equal(a.image, b.image):
        return False
    return [np.asarray(r).tobytes() for r in a.references] == [np.asarray(r).tobytes() for r in b.references]


NUMBERS_K = st.lists(st.one_of(st.integers(0, 40), st.integers(0, 2**80)), min_size=1, max_size=3)
SEEDS = RARELY.flatmap(lambda beyond: st.sampled_from([-1, 2**64, True, 1.5]) if beyond else st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 7])))


@given(data=st.data())
def test_jsonl_files_of_every_shape(folder, data):
    path = write(folder, jsonl_file(data), data.draw(st.sampled_from([".jsonl", ".jsonl", ".json", ".txt"])))
    run(settings(data, path), data.draw(SEEDS), data.draw(NUMBERS_K))


@given(data=st.data())
def test_official_easyref_files_of_every_shape(folder, data):
    path = write(folder, easyref_file(data), data.draw(st.sampled_from([".json", ".json", ".jsonl", ""])))
    run(settings(data, path), data.draw(SEEDS), data.draw(NUMBERS_K))


@given(data=st.data())
def test_arbitrary_bytes_and_paths_that_are_not_data_files(folder, data):
    kind = data.draw(st.sampled_from(["bytes", "special", "special", "path"]))
    if kind == "bytes":
        path = write(folder, data.draw(st.binary(max_size=300)), data.draw(st.sampled_from([".jsonl", ".json"])))
    elif kind == "special":
        path = write(folder, data.draw(SPECIAL_FILES), data.draw(st.sampled_from([".jsonl", ".json", ".txt"])))
    else:
        path = str(folder / data.draw(st.sampled_from(["pipe.jsonl", "folder", "missing.jsonl", "loop.png", "good.png", "a\0b.jsonl", "x" * 5000])))
    run(settings(data, path), data.draw(SEEDS), data.draw(NUMBERS_K))
