"""Reading reference images: every accepted kind becomes an RGB PIL image; bad input says what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

import refcond
from refcond import ReferenceImageError, load_references


def save(image: PIL.Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def pixels(image: PIL.Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# -- what is accepted --------------------------------------------------------------------------


def test_paths_pil_images_and_arrays_in_one_group(tmp_path, references):
    path = save(references[0], tmp_path / "a.png")
    group = load_references([str(path), path, references[1], np.asarray(references[2])])
    assert [im.mode for im in group] == ["RGB"] * 4
    assert np.array_equal(pixels(group[0]), np.asarray(references[0]))
    assert np.array_equal(pixels(group[1]), np.asarray(references[0]))
    assert group[2] is references[1]  # RGB images are used as they are
    assert np.array_equal(pixels(group[3]), np.asarray(references[2]))


def test_a_single_image_is_a_group_of_one(references):
    assert len(load_references(references[0])) == 1
    assert len(load_references(np.asarray(references[0]))) == 1


def test_grayscale_becomes_gray_rgb():
    gray = PIL.Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8), mode="L")
    assert pixels(load_references(gray)[0]).tolist() == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]


def test_palette_images_use_their_palette(tmp_path):
    palette = PIL.Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    loaded = load_references(save(palette, tmp_path / "p.png"))[0]
    assert pixels(loaded).tolist() == [[[255, 0, 0], [0, 0, 255]]]


def test_palette_transparency_is_composited_onto_white(tmp_path):
    palette = PIL.Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    palette.info["transparency"] = 1  # palette index 1 is fully transparent
    loaded = load_references(save(palette, tmp_path / "pt.png"))[0]
    assert pixels(loaded).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_rgba_is_composited_onto_white(tmp_path):
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    loaded = load_references(save(PIL.Image.fromarray(rgba, mode="RGBA"), tmp_path / "rgba.png"))[0]
    opaque, transparent, half = pixels(loaded)[0].tolist()
    assert opaque == [10, 20, 30]
    assert transparent == [255, 255, 255]  # not the black hidden under alpha 0
    assert all(abs(c - 127) <= 1 for c in half)  # half-transparent black over white is mid gray


def test_rgba_arrays_are_composited_too():
    rgba = np.array([[[10, 20, 30, 0]]], dtype=np.uint8)
    assert pixels(load_references(rgba)[0]).tolist() == [[[255, 255, 255]]]


def test_gray_with_alpha_is_composited_onto_white():
    la = PIL.Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), mode="LA")
    assert pixels(load_references(la)[0]).tolist() == [[[50, 50, 50], [255, 255, 255]]]


def test_16_bit_grayscale_png_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = save(PIL.Image.fromarray(values), tmp_path / "gray16.png")
    assert PIL.Image.open(path).mode == "I;16"
    loaded = load_references(path)[0]
    # 16-bit v maps to round(v / 65535 * 255): 0, 1, 128, 255 (not clipped to white above 255)
    assert pixels(loaded)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_uint16_and_float_arrays_are_scaled():
    wide = np.array([[0, 65535]], dtype=np.uint16)
    assert pixels(load_references(wide)[0])[0, :, 0].tolist() == [0, 255]
    unit = np.array([[[0.0, 0.5, 1.0]]], dtype=np.float32)
    assert pixels(load_references(unit)[0]).tolist() == [[[0, 128, 255]]]


def test_channels_first_tensors_are_accepted():
    chw = torch.zeros(3, 2, 4)
    chw[0] = 1.0  # red
    image = load_references(chw)[0]
    assert image.size == (4, 2)
    assert pixels(image)[0, 0].tolist() == [255, 0, 0]
    gray = load_references(torch.full((1, 2, 2), 0.5, dtype=torch.bfloat16))[0]
    assert pixels(gray)[0, 0].tolist() == [128, 128, 128]


# -- what is refused, and the message --------------------------------------------------------


@pytest.mark.parametrize("nothing", [None, [], ()], ids=["None", "empty-list", "empty-tuple"])
def test_no_references(nothing):
    with pytest.raises(ReferenceImageError, match=r"no reference images given: pass references=\[image, \.\.\.\] with at least one image"):
        load_references(nothing)


def test_missing_file_names_the_file_and_its_position(tmp_path, references):
    missing = tmp_path / "nope.png"
    with pytest.raises(ReferenceImageError) as excinfo:
        load_references([references[0], missing])
    assert str(excinfo.value) == f"reference 1 ({str(missing)!r}): file not found. Check the path, or pass a PIL image instead."


def test_folder(tmp_path):
    with pytest.raises(ReferenceImageError, match="is a folder, not an image file. Pass the image files inside it"):
        load_references(tmp_path)


def test_truncated_png(tmp_path, references):
    whole = save(references[0], tmp_path / "whole.png").read_bytes()
    broken = tmp_path / "broken.png"
    broken.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ReferenceImageError) as excinfo:
        load_references(broken)
    message = str(excinfo.value)
    assert str(broken) in message
    assert "not a readable image" in message
    assert "Pass a PNG, JPEG, WebP or other format that Pillow opens" in message


def test_a_text_file_is_not_an_image(tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("these are not pixels")
    with pytest.raises(ReferenceImageError, match=r"reference 0 \(.*notes\.png'\): not a readable image \(UnidentifiedImageError"):
        load_references(notes)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (42, r"reference 0: unsupported type int; pass a file path, a PIL image, a numpy array or a tensor"),
        (b"\x89PNG", r"reference 0: unsupported type bytes"),
        (np.zeros((2, 2, 2), dtype=np.uint8), r"must be HxW, HxWx3 or HxWx4 \(or CxHxW for tensors\), got shape \(2, 2, 2\)"),
        (np.zeros((1, 2, 2, 3), dtype=np.uint8), r"got shape \(1, 2, 2, 3\)"),
        (np.zeros((2, 2), dtype=np.int64), r"unsupported array dtype int64; use uint8, uint16 or float in \[0, 1\]"),
        (np.full((2, 2), 255.0), r"float image values must lie in \[0, 1\], got \[255, 255\]\. Divide 0\.\.255 values by 255"),
        (np.full((2, 2), -1.0), r"map -1\.\.1 values with \(x \+ 1\) / 2"),
        (np.array([[0.0, np.nan]]), r"the array contains NaN or infinite values"),
    ],
    ids=["int", "bytes", "two-channels", "batch-array", "int64", "float-0-255", "float-minus-one", "nan"],
)
def test_unsupported_inputs(item: Any, message: str):
    with pytest.raises(ReferenceImageError, match=message):
        load_references([item])


def test_errors_are_refcond_errors_and_value_errors(tmp_path):
    with pytest.raises(refcond.RefcondError):
        load_references(tmp_path / "missing.png")
    with pytest.raises(ValueError):
        load_references(None)


# -- through the pipeline --------------------------------------------------------------------


def test_a_pipeline_call_without_references_says_what_to_pass(sd15_pipe, plugins):
    if "ip-adapter" not in plugins.registry.names("composition"):
        pytest.skip("the 'ip-adapter' composition is not registered yet (refcond-injectors provides it)")
    rp = refcond.from_pipe(sd15_pipe, "ip-adapter", plugins=plugins)
    for nothing in (None, []):
        with pytest.raises(ReferenceImageError, match="no reference images given"):
            rp("a dog", references=nothing, num_inference_steps=1)
