"""The training data (refcond.training.data): the deterministic sample stream, the sampling rules,
the resize/crop geometry, both file formats, bad images, and every way a data file is refused."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import refcond
from refcond.training import data as data_module
from refcond.training.data import DataConfig, Sample, SampleOrder, TrainingData, collate, make_loader

ROOT = Path(__file__).resolve().parents[1]


# -- helpers ---------------------------------------------------------------------------------------


def noise(path: Path, width: int, height: int, seed: int = 0) -> str:
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path.name


def solid(path: Path, color: tuple[int, int, int], width: int = 12, height: int = 10) -> str:
    PIL.Image.new("RGB", (width, height), color).save(path)
    return path.name


def coordinates(path: Path, width: int, height: int) -> str:
    """An image whose red channel is x and green channel is y (sides up to 256)."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    PIL.Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8)).save(path)
    return path.name


def write_jsonl(path: Path, records: list, *, raw_lines: list[str] | None = None) -> str:
    lines = [json.dumps(record) for record in records] + (raw_lines or [])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def same_sample(a: Sample, b: Sample) -> bool:
    if (a.number, a.record, a.caption, a.original_size, a.crop_top_left, a.skipped) != (b.number, b.record, b.caption, b.original_size, b.crop_top_left, b.skipped):
        return False
    if (a.image is None) != (b.image is None) or (a.image is not None and not torch.equal(a.image, b.image)):
        return False
    return [np.asarray(r).tobytes() for r in a.references] == [np.asarray(r).tobytes() for r in b.references]


@pytest.fixture
def groups(tmp_path: Path) -> str:
    """Seven records of 1 to 5 noise references (references of different sizes), captions as strings and lists."""
    records = []
    for i in range(7):
        references = [noise(tmp_path / f"r{i}_{j}.png", 8 + j, 9 + i, seed=10 * i + j) for j in range(1 + i % 5)]
        target = noise(tmp_path / f"t{i}.png", 20 + 3 * i, 16 + 2 * i, seed=100 + i)
        records.append({"references": references, "image": target, "caption": [f"caption {i}a", f"caption {i}b"] if i % 2 else f"caption {i}"})
    return write_jsonl(tmp_path / "groups.jsonl", records, raw_lines=["# a comment", ""])


# -- the stream is deterministic -----------------------------------------------------------------


def test_the_same_number_gives_the_same_sample_in_any_instance(groups):
    config = DataConfig(path=groups, resolution=64, crop="random", truncate_rate=0.5, self_reconstruction=0.3)
    first, second = TrainingData(config, seed=3), TrainingData(config, seed=3)
    numbers = [*range(20), 1000, 10**12, 2**70]
    for k in numbers:
        assert same_sample(first[k], second[k]), k
    assert same_sample(first[5], pickle.loads(pickle.dumps(first))[5])  # as a spawned worker receives it
    assert all(same_sample(first[k], first[k]) for k in (3, 3))  # the cache of the epoch's order changes nothing
    other = TrainingData(config, seed=4)
    assert [first[k].record for k in range(14)] != [other[k].record for k in range(14)]


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_with_any_workers_start_and_rank_give_the_samples_of_their_numbers(groups, workers):
    data = TrainingData(DataConfig(path=groups, resolution=64, crop="random", truncate_rate=0.5, workers=workers), seed=1)
    loader = make_loader(data, 3, start=2, rank=1, world=3)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 3:
            break
    del loader
    numbers = [n for batch in batches for n in batch["numbers"]]
    assert numbers == [2 * 3 + 1 + 3 * i for i in range(9)]  # position 2 of rank 1's stream, then every third
    for batch in batches:
        expected = collate([data[k] for k in batch["numbers"]])
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])
        assert batch["captions"] == expected["captions"]
        assert torch.equal(batch["original_sizes"], expected["original_sizes"]) and torch.equal(batch["crops_top_left"], expected["crops_top_left"])
        assert [[np.asarray(r).tobytes() for r in refs] for refs in batch["references"]] == [
            [np.asarray(r).tobytes() for r in refs] for refs in expected["references"]
        ]


def test_sample_order_splits_the_stream_between_processes():
    take = lambda order, n: [k for k, _ in zip(order, range(n))]  # noqa: E731
    assert take(SampleOrder(), 4) == [0, 1, 2, 3]
    assert take(SampleOrder(start=5), 2) == [5, 6]
    shares = [take(SampleOrder(start=1, rank=r, world=4), 3) for r in range(4)]
    assert sorted(k for share in shares for k in share) == list(range(4, 16))  # resumed at position 1: the first 4 numbers were used
    for bad, message in [({"rank": 4, "world": 4}, "rank must be between 0 and 3"), ({"world": 0}, "world must be between 1"), ({"start": -1}, "start must be at least 0"), ({"rank": True}, "rank must be an integer")]:
        with pytest.raises(refcond.ConfigError, match=message):
            SampleOrder(**bad)


def test_epochs_visit_every_record_once_each_in_a_new_order(groups):
    data = TrainingData(DataConfig(path=groups, resolution=64), seed=0)
    n = len(data)
    assert n == 7
    orders = [[data[e * n + i].record for i in range(n)] for e in range(4)]
    for order in orders:
        assert sorted(order) == list(range(n))
    assert len({tuple(order) for order in orders}) > 1


# -- sampling rules ------------------------------------------------------------------------------


def six_references(tmp_path: Path, **record) -> str:
    colors = [(10 * j, 0, 0) for j in range(6)]
    references = [solid(tmp_path / f"c{j}.png", color) for j, color in enumerate(colors)]
    target = solid(tmp_path / "target.png", (0, 0, 255), 30, 20)
    return write_jsonl(tmp_path / "six.jsonl", [{"references": references, "image": target, "caption": "six", **record}])


def reference_ids(sample: Sample) -> list[int]:
    return [int(np.asarray(r)[0, 0, 0]) // 10 for r in sample.references]


def test_truncation_keeps_2_to_n_minus_1_references_at_its_rate(tmp_path):
    path = six_references(tmp_path)
    data = TrainingData(DataConfig(path=path, resolution=64, truncate_rate=0.4), seed=0)
    counts = Counter(len(data[k].references) for k in range(400))
    truncated = sum(c for n, c in counts.items() if n < 6)
    assert abs(truncated / 400 - 0.4) < 0.08, counts
    assert set(counts) == {2, 3, 4, 5, 6}, counts
    floor = TrainingData(DataConfig(path=path, resolution=64, truncate_rate=1.0, min_references=4), seed=0)
    assert {len(floor[k].references) for k in range(60)} == {4, 5}  # truncation never goes below min_references
    never = TrainingData(DataConfig(path=path, resolution=64), seed=0)
    assert {len(never[k].references) for k in range(30)} == {6}


def test_max_references_caps_and_shuffling_reorders(tmp_path):
    path = six_references(tmp_path)
    capped = TrainingData(DataConfig(path=path, resolution=64, max_references=4), seed=0)
    orders = [reference_ids(capped[k]) for k in range(40)]
    assert all(len(order) == 4 and len(set(order)) == 4 for order in orders)
    assert len({tuple(order) for order in orders}) > 20  # the order and the subset vary
    assert {i for order in orders for i in order} == set(range(6))
    kept = TrainingData(DataConfig(path=path, resolution=64, max_references=4, shuffle_references=False), seed=0)
    assert all(reference_ids(kept[k]) == [0, 1, 2, 3] for k in range(10))


def test_self_reconstruction_makes_a_reference_the_target_at_its_rate(tmp_path):
    path = six_references(tmp_path)
    data = TrainingData(DataConfig(path=path, resolution=64, self_reconstruction=0.3), seed=0)
    reconstructed, picked = 0, Counter()
    for k in range(400):
        sample = data[k]
        red, blue = float(sample.image[0].mean()), float(sample.image[2].mean())
        if blue > 0.99:  # the target file (0, 0, 255)
            assert sample.original_size == (20, 30) and all(r.size == (12, 10) for r in sample.references)
            continue
        reconstructed += 1
        assert sample.original_size == (10, 12)
        squares = [i for i, r in enumerate(sample.references) if r.size == (64, 64)]
        assert len(squares) == 1  # the reference that became the target got its resize and crop
        square = sample.references[squares[0]]
        assert torch.allclose(torch.from_numpy(np.asarray(square, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1, sample.image)
        picked[int(np.asarray(square)[0, 0, 0]) // 10] += 1
        assert abs((red + 1) * 127.5 - np.asarray(square)[0, 0, 0]) < 1
    assert abs(reconstructed / 400 - 0.3) < 0.07, reconstructed
    assert set(picked) == set(range(6))


def test_a_record_without_image_reconstructs_a_reference_when_self_reconstruction_is_1(tmp_path):
    references = [solid(tmp_path / f"c{j}.png", (10 * j, 0, 0)) for j in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", [{"references": references, "caption": ""}])
    data = TrainingData(DataConfig(path=path, resolution=64, self_reconstruction=1), seed=0)
    for k in range(10):
        sample = data[k]
        assert sample.original_size == (10, 12) and sum(r.size == (64, 64) for r in sample.references) == 1
    with pytest.raises(refcond.ConfigError, match=r'd\.jsonl:1: the record has no "image".*self_reconstruction = 1'):
        TrainingData(DataConfig(path=path, self_reconstruction=0.99))


def test_a_reference_that_is_the_target_file_gets_the_targets_crop(tmp_path):
    # The official README's first example: 1.jpg is the target and the reference.
    target = noise(tmp_path / "1.png", 40, 24)
    other = noise(tmp_path / "2.png", 10, 10, seed=1)
    path = write_jsonl(tmp_path / "d.jsonl", [{"references": [target, other], "image": target, "caption": "x"}])
    sample = TrainingData(DataConfig(path=path, resolution=64, shuffle_references=False))[0]
    assert [r.size for r in sample.references] == [(64, 64), (10, 10)]
    assert torch.allclose(torch.from_numpy(np.asarray(sample.references[0], dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1, sample.image)


def test_captions_are_chosen_per_sample(groups):
    data = TrainingData(DataConfig(path=groups, resolution=64), seed=0)
    seen = Counter(data[k].caption for k in range(140) if data[k].record == 1)
    assert set(seen) == {"caption 1a", "caption 1b"}


# -- geometry --------------------------------------------------------------------------------------


def resized_then_cropped(path: Path, size: int, top: int, left: int) -> torch.Tensor:
    image = PIL.Image.open(path).convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    full = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), PIL.Image.Resampling.BILINEAR)
    crop = full.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@pytest.mark.parametrize(("width", "height"), [(100, 50), (50, 130), (64, 64), (7, 5), (300, 40)])
def test_the_target_is_resized_to_the_short_side_and_cropped(tmp_path, width, height):
    target = tmp_path / "t.png"
    noise(target, width, height)
    reference = noise(tmp_path / "r.png", 5, 5)
    path = write_jsonl(tmp_path / "d.jsonl", [{"references": [reference], "image": "t.png", "caption": ""}])
    size = 64
    long_side = max(size, round(max(width, height) * size / min(width, height)))
    extra = long_side - size
    center = TrainingData(DataConfig(path=path, resolution=size))[0]
    assert center.image.shape == (3, size, size) and center.image.dtype == torch.float32
    assert float(center.image.min()) >= -1 and float(center.image.max()) <= 1
    assert center.original_size == (height, width)
    expected = (0, extra // 2) if width > height else (extra // 2, 0)
    assert center.crop_top_left == expected
    assert (center.image - resized_then_cropped(target, size, *expected)).abs().max() <= 3 / 127.5
    random_crop = TrainingData(DataConfig(path=path, resolution=size, crop="random"), seed=2)
    offsets = set()
    for k in range(12):
        sample = random_crop[k]
        top, left = sample.crop_top_left
        assert 0 <= top <= (extra if height > width else 0) and 0 <= left <= (extra if width > height else 0)
        assert (sample.image - resized_then_cropped(target, size, top, left)).abs().max() <= 3 / 127.5
        offsets.add((top, left))
    assert len(offsets) > (1 if extra > 2 else 0)


def test_an_image_of_extreme_aspect_ratio_is_not_resized_whole(tmp_path):
    # 2 x 4000 at resolution 2048 would be a 2048 x 4_096_000 intermediate image if resized whole.
    PIL.Image.new("RGB", (2, 4000), (200, 10, 10)).save(tmp_path / "strip.png")
    path = write_jsonl(tmp_path / "d.jsonl", [{"references": ["strip.png"], "image": "strip.png", "caption": ""}])
    sample = TrainingData(DataConfig(path=path, resolution=2048))[0]
    assert sample.image.shape == (3, 2048, 2048) and sample.original_size == (4000, 2)
    assert sample.crop_top_left == ((4_096_000 - 2048) // 2, 0)


# -- the official EasyRef JSON -------------------------------------------------------------------


def test_official_json_with_reference_files(tmp_path):
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        noise(tmp_path / name, 30, 20)
    records = [
        {"image_file": ["1.jpg"], "text": ["A fantasy character."], "target": "1.jpg"},
        {"image_file": ["2.jpg", "3.jpg"], "text": ["first", "second"], "target": "1.jpg"},
        {"image_file": "3.jpg", "text": [], "target": "2.jpg"},
        {"image_file": ["2.jpg"], "text": "a string caption", "target": "3.jpg"},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records, indent=4), encoding="utf-8")
    data = TrainingData(DataConfig(path=str(tmp_path / "train.json"), resolution=64), seed=0)
    assert len(data) == 4
    samples = {data[k].record: data[k] for k in range(4)}
    assert [r.size for r in samples[0].references] == [(64, 64)]  # the target is its own reference: the target's crop
    assert [r.size for r in samples[1].references] in ([(30, 20)] * 2,)
    assert samples[2].caption == "" and len(samples[2].references) == 1
    assert samples[3].caption == "a string caption"
    captions = {data[k].caption for k in range(80) if data[k].record == 1}
    assert captions == {"first", "second"}


@pytest.mark.parametrize("nesting", ["code", "readme"])
def test_official_json_with_face_boxes_crops_the_reference_from_the_target(tmp_path, nesting):
    coordinates(tmp_path / "1.png", 200, 150)
    box = [60.4, 40.2, 100.7, 90.1, 0.99]
    face = [box] if nesting == "code" else [[box]]
    (tmp_path / "train.json").write_text(json.dumps([{"face": face, "text": ["A fantasy character."], "target": "1.png"}]), encoding="utf-8")
    data = TrainingData(DataConfig(path=str(tmp_path / "train.json"), resolution=64), seed=0)
    sides, flips = set(), 0
    for k in range(60):
        sample = data[k]
        (reference,) = sample.references
        side = reference.size[0]
        assert reference.size == (side, side) and 50 <= side <= 99  # the box's larger side (50), expanded by 0-49 % a side
        pixels = np.asarray(reference).astype(int)
        xs, ys = pixels[0, :, 0], pixels[:, 0, 1]
        flipped = xs[0] > xs[-1]
        flips += flipped
        left, top = min(xs[0], xs[-1]), ys[0]
        assert list(ys) == list(range(top, top + side))
        assert sorted(xs) == list(range(left, left + side))  # a crop of the target, mirrored or not
        assert left <= 80 < left + side and top <= 65 < top + side  # around the face's center
        assert sample.original_size == (150, 200)
        sides.add(side)
    assert len(sides) > 5 and 15 <= flips <= 45


def test_a_face_box_outside_the_image_skips_the_sample(tmp_path):
    noise(tmp_path / "1.png", 20, 20)
    (tmp_path / "train.json").write_text(json.dumps([{"face": [[30, 30, 40, 40]], "text": "x", "target": "1.png"}]), encoding="utf-8")
    sample = TrainingData(DataConfig(path=str(tmp_path / "train.json")))[0]
    assert sample.image is None and "lies outside the image (20 wide, 20 high)" in sample.skipped


# -- bad images ----------------------------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path: Path) -> str:
    good = noise(tmp_path / "good.png", 16, 16)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    os.mkfifo(tmp_path / "pipe.png")
    records = [
        {"references": [good], "image": good, "caption": "fine"},
        {"references": ["missing.png"], "image": good, "caption": "a missing reference"},
        {"references": [good], "image": "corrupt.png", "caption": "a corrupt target"},
        {"references": ["pipe.png"], "image": good, "caption": "a FIFO reference"},
    ]
    return write_jsonl(tmp_path / "d.jsonl", records)


@contextlib.contextmanager
def alarm(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading would wait for a writer)."""

    def fail(signum, frame):
        raise AssertionError(f"took more than {seconds} s: something opened a FIFO?")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_bad_images_are_skipped_and_reported(bad_files, tmp_path):
    data = TrainingData(DataConfig(path=bad_files, resolution=64, shuffle_references=False), seed=0)
    with alarm(20):
        samples = {data[k].record: data[k] for k in range(4)}
        assert samples[0].skipped is None and samples[0].image is not None
        expected = {
            1: (tmp_path / "missing.png", "file not found", "reference 0 of record 1, line 2 of"),
            2: (tmp_path / "corrupt.png", "not a readable image", "target of record 2, line 3 of"),
            3: (tmp_path / "pipe.png", "named pipe (FIFO)", "reference 0 of record 3, line 4 of"),
        }
        for record, (path, reason, where) in expected.items():
            sample = samples[record]
            assert sample.image is None and sample.references == [] and sample.skipped.startswith(f"{path}: ")
            assert reason in sample.skipped and where in sample.skipped, sample.skipped
        batch = collate([data[k] for k in range(8)])
    assert len(batch["numbers"]) == 2 and batch["pixel_values"].shape == (2, 3, 64, 64) and len(batch["skipped"]) == 6
    assert batch["original_sizes"].dtype == torch.long and batch["original_sizes"].shape == (2, 2)


def test_bad_images_raise_when_asked_to(bad_files):
    data = TrainingData(DataConfig(path=bad_files, on_bad_file="error", resolution=64, shuffle_references=False), seed=0)
    errors = {}
    with alarm(20):
        for k in range(4):
            try:
                data[k]
            except refcond.ReferenceImageError as exc:
                errors[data.record_of(k)] = str(exc)
    assert sorted(errors) == [1, 2, 3]
    assert re.search(r"missing\.png: file not found.*\(reference 0 of record 1, line 2 of", errors[1])
    assert re.search(r"corrupt\.png: not a readable image.*\(target of record 2, line 3 of", errors[2])
    assert re.search(r"pipe\.png: is a named pipe \(FIFO\)", errors[3])


def test_a_batch_of_skipped_samples_is_empty(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"references": ["missing.png"], "image": "missing.png", "caption": ""}])
    data = TrainingData(DataConfig(path=path, resolution=128))
    batch = next(iter(make_loader(data, 3)))
    assert batch["pixel_values"].shape == (0, 3, 128, 128) and batch["numbers"] == [] and len(batch["skipped"]) == 3
    assert batch["original_sizes"].shape == (0, 2) and batch["references"] == [] and batch["captions"] == []


# -- the data file is validated before any image is opened ---------------------------------------

BOX = [1, 2, 30, 40, 0.9]
GOOD = {"references": ["a.jpg"], "image": "t.jpg", "caption": "c"}
EASY = {"image_file": ["a.jpg"], "text": ["c"], "target": "t.jpg"}

#: (file name, content (text or bytes), config fields, regex of the message)
FILE_ERRORS = [
    ("d.jsonl", "[1, 2]\n", {}, r"d\.jsonl:1: a record is a JSON object .*not a list"),
    ("d.jsonl", json.dumps({**GOOD, "captoin": "x"}), {}, r"d\.jsonl:1: unknown key 'captoin'\. Did you mean 'caption'\?"),
    ("d.jsonl", json.dumps({"image": "t.jpg", "caption": ""}), {}, r'd\.jsonl:1: the record has no "references": add the list'),
    ("d.jsonl", json.dumps({**GOOD, "references": []}), {}, r"d\.jsonl:1: references is an empty list: give at least one image path"),
    ("d.jsonl", json.dumps({**GOOD, "references": "a.jpg"}), {}, r"d\.jsonl:1: references is a string \('a\.jpg'\): give a list of image paths"),
    ("d.jsonl", json.dumps({**GOOD, "references": ["a.jpg", 5]}), {}, r"d\.jsonl:1: references\[1\] is a number \(5\), not a path: write the image's path as a JSON string"),
    ("d.jsonl", json.dumps({**GOOD, "references": [["a.jpg"]]}), {}, r"references\[0\] is a list"),
    ("d.jsonl", json.dumps({**GOOD, "image": None}), {}, r"d\.jsonl:1: image is null, not a path"),
    ("d.jsonl", json.dumps({**GOOD, "image": " "}), {}, r"image is an empty path"),
    ("d.jsonl", json.dumps({**GOOD, "image": "a\u0000b"}), {}, r"image contains a NUL character"),
    ("d.jsonl", json.dumps({**GOOD, "image": "x" * 5000}), {}, r"image is a path of 5,000 characters, more than the 4096"),
    ("d.jsonl", '{"references": ["\\ud800.jpg"], "image": "t.jpg", "caption": ""}', {}, r"references\[0\] holds an unpaired surrogate"),
    ("d.jsonl", json.dumps({**GOOD, "references": ["a.jpg"] * 1025}), {}, r"references lists 1,025 images, more than the 1024 a record may.*Split the group"),
    ("d.jsonl", json.dumps({k: v for k, v in GOOD.items() if k != "caption"}), {}, r'd\.jsonl:1: the record has no "caption"'),
    ("d.jsonl", json.dumps({**GOOD, "caption": []}), {}, r'caption is an empty list: give at least one caption, or "" for none'),
    ("d.jsonl", json.dumps({**GOOD, "caption": 3.5}), {}, r"caption is a number \(3\.5\): give a caption"),
    ("d.jsonl", json.dumps({**GOOD, "caption": ["a", None]}), {}, r"caption\[1\] is null, not a caption"),
    ("d.jsonl", json.dumps({**GOOD, "caption": ["a"] * 1025}), {}, r"caption lists 1,025 captions"),
    ("d.jsonl", json.dumps({**GOOD, "caption": "x" * 100_001}), {}, r"caption has 100,001 characters"),
    ("d.jsonl", json.dumps(GOOD) + "\n\n# fine\n" + '{"references": ["a.jpg"],', {}, r"d\.jsonl:4: not valid JSON: .*Each line of a JSONL file is one complete JSON object"),
    ("d.jsonl", b'{"references": ["a.jpg"], "image": "t.jpg", "caption": "\xff"}\n', {}, r"d\.jsonl:1: not UTF-8 text \(byte 57 of the line is b'\\xff'\)"),
    ("d.jsonl", "[" * 200_000, {}, r"d\.jsonl:1: nested too deeply"),
    ("d.jsonl", '{"references": ["a.jpg"], "image": "t.jpg", "caption": "a", "caption": "b"}', {}, r"d\.jsonl:1: the key 'caption' appears twice"),
    ("d.jsonl", '{"references": ["a.jpg"], "image": "t.jpg", "caption": ' + "9" * 5000 + "}", {}, r"d\.jsonl:1: holds an integer of more than 4300 digits"),
    ("d.jsonl", "# only a comment\n\n", {}, r"d\.jsonl: holds no records"),
    ("d.jsonl", "", {}, r"d\.jsonl: holds no records"),
    ("d.jsonl", json.dumps(GOOD), {"min_references": 2}, r"d\.jsonl:1: lists 1 reference, fewer than min_references = 2"),
    ("d.jsonl", json.dumps([EASY]), {}, r"d\.jsonl:1: a record is a JSON object .* This line is a JSON array: for an EasyRef training JSON set format = 'easyref'"),
    ("d.json", json.dumps([EASY, {**EASY, "text": 5}]), {}, r"d\.json:1 \(record 1\): text is a number \(5\)"),
    ("d.json", json.dumps([EASY, {"face": [[1, 2, float("nan"), 4]], "text": [], "target": "t.jpg"}]), {}, r"\(record 1\): face\[0\]\[2\] is nan; face boxes take finite numbers only"),
    ("d.json", json.dumps([{"face": [[[1, 2, 3, float("inf"), 1]]], "text": [], "target": "t.jpg"}]), {}, r"face\[0\]\[0\]\[3\] is inf"),
    ("d.json", json.dumps([{"face": [[10, 2, 5, 40]], "text": [], "target": "t.jpg"}]), {}, r"face\[0\] is \[10, 2, 5, 40\]: a face box needs x2 > x1 and y2 > y1"),
    ("d.json", json.dumps([{"face": [[1, 2, 3]], "text": [], "target": "t.jpg"}]), {}, r"face\[0\] is a list \(\[1, 2, 3\]\): a face box is \[x1, y1, x2, y2\]"),
    ("d.json", json.dumps([{"face": [[1, 2, "3", 4]], "text": [], "target": "t.jpg"}]), {}, r"face\[0\]\[2\] is a string \('3'\), not a number"),
    ("d.json", json.dumps([{"face": [[1, 2, 3, 1e300]], "text": [], "target": "t.jpg"}]), {}, r"face\[0\]\[3\] is 1e\+300, beyond"),
    ("d.json", json.dumps([{"face": [], "text": [], "target": "t.jpg"}]), {}, r"face is a list \(\[\]\): give \[\[x1, y1, x2, y2, score\]\]"),
    ("d.json", json.dumps([{**EASY, "face": [BOX]}]), {}, r'has both "image_file" and "face"'),
    ("d.json", json.dumps([{"text": [], "target": "t.jpg"}]), {}, r'has neither "image_file" \(the reference images\) nor "face"'),
    ("d.json", json.dumps([{"image_file": ["a.jpg"], "text": []}]), {}, r'd\.json:1 \(record 0\): the record has no "target"'),
    ("d.json", json.dumps([{**EASY, "image_files": []}]), {}, r"unknown key 'image_files'\. Did you mean 'image_file'\?"),
    ("d.json", json.dumps([EASY, "a.jpg"]), {}, r"\(record 1\): a record is a JSON object .*not a string"),
    ("d.json", json.dumps([{**EASY, "image_file": [1]}]), {}, r"image_file\[0\] is a number \(1\), not a path"),
    ("d.json", json.dumps([{**EASY, "image_file": {}}]), {}, r"image_file is an object \({}\): give a path or a list of image paths"),
    ("d.json", json.dumps(EASY), {}, r"d\.json:1: this is a record of the official EasyRef format \('image_file', 'text', 'target'\), read as JSONL\. An EasyRef training file is one JSON array"),
    ("d.json", json.dumps(EASY), {"format": "easyref"}, r"d\.json:1: an EasyRef training file is a JSON array of records .*starts with an object\. For one record a line, set format = 'jsonl'"),
    ("d.json", json.dumps([EASY]) + "\n[]", {}, r"d\.json:2: text after the array's closing '\]'"),
    ("d.json", json.dumps([EASY, EASY])[:-30], {}, r"d\.json:1 \(record 1\): not valid JSON"),
    ("d.json", "[\n" + json.dumps(EASY) + ",\n" + json.dumps(EASY), {}, r"d\.json:3: the file ends inside the array"),
    ("d.json", "[" + json.dumps(EASY) + " " + json.dumps(EASY) + "]", {}, r"expected ',' or '\]' after record 0, found '\{'"),
    ("d.json", "[" + json.dumps(EASY) + ",]", {}, r"\(record 1\): not valid JSON"),
    ("d.json", "[]", {}, r"d\.json: holds no records"),
    ("d.json", "  \n ", {}, r"d\.json: holds no records \(it is empty, or only whitespace\)"),
    ("d.json", "[\n" + json.dumps(EASY) + ",\n" + json.dumps(EASY).replace('"c"', '"\\ud83d"') + "]", {}, r"d\.json:3 \(record 1\): text\[0\] holds an unpaired surrogate"),
    ("d.json", b"[\n" + json.dumps(EASY).encode() + b",\n\xc3(]", {}, r"d\.json:3: not UTF-8 text"),
    ("d.json", "[" + "[" * 200_000, {}, r"d\.json:1 \(record 0\): nested too deeply"),
    ("d.txt", "hello", {}, r"d\.txt: cannot tell the format: it starts with b'hello'.*set format = 'jsonl' or 'easyref'"),
]


@pytest.mark.parametrize(("name", "content", "fields", "message"), FILE_ERRORS, ids=[f"{i}-{m[:40]}" for i, (_, _, _, m) in enumerate(FILE_ERRORS)])
def test_every_problem_of_a_data_file_is_a_config_error_naming_file_line_and_field(tmp_path, monkeypatch, name, content, fields, message):
    opened = []
    monkeypatch.setattr(data_module, "load_reference", lambda *a, **k: opened.append(a))
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(refcond.ConfigError, match=message):
        TrainingData(DataConfig(path=str(path), **fields))
    assert not opened


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_the_official_json_is_read_a_chunk_at_a_time_with_the_right_line_numbers(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(data_module, "_CHUNK", chunk)
    records = [{**EASY, "text": [f"caption ünïcödé {i} 🐕"]} for i in range(40)]
    text = "\ufeff[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"
    (tmp_path / "ok.json").write_text(text, encoding="utf-8")
    data = TrainingData(DataConfig(path=str(tmp_path / "ok.json")))
    assert len(data) == 40 and [data.line(i) for i in (0, 39)] == [2, 41]
    assert data._record(39)[2] == ["caption ünïcödé 39 🐕"]
    records[25]["image_file"] = [None]
    (tmp_path / "bad.json").write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n", encoding="utf-8")
    with pytest.raises(refcond.ConfigError, match=r"bad\.json:27 \(record 25\): image_file\[0\] is null"):
        TrainingData(DataConfig(path=str(tmp_path / "bad.json")))


def test_limits_on_records_and_sizes(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 4)
    monkeypatch.setattr(data_module, "MAX_RECORDS", 3)
    with pytest.raises(refcond.ConfigError, match=r"d\.jsonl:4: more than 3 records, the most a data file may hold"):
        TrainingData(DataConfig(path=path))
    monkeypatch.setattr(data_module, "MAX_RECORDS", 10)
    monkeypatch.setattr(data_module, "MAX_RECORD_BYTES", 40)
    with pytest.raises(refcond.ConfigError, match=r"d\.jsonl:1: the line is longer than 40 bytes"):
        TrainingData(DataConfig(path=path))
    (tmp_path / "d.json").write_text(json.dumps([EASY, {**EASY, "text": ["x" * 100]}]))
    monkeypatch.setattr(data_module, "_CHUNK", 16)
    with pytest.raises(refcond.ConfigError, match=r"d\.json:1 \(record 0\): a record larger than 40 characters"):
        TrainingData(DataConfig(path=str(tmp_path / "d.json")))
    monkeypatch.setattr(data_module, "MAX_RECORD_BYTES", 1 << 20)
    monkeypatch.setattr(data_module, "MAX_DATA_FILE_BYTES", 100)
    with pytest.raises(refcond.ConfigError, match=r"data file .*d\.jsonl' holds \d+ bytes, more than the 100 a data file may"):
        TrainingData(DataConfig(path=path))


def test_data_files_that_are_not_regular_files_are_refused_without_opening_them(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    with alarm(20):
        with pytest.raises(refcond.ConfigError, match=r"data file '.*pipe\.jsonl' is a named pipe \(FIFO\), not a regular file"):
            TrainingData(DataConfig(path=str(tmp_path / "pipe.jsonl")))
    with pytest.raises(refcond.ConfigError, match=r"is a folder\. Give the path of the \.jsonl or \.json file inside it"):
        TrainingData(DataConfig(path=str(tmp_path)))
    with pytest.raises(refcond.ConfigError, match=r"data file '.*nothing\.jsonl': not found"):
        TrainingData(DataConfig(path=str(tmp_path / "nothing.jsonl")))
    with pytest.raises(refcond.ConfigError, match=r"NUL character"):
        TrainingData(DataConfig(path="a\0b.jsonl"))


def test_a_relative_path_in_the_file_is_relative_to_the_files_folder(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    noise(tmp_path / "images" / "a.png", 10, 10)
    path = write_jsonl(tmp_path / "d.jsonl", [{"references": ["images/a.png"], "image": str(tmp_path / "images" / "a.png"), "caption": ""}])
    monkeypatch.chdir(tmp_path / "images")
    data = TrainingData(DataConfig(path="../d.jsonl", resolution=64))
    monkeypatch.chdir(ROOT)
    assert data[0].skipped is None


def test_config_and_argument_errors():
    with pytest.raises(Exception, match="resolution must be a multiple of 8"):
        DataConfig(path="d.jsonl", resolution=100)
    with pytest.raises(Exception, match=r"min_references \(5\) is more than max_references \(4\)"):
        DataConfig(path="d.jsonl", min_references=5, max_references=4)
    with pytest.raises(refcond.ConfigError, match=r"unknown field 'trunacte_rate'\. Did you mean 'truncate_rate'\?"):
        TrainingData({"path": "d.jsonl", "trunacte_rate": 0.4})
    with pytest.raises(refcond.ConfigError, match=r"truncate_rate: Input should be less than or equal to 1"):
        TrainingData({"path": "d.jsonl", "truncate_rate": 1.5})
    with pytest.raises(refcond.ConfigError, match=r"finite"):
        TrainingData({"path": "d.jsonl", "self_reconstruction": float("nan")})
    for seed, message in [(-1, "seed must be between 0"), (True, "seed must be an integer"), (2**64, "seed must be between"), ("1", "seed must be an integer")]:
        with pytest.raises(refcond.ConfigError, match=message):
            TrainingData({"path": "d.jsonl"}, seed=seed)
    for field in DataConfig.model_fields.values():
        assert field.description, field


def test_make_loader_refuses_bad_arguments(groups):
    data = TrainingData(DataConfig(path=groups, resolution=64))
    with pytest.raises(refcond.ConfigError, match="batch_size must be between 1 and 65536"):
        make_loader(data, 0)
    with pytest.raises(refcond.ConfigError, match="make_loader reads a TrainingData"):
        make_loader([1, 2], 1)
    with pytest.raises(IndexError):
        data[-1]


def test_the_data_is_kept_compactly(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "caption": f"caption {i}"} for i in range(1000)])
    data = TrainingData(DataConfig(path=path))
    assert isinstance(data._blob, bytes) and data._offsets.dtype == np.int64 and len(data) == 1000
    assert len(pickle.dumps(data)) < 80_000  # no Python object per record: workers share one block of bytes


# -- the documentation -----------------------------------------------------------------------------


def test_the_documentation_examples_run(tmp_path, monkeypatch):
    page = (ROOT / "docs" / "training-data.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", page, flags=re.MULTILINE | re.DOTALL)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        if block.startswith("# not run"):
            continue
        exec(compile(block, "docs/training-data.md", "exec"), namespace)
    for name in re.findall(r"\| `(MAX_\w+)` \|", page):
        assert hasattr(data_module, name), name
    for name in data_module.__all__:
        if name.startswith("MAX_"):
            assert f"`{name}`" in page, f"docs/training-data.md does not list the limit {name}"
