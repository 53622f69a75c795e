"""Reading reference images: every accepted kind becomes an RGB PIL image; bad input says what to do."""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import socket
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

import refcond
import refcond.images
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


# -- reliability: no bad reference escapes as a raw error, hangs, exhausts memory or turns into NaN ----
#
# Each test below is one class of input a fuzz run found (tests/fuzz/test_fuzz_references.py): the
# answer is a ReferenceImageError that names the reference (its position and path), says what was
# wrong and how to fix it, and leaves what was passed as it was.


class TookTooLong(BaseException):
    """Raised by :func:`no_longer_than` (not an OSError: the code under test must not turn it into a refusal)."""


@contextmanager
def no_longer_than(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the test run) if the block takes longer than ``seconds``."""

    def alarm(signum: int, frame: Any) -> None:
        raise TookTooLong(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refused(item: Any, *, group: int | None = None) -> str:
    """The message of the ReferenceImageError that loading ``[item]`` raises."""
    with pytest.raises(ReferenceImageError) as excinfo:
        load_references([item], group=group)
    return str(excinfo.value)


# file system errors: every OSError becomes a message that names the path and the fix


def test_a_file_name_too_long_for_the_file_system(tmp_path):
    long_name = tmp_path / ("a" * 300 + ".png")  # most file systems allow 255 bytes per name
    message = refused(long_name)
    assert message.startswith("reference 0 ('")
    assert "too long for the file system" in message
    assert "Rename the file or move it to a shorter path" in message


def test_a_path_through_a_file(tmp_path, references):
    image = save(references[0], tmp_path / "a.png")
    message = refused(image / "b.png")
    assert "a part of the path that should be a folder is a file" in message


def test_a_symbolic_link_loop(tmp_path):
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    assert "too many levels of symbolic links" in refused(loop)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file(tmp_path, references):
    image = save(references[0], tmp_path / "secret.png")
    image.chmod(0)
    assert "permission denied" in refused(image)


@pytest.mark.parametrize(
    ("code", "explained"),
    [
        (errno.EACCES, "permission denied. Make the file (and the folders above it) readable"),
        (errno.EIO, f"cannot be read ({os.strerror(errno.EIO)}, EIO). Check the path and the disk"),
        (errno.EMFILE, f"cannot be read ({os.strerror(errno.EMFILE)}, EMFILE)."),
    ],
    ids=["EACCES", "EIO", "EMFILE"],
)
def test_any_error_opening_the_file_is_explained(tmp_path, references, monkeypatch, code, explained):
    image = save(references[0], tmp_path / "a.png")

    def failing_open(*args: Any, **kwargs: Any) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "open", failing_open)  # stat succeeds, opening fails (as for a file root cannot read)
    assert refused(image).startswith(f"reference 0 ({str(image)!r}): {explained}")


def test_empty_path_and_nul_character():
    assert refused("") == "reference 0 (''): the path is empty. Pass the path of an image file."
    assert "contains a NUL character" in refused("a\0b.png")


def test_an_empty_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.touch()
    assert "the file is empty (0 bytes)" in refused(empty)


# what is not a regular file is refused without being opened


def test_a_named_pipe_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with no_longer_than(5):  # opening a FIFO for reading waits for a writer: forever
        message = refused(fifo)
    assert "is a named pipe (FIFO), not an image file; refcond does not open it" in message


def test_devices_sockets_and_folders_are_refused_without_opening_them(tmp_path, monkeypatch):
    opened: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="s") as short, socket.socket(socket.AF_UNIX) as server:
        server.bind(os.path.join(short, "s"))  # a socket's path must be short
        with monkeypatch.context() as patch:
            patch.setattr(os, "open", lambda *args, **kwargs: opened.append(args) or 0)
            assert "is a socket, not an image file" in refused(os.path.join(short, "s"))
            assert "is a device, not an image file" in refused("/dev/null")
            assert "is a folder, not an image file" in refused(tmp_path)
    assert opened == []


# tensors and arrays refcond cannot read


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (torch.zeros(3, 8, 8, device="meta"), "a tensor on the 'meta' device has a shape but no values"),
        (torch.zeros(3, 8, 8).to_sparse(), r"a sparse_coo tensor is not supported\. Pass a dense one: tensor\.to_dense\(\)"),
        (torch.zeros(3, 8, 8, dtype=torch.bool), r"unsupported tensor dtype bool; .*mask\.astype"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), "unsupported tensor dtype int64"),
        (torch.zeros(3, 8, 8, dtype=torch.complex64), "unsupported tensor dtype complex64"),
        (torch.full((3, 8, 8), float("nan")), "the array contains NaN or infinite values"),
        (torch.zeros(3, 0, 8), r"the image has no pixels \(8 wide, 0 high\)"),
        (np.zeros((0, 0, 3), dtype=np.uint8), r"the image has no pixels \(0 wide, 0 high\)"),
        (np.empty((2, 2), dtype=object), "unsupported array dtype object"),
        (np.zeros((2, 2), dtype=bool), r"unsupported array dtype bool; .*mask\.astype\(numpy\.uint8\) \* 255"),
        (np.zeros((2, 2), dtype=np.complex128), "unsupported array dtype complex128"),
        (np.array("not pixels"), r"got shape \(\)"),
        (np.zeros((2, 2, 2), dtype=np.uint8), r"For gray with alpha, pass PIL\.Image\.fromarray\(array, mode='LA'\)"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), r"For a batch, pass each image as its own reference"),
    ],
    ids=["meta", "sparse-coo", "bool-tensor", "int64-tensor", "complex-tensor", "nan-tensor", "empty-tensor",
         "empty-array", "object", "bool", "complex", "0-d", "two-channels", "batch"],
)
def test_tensors_and_arrays_that_are_not_images(item: Any, message: str):
    assert re.search(message, refused(item))


def test_16_bit_tensors_and_big_endian_arrays_are_read():
    assert pixels(load_references(torch.full((1, 2, 2), 65535, dtype=torch.uint16))[0])[0, 0].tolist() == [255, 255, 255]
    assert pixels(load_references(np.full((2, 2), 65535, dtype=">u2"))[0])[0, 0].tolist() == [255, 255, 255]
    assert pixels(load_references(np.full((2, 2), 0.5, dtype=">f4"))[0])[0, 0].tolist() == [128, 128, 128]


# PIL images: every mode, and the ones that cannot be read


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "F", "LA", "La", "PA"])
def test_every_pil_mode_becomes_rgb(mode):
    image = PIL.Image.new(mode, (3, 2))
    loaded = load_references(image)[0]
    assert loaded.mode == "RGB" and loaded.size == (3, 2)
    assert image.mode == mode  # the image passed is left as it was


def test_premultiplied_alpha_is_composited_onto_white_too():
    transparent = PIL.Image.new("RGBa", (1, 1), (0, 0, 0, 0))
    assert pixels(load_references(transparent)[0]).tolist() == [[[255, 255, 255]]]
    assert pixels(load_references(PIL.Image.new("La", (1, 1), (0, 0)))[0]).tolist() == [[[255, 255, 255]]]


@pytest.mark.parametrize("mode", ["RGB", "L", "I", "F", "LA"])
@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0)])
def test_images_without_pixels(mode, size):
    message = refused(PIL.Image.new(mode, size))
    assert message == f"reference 0: the image has no pixels ({size[0]} wide, {size[1]} high). Pass an image at least 1 pixel wide and high."


def test_a_closed_pil_image(references):
    image = references[0].copy()
    image.close()
    assert refused(image) == "reference 0: the PIL image is closed (Operation on closed image). Pass it before closing it, or open the file again."


def test_a_lazily_opened_truncated_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = save(PIL.Image.fromarray(noise), tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    lazy = PIL.Image.open(tmp_path / "cut.png")  # reads the header only: the damage shows when pixels are read
    message = refused(lazy)
    assert message.startswith(f"reference 0 (PIL image of {str(tmp_path / 'cut.png')!r}): the PIL image's pixels cannot be read (OSError: image file is truncated")
    assert "pass a complete image file" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_float_images_with_nan_or_infinity(value):
    values = np.full((4, 4), 0.5, dtype=np.float32)
    values[1, 2] = value
    message = refused(PIL.Image.fromarray(values))  # mode "F": NaN used to become black
    assert "the float (mode 'F') image contains NaN or infinite values" in message
    assert "nan_to_num" in message


# sizes: a maximum pixel count, checked before anything is decoded or copied


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels in a few dozen bytes (no pixel data)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_file_declaring_a_huge_image(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(100_000, 100_000))
    assert "the file declares more pixels than Pillow reads" in refused(bomb)
    large = tmp_path / "large.png"
    large.write_bytes(png_header(9000, 9000))  # over refcond's limit, under Pillow's
    message = refused(large)
    assert "9000 wide and 9000 high is 81,000,000 pixels, more than the 67,108,864 a reference may have" in message
    assert "refcond.images.MAX_REFERENCE_PIXELS" in message


def test_huge_arrays_and_tensors_are_refused_before_they_are_copied():
    view = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (100_000, 100_000, 3))  # no memory until copied
    assert "100000 wide and 100000 high is 10,000,000,000 pixels" in refused(view)
    expanded = torch.zeros(1, 1, 1).expand(3, 100_000, 100_000)
    assert "10,000,000,000 pixels" in refused(expanded)


def test_the_limit_applies_to_every_kind_and_can_be_raised(monkeypatch, references):
    monkeypatch.setattr(refcond.images, "MAX_REFERENCE_PIXELS", 48 * 48 - 1)
    for item in (references[0], np.asarray(references[0]), torch.zeros(3, 48, 48)):
        assert "2,304 pixels, more than the 2,303" in refused(item)
    monkeypatch.setattr(refcond.images, "MAX_REFERENCE_PIXELS", 48 * 48)
    assert len(load_references(references[0])) == 1


def test_large_float_arrays_convert_block_by_block_as_a_whole():
    values = np.random.default_rng(0).random((700, 600, 3), dtype=np.float32)  # more than one block
    expected = (np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    assert np.array_equal(pixels(load_references(values)[0]), expected)


# what a group holds


def test_objects_that_are_not_images():
    assert "For encoded image bytes or a file object, open them first: PIL.Image.open(io.BytesIO(data))" in refused(b"\x89PNG")
    assert "open them first" in refused(io.BytesIO(b"\x89PNG"))
    assert refused(None) == "reference 0: is None, not an image. Remove it from the group, or pass a file path, a PIL image, a numpy array or a tensor."


def test_none_inside_a_group_is_named_by_position(references):
    with pytest.raises(ReferenceImageError, match=r"^reference 1: is None, not an image"):
        load_references([references[0], None])


def test_a_nested_list_is_not_a_reference(references):
    with pytest.raises(ReferenceImageError, match=r"^reference 0: is a list, not an image: a group is one flat list of images"):
        load_references([[references[0]], references[1]])


def test_the_group_is_named_when_given(references, tmp_path):
    with pytest.raises(ReferenceImageError, match=r"^reference group 2 is empty: every group needs at least one image"):
        load_references([], group=2)
    missing = tmp_path / "missing.png"
    assert refused(missing, group=1).startswith(f"reference 0 of group 1 ({str(missing)!r}): file not found.")


def test_refused_inputs_are_left_as_they_were():
    values = np.full((4, 4, 3), 0.5)
    values[0, 0, 0] = np.nan
    before = values.copy()
    refused(values)
    assert np.array_equal(values, before, equal_nan=True)
    tensor = torch.full((3, 4, 4), 2.0)  # out of [0, 1]
    refused(tensor)
    assert torch.equal(tensor, torch.full((3, 4, 4), 2.0))


def test_an_image_read_from_a_file_keeps_its_path(tmp_path, references):
    path = save(references[0], tmp_path / "a.png")
    assert load_references(path)[0].filename == str(path)  # encoders name the file when they refuse it


# through the ip-adapter pipeline: the clip encoder's limit on elongated references


def test_the_clip_encoder_reads_tiny_and_elongated_references(sd15_pipe):
    rp = refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0)
    for size in [(1, 1), (1, 200), (200, 1)]:
        latents = rp("a toy", references=[PIL.Image.new("RGB", size, (200, 30, 30))], num_inference_steps=1, output_type="latent").images
        assert torch.isfinite(latents).all()


def test_the_clip_encoder_refuses_a_reference_more_elongated_than_200_to_1(sd15_pipe, tmp_path):
    rp = refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0)
    strip = save(PIL.Image.new("RGB", (1, 300)), tmp_path / "strip.png")
    # CLIP's processor would scale the short side up to 224 first: a 1x20000 strip took 43 s and 10 GB
    with pytest.raises(ReferenceImageError) as excinfo:
        rp("a toy", references=[strip], num_inference_steps=1, output_type="latent")
    message = str(excinfo.value)
    assert message.startswith(f"encoder 'clip': reference 0 of group 0 ({str(strip)!r}) is 1x300 pixels, an aspect ratio of 300:1, ")
    assert "the clip encoder takes at most 200:1" in message
    assert "Crop the image to the part CLIP should see" in message
