"""Fuzzing the references: every kind of reference is read, or refused with a ReferenceImageError.

Generated references: files of many formats, whole or damaged (truncated, bytes flipped, garbage, a
header that declares a huge image); paths that are not regular files (FIFOs, folders, devices,
sockets, symlink loops), too long, missing or through a file; PIL images of every mode and size
(0 and extreme aspect ratios included), closed or opened lazily from a damaged file, with NaN or
infinite values; numpy arrays and torch tensors of many dtypes, shapes and values (NaN, inf, out of
range), meta, sparse, non-contiguous, huge broadcast views; and other objects (None, bytes, file
objects, nested lists). Groups of them go (a) through :func:`refcond.load_references`, which must
leave the inputs as they were, and (b) through a real generation on the tiny ``ip-adapter``
(CLIP) and ``easyref`` (Qwen2-VL) compositions, which must leave the UNet as it was.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from fuzzing import guard, same_state, unet_state
from hypothesis import given
from hypothesis import strategies as st

import refcond
from refcond.testing import save_tiny_qwen2vl, tiny_sd15_pipeline, tiny_sdxl_pipeline

SURFACE = "references"

MODES = ["1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "F", "LA", "La", "PA"]
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "ICO", "TGA"]
#: Sides: empty, tiny, ordinary, and long enough for a 1x300 strip (over the encoders' 200:1).
SIDES = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 16, 33]), st.integers(1, 48), st.sampled_from([200, 201, 300]))
SEEDS = st.integers(0, 2**16)


class Workspace:
    """Folders for the files of one example (a new one per reference), and the sockets kept open while it runs."""

    counter = itertools.count()

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sockets: list[socket.socket] = []

    def new_folder(self) -> Path:
        folder = self.root / f"r{next(self.counter)}"
        folder.mkdir()
        return folder

    def close(self) -> None:
        for server in self.sockets:
            server.close()


def noise(width: int, height: int, seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def pil_image(mode: str, width: int, height: int, fill: str, seed: int) -> PIL.Image.Image:
    """An image of any mode and size; ``fill`` is 'noise', 'zeros', 'nan', 'inf' or 'wide' (float values far outside 0..1)."""
    if width == 0 or height == 0:
        return PIL.Image.new(mode, (width, height))
    if fill in ("nan", "inf", "wide") and mode in ("F", "I"):
        rng = np.random.default_rng(seed)
        values = rng.normal(0, 1e4, (height, width)).astype(np.float32)
        if fill != "wide":
            values[rng.integers(0, height), rng.integers(0, width)] = np.nan if fill == "nan" else np.inf
        image = PIL.Image.fromarray(values)
        return image if mode == "F" else image.convert("I")
    if fill == "zeros":
        return PIL.Image.new(mode, (width, height))
    try:
        return noise(width, height, seed).convert(mode)
    except ValueError:  # a conversion Pillow lacks (e.g. to "La")
        return PIL.Image.new(mode, (width, height))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def encoded(image: PIL.Image.Image, fmt: str) -> bytes:
    """``image`` saved as ``fmt``: in its own mode if the format takes it, else as RGB, else as PNG."""
    for candidate, form in ((image, fmt), (image.convert("RGB") if image.mode != "La" else image.convert("LA").convert("RGB"), fmt), (noise(4, 4, 0), "PNG")):
        buffer = io.BytesIO()
        try:
            candidate.save(buffer, format=form)
            return buffer.getvalue()
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise AssertionError("unreachable: a 4x4 RGB PNG always saves")


# -- references: each a recipe (shown when a finding is shrunk) that makes the object -------------


@dataclass(frozen=True)
class File:
    """An image file, whole or damaged."""

    fmt: str
    mode: str
    width: int
    height: int
    damage: str  # none, truncate, flip, garbage, header-only
    cut: float
    seed: int

    def make(self, space: Workspace) -> Any:
        data = encoded(pil_image(self.mode, max(self.width, 1), max(self.height, 1), "noise", self.seed), self.fmt)
        rng = np.random.default_rng(self.seed)
        if self.damage == "truncate":
            data = data[: int(len(data) * self.cut)]
        elif self.damage == "flip":
            array = np.frombuffer(data, dtype=np.uint8).copy()
            spots = rng.integers(0, len(array), max(1, int(len(array) * self.cut / 10)))
            array[spots] ^= rng.integers(1, 256, len(spots), dtype=np.uint8)
            data = array.tobytes()
        elif self.damage == "garbage":
            data = rng.integers(0, 256, int(200 * self.cut) + 1, dtype=np.uint8).tobytes()
        elif self.damage == "header-only":
            data = data[: 8 + int(56 * self.cut)]
        path = space.new_folder() / f"image{self.seed}.{self.fmt.lower()}"
        path.write_bytes(data)
        return path


@dataclass(frozen=True)
class Declared:
    """A PNG whose header declares a size (huge, zero, or ordinary) and holds no pixels; as a path or opened lazily."""

    width: int
    height: int
    lazy: bool

    def make(self, space: Workspace) -> Any:
        path = space.new_folder() / "declared.png"
        path.write_bytes(png_header(self.width, self.height))
        if not self.lazy:
            return str(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
                return PIL.Image.open(path)
        except Exception:  # noqa: BLE001 - Pillow refuses the header itself: then pass the path
            return str(path)


@dataclass(frozen=True)
class SpecialPath:
    """A path that is not an image file (or not a file at all)."""

    kind: str

    def make(self, space: Workspace) -> Any:
        folder = space.new_folder()
        if self.kind == "fifo":
            os.mkfifo(folder / "pipe.png")
            return folder / "pipe.png"
        if self.kind == "symlink-to-fifo":
            os.mkfifo(folder / "pipe")
            (folder / "link.png").symlink_to(folder / "pipe")
            return folder / "link.png"
        if self.kind == "folder":
            return folder
        if self.kind == "long-name":
            return folder / ("n" * 300 + ".png")
        if self.kind == "long-path":
            return str(folder / "/".join(["d" * 200] * 30)) + ".png"
        if self.kind == "missing":
            return folder / "missing.png"
        if self.kind == "through-a-file":
            (folder / "file.png").write_bytes(encoded(noise(4, 4, 0), "PNG"))
            return folder / "file.png" / "inner.png"
        if self.kind == "symlink-loop":
            (folder / "loop.png").symlink_to(folder / "loop.png")
            return folder / "loop.png"
        if self.kind == "empty-file":
            (folder / "empty.png").touch()
            return str(folder / "empty.png")
        if self.kind == "socket":
            server = socket.socket(socket.AF_UNIX)
            space.sockets.append(server)
            try:
                server.bind(str(folder / "s"))
            except OSError:  # a temporary folder too deep for a socket's path (108 bytes): another non-file
                return "/dev/null"
            return folder / "s"
        return {"device": "/dev/null", "zero-device": "/dev/zero", "empty-string": "", "nul": "a\0b.png", "dot": "."}[self.kind]


@dataclass(frozen=True)
class Pil:
    """A PIL image of any mode and size, possibly closed or opened lazily from a (damaged) file."""

    mode: str
    width: int
    height: int
    fill: str
    state: str  # plain, closed, lazy, lazy-truncated
    seed: int

    def make(self, space: Workspace) -> Any:
        image = pil_image(self.mode, self.width, self.height, self.fill, self.seed)
        if self.state == "closed":
            image.close()
        elif self.state in ("lazy", "lazy-truncated") and self.width and self.height:
            data = encoded(image, "TIFF" if self.mode in ("F", "I", "I;16", "I;16B") else "PNG")
            if self.state == "lazy-truncated":
                data = data[: max(64, len(data) // 2)]
            path = space.new_folder() / f"lazy{self.seed}.img"
            path.write_bytes(data)
            try:
                image = PIL.Image.open(path)
            except Exception:  # noqa: BLE001 - cut inside the header: pass the path instead
                return path
        return image


NUMPY_DTYPES = ["uint8", "uint16", ">u2", "int8", "int16", "int32", "int64", "float16", "float32", ">f4", "float64", "bool", "complex64", "object", "U2", "datetime64[s]"]
TORCH_DTYPES = ["uint8", "uint16", "int8", "int32", "int64", "float16", "bfloat16", "float32", "float64", "bool", "complex64", "float8_e4m3fn"]


@dataclass(frozen=True)
class Array:
    """A numpy array or a torch tensor: dtype, shape, values and, for tensors, device/layout variants."""

    tensor: bool
    dtype: str
    shape: tuple[int, ...]
    fill: str  # valid, zeros, nan, inf, over, negative
    variant: str  # plain, meta, sparse, transposed, grad, broadcast
    seed: int

    def make(self, space: Workspace) -> Any:
        rng = np.random.default_rng(self.seed)
        float_values = np.asarray(rng.random(self.shape))  # a 0-d shape gives a float
        if self.fill == "zeros":
            float_values[...] = 0
        elif self.fill == "over":
            float_values = float_values * 1000
        elif self.fill == "negative":
            float_values = float_values - 2
        elif self.fill in ("nan", "inf") and float_values.size:
            float_values.flat[rng.integers(0, float_values.size)] = np.nan if self.fill == "nan" else -np.inf
        if self.tensor:
            return self._tensor(float_values)
        float_values = np.asarray(float_values)  # arithmetic on a 0-d array gives a scalar
        dtype = np.dtype(self.dtype)
        if dtype.kind in "ui":
            top = np.iinfo(dtype).max if self.fill == "over" else min(255, np.iinfo(dtype).max)
            array = np.nan_to_num(float_values * top).clip(np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
        elif dtype.kind in "fcb":
            array = float_values.astype(dtype)
        elif dtype.kind == "O":
            array = np.empty(self.shape, dtype=object)
            array[...] = None
        else:
            array = np.zeros(self.shape, dtype=dtype)
        array = np.asarray(array)  # arithmetic on a 0-d array gives a numpy scalar
        if self.variant == "broadcast" and array.size:
            return np.broadcast_to(array.reshape(-1)[:1].reshape((1,) * array.ndim), tuple(s * 97 for s in self.shape))
        if self.variant == "transposed" and array.ndim >= 2:
            return array.swapaxes(0, 1)
        return array

    def _tensor(self, values: np.ndarray) -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        if self.variant == "meta":
            return torch.empty(self.shape, dtype=dtype, device="meta")
        tensor = torch.from_numpy(np.asarray(values))
        if dtype.is_floating_point or dtype.is_complex:
            tensor = tensor.to(dtype)
        else:
            tensor = torch.nan_to_num(tensor * 255).clamp(0, 255).to(dtype)
        try:
            if self.variant == "sparse":
                return tensor.to_sparse()
            if self.variant == "transposed" and tensor.ndim >= 2:
                return tensor.transpose(-1, -2)
            if self.variant == "grad" and tensor.is_floating_point():
                return tensor.requires_grad_(True)
            if self.variant == "broadcast" and tensor.numel():
                return tensor.reshape(-1)[:1].reshape((1,) * tensor.ndim).expand(tuple(s * 97 for s in self.shape))
        except (RuntimeError, NotImplementedError):  # a variant torch lacks for this dtype (sparse uint16): the plain tensor
            pass
        return tensor


@dataclass(frozen=True)
class Huge:
    """An image that declares a size it does not hold: broadcast views, expanded and meta tensors."""

    kind: str

    def make(self, space: Workspace) -> Any:
        if self.kind == "numpy-view":
            return np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (100_000, 100_000, 3))
        if self.kind == "float-view":
            return np.broadcast_to(np.zeros((1, 1), dtype=np.float64), (50_000, 50_000))
        if self.kind == "expanded-tensor":
            return torch.zeros(1, 1, 1).expand(3, 100_000, 100_000)
        return torch.empty(3, 100_000, 100_000, device="meta")


@dataclass(frozen=True)
class Other:
    """Something that is not an image."""

    kind: str

    def make(self, space: Workspace) -> Any:
        png = encoded(noise(4, 4, 0), "PNG")
        return {
            "none": None,
            "int": 3,
            "float": 0.5,
            "bytes": png,
            "bytearray": bytearray(png),
            "memoryview": memoryview(png),
            "file-object": io.BytesIO(png),
            "dict": {"image": noise(4, 4, 0)},
            "object": object(),
            "empty-list": [],
            "nested": [[noise(4, 4, 0)]],
            "tuple": (noise(4, 4, 0),),
            "set": {1},
            "generator": (noise(4, 4, 0) for _ in range(1)),
            "numpy-scalar": np.float32(0.5),
        }[self.kind]


sides = SIDES
files = st.builds(
    File,
    st.sampled_from(FORMATS),
    st.sampled_from(MODES),
    sides,
    sides,
    st.sampled_from(["none", "none", "truncate", "flip", "garbage", "header-only"]),
    st.floats(0.0, 1.0),
    SEEDS,
)
declared = st.builds(
    Declared,
    st.one_of(st.sampled_from([0, 1, 9000, 100_000, 2**31 - 1]), st.integers(0, 2**32 - 1)),
    st.one_of(st.sampled_from([0, 1, 9000, 100_000, 2**31 - 1]), st.integers(0, 2**32 - 1)),
    st.booleans(),
)
special = st.builds(
    SpecialPath,
    st.sampled_from(
        ["fifo", "symlink-to-fifo", "folder", "long-name", "long-path", "missing", "through-a-file", "symlink-loop", "empty-file",
         "socket", "device", "zero-device", "empty-string", "nul", "dot"]
    ),
)
pils = st.builds(
    Pil,
    st.sampled_from(MODES),
    sides,
    sides,
    st.sampled_from(["noise", "zeros", "nan", "inf", "wide"]),
    st.sampled_from(["plain", "plain", "closed", "lazy", "lazy-truncated"]),
    SEEDS,
)
dims = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5]), st.integers(1, 24), st.sampled_from([200, 300]))
shapes = st.one_of(
    st.tuples(dims, dims),
    st.tuples(dims, dims, st.sampled_from([1, 2, 3, 4, 5])),
    st.tuples(st.sampled_from([1, 2, 3, 4]), dims, dims),
    st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple),
).filter(lambda shape: int(np.prod(shape)) <= 4 * 300 * 24)
arrays = st.one_of(
    st.builds(Array, st.just(False), st.sampled_from(NUMPY_DTYPES), shapes, st.sampled_from(["valid", "valid", "zeros", "nan", "inf", "over", "negative"]),
              st.sampled_from(["plain", "plain", "transposed", "broadcast"]), SEEDS),
    st.builds(Array, st.just(True), st.sampled_from(TORCH_DTYPES), shapes, st.sampled_from(["valid", "valid", "zeros", "nan", "inf", "over", "negative"]),
              st.sampled_from(["plain", "plain", "meta", "sparse", "transposed", "grad", "broadcast"]), SEEDS),
)
huge = st.builds(Huge, st.sampled_from(["numpy-view", "float-view", "expanded-tensor", "meta-tensor"]))
others = st.builds(
    Other,
    st.sampled_from(["none", "int", "float", "bytes", "bytearray", "memoryview", "file-object", "dict", "object", "empty-list", "nested", "tuple",
                     "set", "generator", "numpy-scalar"]),
)
#: Readable kinds weigh double, so that generations run often enough to exercise the encoders.
references = st.one_of(files, files, pils, pils, arrays, arrays, declared, special, huge, others)


@dataclass(frozen=True)
class Groups:
    """How the references are passed: one bare reference, one group (a list), or a list of groups."""

    shape: str  # single, group, groups
    items: tuple[Any, ...]

    def make(self, space: Workspace) -> Any:
        if self.shape == "single":
            return self.items[0].make(space)
        if self.shape == "group":
            return [item.make(space) for item in self.items]
        return [[item.make(space) for item in group] for group in self.items]


calls = st.one_of(
    references.map(lambda r: Groups("single", (r,))),
    st.lists(references, min_size=0, max_size=3).map(lambda rs: Groups("group", tuple(rs))),
    st.lists(st.lists(references, min_size=0, max_size=2).map(tuple), min_size=1, max_size=2).map(lambda gs: Groups("groups", tuple(gs))),
)


# -- what the inputs must be after any call: as they were -------------------------------------------


def snapshot(value: Any) -> Any:
    """What a reference holds, to compare before and after (bytes of arrays and dense tensors, PIL mode and size)."""
    if isinstance(value, list):
        return [snapshot(v) for v in value]
    if isinstance(value, np.ndarray):
        if value.size > 1_000_000:  # a broadcast view: its one real element
            return ("view", value.shape, value.strides)
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, torch.Tensor):
        if value.is_meta or value.layout != torch.strided or value.numel() > 1_000_000:
            return ("tensor", value.dtype, tuple(value.shape), str(value.layout), value.device.type)
        dense = value.detach().contiguous()
        return ("tensor", dense.dtype, tuple(dense.shape), value.requires_grad, dense.reshape(-1).view(torch.uint8).clone())
    if isinstance(value, PIL.Image.Image):
        return ("pil", value.mode, value.size)
    return ("object", id(value))


def same_snapshot(before: Any, after: Any) -> bool:
    if isinstance(before, list):
        return isinstance(after, list) and len(before) == len(after) and all(same_snapshot(a, b) for a, b in zip(before, after))
    if before[0] == "tensor" and len(before) == 5 and isinstance(before[4], torch.Tensor):
        return before[:4] == after[:4] and torch.equal(before[4], after[4])
    return before == after


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("references")


@pytest.fixture(scope="module")
def ip_adapter() -> refcond.RefcondPipeline:
    pipe = tiny_sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    rp = refcond.from_pipe(pipe, "ip-adapter", seed=0)
    yield rp
    rp.detach()


@pytest.fixture(scope="module")
def easyref(tmp_path_factory: pytest.TempPathFactory) -> refcond.RefcondPipeline:
    from refcond_easyref.testing import tiny_easyref_overrides

    folder = save_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl"))
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    rp = refcond.from_pipe(pipe, "easyref", seed=0, **tiny_easyref_overrides(folder))
    yield rp
    rp.detach()


@given(call=calls)
def test_load_references(root: Path, call: Groups) -> None:
    space = Workspace(root)
    try:
        given_references = call.make(space)
        guard(SURFACE, lambda: refcond.load_references(given_references), state=lambda: snapshot(given_references), same=same_snapshot)
    finally:
        space.close()


def generate(rp: refcond.RefcondPipeline, root: Path, call: Groups) -> None:
    space = Workspace(root)
    try:
        given_references = call.make(space)
        guard(
            SURFACE,
            lambda: rp("a toy", references=given_references, num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0)),
            state=lambda: unet_state(rp.pipeline.unet),
            same=same_state,
        )
    finally:
        space.close()


@given(call=calls)
def test_generate_with_ip_adapter(ip_adapter: refcond.RefcondPipeline, root: Path, call: Groups) -> None:
    generate(ip_adapter, root, call)


@given(call=calls)
def test_generate_with_easyref(easyref: refcond.RefcondPipeline, root: Path, call: Groups) -> None:
    generate(easyref, root, call)
