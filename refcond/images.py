"""Reading reference images: paths, PIL images, numpy arrays or tensors, normalised to RGB PIL.

:func:`load_references` (one group) and :func:`load_reference` (one image) are the one boundary
between what a user passes and what the encoders read. Whatever they cannot turn into a finite RGB
image of at most :data:`MAX_REFERENCE_PIXELS` pixels is refused with a
:class:`~refcond.ReferenceImageError` that names the reference (its position, its path), says what
is wrong and how to fix it. They never modify what they are given, and they check before they copy,
decode or open: a file is opened only once ``os.stat`` says it is a regular file (a named pipe would
block forever), and an image's size is checked against the limit from its header (a PNG can declare
100000x100000 pixels in a few bytes) or its shape (a broadcast numpy view holds no memory until copied).
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from refcond.errors import ReferenceImageError

ReferenceInput = str | Path | PIL.Image.Image | np.ndarray | torch.Tensor

#: The most pixels (width x height) a reference may have: 8192 x 8192. Larger images, files whose
#: header declares more and arrays whose shape says more are refused before anything is decoded or
#: copied (encoders resize references to a few hundred pixels a side anyway). Raise it by assigning
#: ``refcond.images.MAX_REFERENCE_PIXELS``; Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``, a
#: decompression-bomb guard at about 179 million pixels) still applies to files.
MAX_REFERENCE_PIXELS = 8192 * 8192


def load_references(
    references: ReferenceInput | Sequence[ReferenceInput] | None, *, group: int | None = None
) -> list[PIL.Image.Image]:
    """Load one reference group as RGB PIL images.

    Accepts file paths, PIL images of any mode, ``HxW``/``HxWx3``/``HxWx4`` uint8, uint16 or float
    (0..1) arrays and ``CxHxW`` tensors. Grayscale, palette, CMYK, 16-bit and float images are
    converted; alpha (straight or premultiplied) is composited onto white. A reference may have at
    most ``refcond.images.MAX_REFERENCE_PIXELS`` pixels (8192 x 8192), checked from a file's header
    or an array's shape before anything is decoded or copied.

    :param group: the group's position in a call with several groups, named in error messages.
    :raises ReferenceImageError: the group is empty, or a reference cannot be read: a missing or
        unreadable path, one that is not a regular file (a folder, a FIFO, a device: refused without
        being opened), a damaged file, a closed PIL image, no pixels or too many, NaN or infinite
        values, an unsupported type, dtype or shape. The message names the reference (its position,
        its path) and says how to fix it; nothing given is modified.
    """
    if references is None:
        raise ReferenceImageError(_no_references(group))
    items = list(references) if isinstance(references, (list, tuple)) else [references]  # one image, or any other object (refused below)
    if not items:
        raise ReferenceImageError(_no_references(group))
    return [load_reference(item, index, group=group) for index, item in enumerate(items)]


def _no_references(group: int | None) -> str:
    if group is None:
        return (
            "no reference images given: pass references=[image, ...] with at least one image "
            "(a file path, a PIL image, or an HxWxC array)."
        )
    return f"reference group {group} is empty: every group needs at least one image (a file path, a PIL image, or an HxWxC array)."


def load_reference(item: ReferenceInput, index: int = 0, *, group: int | None = None) -> PIL.Image.Image:
    """Load one reference as an RGB PIL image; ``index`` (and ``group``) name it in error messages.

    An RGB PIL image is returned as it is; anything else becomes a new image. An image read from a
    file keeps the file's path in its ``filename`` attribute, as Pillow's own opened images do, so
    that an encoder refusing it later can name the file.
    """
    where = f"reference {index}" if group is None else f"reference {index} of group {group}"
    if isinstance(item, (str, os.PathLike)):
        path = _fspath(item, where)
        where = f"{where} ({_show_path(path)})"
        image = to_rgb(_read_file(path, where), where)
        image.filename = path
        return image
    if isinstance(item, PIL.Image.Image):
        return to_rgb(_from_pil(item, where), where)
    if isinstance(item, torch.Tensor):
        return to_rgb(_from_tensor(item, where), where)
    if isinstance(item, np.ndarray):
        return to_rgb(_from_array(item, where, channels_first=False), where)
    raise ReferenceImageError(_unsupported(item, where))


_KINDS = "pass a file path, a PIL image, a numpy array or a tensor"


def _unsupported(item: Any, where: str) -> str:
    if item is None:
        return f"{where}: is None, not an image. Remove it from the group, or {_KINDS}."
    if isinstance(item, (list, tuple)):
        return (
            f"{where}: is a {type(item).__name__}, not an image: a group is one flat list of images. "
            "To give each prompt its own group, pass references=[[a, b], [c]] (every group a list of images)."
        )
    message = f"{where}: unsupported type {type(item).__name__}; {_KINDS}."
    if isinstance(item, (bytes, bytearray, memoryview)) or hasattr(item, "read"):
        message += " For encoded image bytes or a file object, open them first: PIL.Image.open(io.BytesIO(data))."
    return message


# -- files ---------------------------------------------------------------------------------------


def _fspath(item: str | os.PathLike, where: str) -> str:
    try:
        path = os.fspath(item)
    except Exception as exc:  # noqa: BLE001 - a user's PathLike may raise anything
        raise ReferenceImageError(f"{where}: {type(item).__name__} gives no usable path ({type(exc).__name__}: {exc}); pass a str or pathlib.Path.") from None
    return os.fsdecode(path)


def _show_path(path: str) -> str:
    """The path as written in messages: quoted, and shortened in the middle when very long."""
    if len(path) <= 240:
        return repr(path)
    return f"{path[:120] + '...' + path[-80:]!r}, {len(path)} characters"


def _read_file(path: str, where: str) -> PIL.Image.Image:
    if not path:
        raise ReferenceImageError(f"{where}: the path is empty. Pass the path of an image file.")
    if "\0" in path:
        raise ReferenceImageError(f"{where}: the path contains a NUL character, which no file name can hold. Check how the path was built.")
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ReferenceImageError(f"{where}: {_os_problem(exc)}") from None
    _check_regular_file(info, where)  # before opening: opening a FIFO waits for a writer, a device may act on open
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ReferenceImageError(f"{where}: {_os_problem(exc)}") from None
    with os.fdopen(fd, "rb") as handle:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino) or not stat.S_ISREG(opened.st_mode):
            raise ReferenceImageError(f"{where}: the file was replaced while it was being opened. Pass it again once it is written.")
        return _decode(handle, where)


def _os_problem(exc: OSError) -> str:
    """What an ``OSError`` from ``os.stat`` / ``os.open`` means for the user, and what to do."""
    code = exc.errno
    if code == errno.ENOENT:
        return "file not found. Check the path, or pass a PIL image instead."
    if code == errno.ENOTDIR:
        return "a part of the path that should be a folder is a file, so the path cannot exist. Check the path."
    if code == errno.ENAMETOOLONG:
        return (
            "the path, or a name in it, is too long for the file system (most allow 255 bytes per name and 4096 per path). "
            "Rename the file or move it to a shorter path."
        )
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied. Make the file (and the folders above it) readable, or copy it somewhere readable."
    if code == errno.ELOOP:
        return "too many levels of symbolic links (a link that points to itself?). Fix the link, or pass the file it should point to."
    reason = exc.strerror or str(exc)
    name = errno.errorcode.get(code, "") if code is not None else ""
    return f"cannot be read ({reason}{', ' + name if name else ''}). Check the path and the disk, or pass a PIL image instead."


def _check_regular_file(info: os.stat_result, where: str) -> None:
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        raise ReferenceImageError(f"{where}: is a folder, not an image file. Pass the image files inside it.")
    if stat.S_ISREG(mode):
        if info.st_size == 0:
            raise ReferenceImageError(f"{where}: the file is empty (0 bytes). Pass a complete image file.")
        return
    if stat.S_ISFIFO(mode):
        kind = "a named pipe (FIFO)"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    else:
        kind = "not a regular file"
    raise ReferenceImageError(
        f"{where}: is {kind}, not an image file; refcond does not open it (reading could wait forever). "
        "Save the image to a regular file, or pass a PIL image."
    )


def _decode(handle: Any, where: str) -> PIL.Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # refused below with a clearer message
            with PIL.Image.open(handle) as opened:
                _check_size(opened.size, where)  # from the header, before decoding
                opened.load()
                return opened.copy()
    except ReferenceImageError:
        raise
    except PIL.Image.DecompressionBombError as exc:
        raise ReferenceImageError(f"{where}: the file declares more pixels than Pillow reads ({exc}) {_TOO_LARGE_FIX}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file makes decoders raise anything (OSError, SyntaxError, struct.error, ...)
        raise ReferenceImageError(
            f"{where}: not a readable image ({type(exc).__name__}: {exc}). "
            "Pass a PNG, JPEG, WebP or other format that Pillow opens."
        ) from None


# -- sizes ---------------------------------------------------------------------------------------

_TOO_LARGE_FIX = "Downscale the image first: encoders resize references to a few hundred pixels a side anyway."


def _check_size(size: tuple[int, int], where: str) -> None:
    """Refuse an image without pixels or with more than :data:`MAX_REFERENCE_PIXELS`, from its size alone."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ReferenceImageError(f"{where}: the image has no pixels ({width} wide, {height} high). Pass an image at least 1 pixel wide and high.")
    if width * height > MAX_REFERENCE_PIXELS:
        raise ReferenceImageError(
            f"{where}: {width} wide and {height} high is {width * height:,} pixels, more than the {MAX_REFERENCE_PIXELS:,} a reference may have "
            f"(refcond.images.MAX_REFERENCE_PIXELS). {_TOO_LARGE_FIX}"
        )


# -- PIL images ----------------------------------------------------------------------------------


def _from_pil(image: PIL.Image.Image, where: str) -> PIL.Image.Image:
    filename = getattr(image, "filename", None)
    if isinstance(filename, str) and filename:
        where = f"{where} (PIL image of {_show_path(filename)})"
    _check_size(image.size, where)  # an image opened lazily knows its size from the header
    try:
        image.load()  # opened lazily: decode now, where a damaged file can still be named
    except Exception as exc:  # noqa: BLE001 - as in _decode
        if "closed" in str(exc):
            raise ReferenceImageError(f"{where}: the PIL image is closed ({exc}). Pass it before closing it, or open the file again.") from None
        raise ReferenceImageError(
            f"{where}: the PIL image's pixels cannot be read ({type(exc).__name__}: {exc}). "
            "Its file is damaged or cut short: pass a complete image file."
        ) from None
    return image


def to_rgb(image: PIL.Image.Image, where: str = "reference") -> PIL.Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit and float modes are rescaled, alpha is composited onto white.

    An RGB image is returned as it is. ``where`` names the image in errors.

    :raises ReferenceImageError: a float (mode ``F``) image holds NaN or infinite values, or Pillow
        cannot convert the mode.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    try:
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            values = np.asarray(image)
            low, high = values.min(), values.max()
            if mode == "F" and not (np.isfinite(low) and np.isfinite(high)):
                raise ReferenceImageError(
                    f"{where}: the float (mode 'F') image contains NaN or infinite values. Replace them first, e.g. "
                    "PIL.Image.fromarray(numpy.nan_to_num(numpy.asarray(image), nan=0.0, posinf=1.0, neginf=0.0))."
                )
            top = 65535.0 if mode.startswith("I;16") or high > 255 else 255.0
            if mode == "F" and high <= 1.0:
                top = 1.0
            gray = _to_uint8(values, lambda block: np.clip(block.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            return PIL.Image.fromarray(gray).convert("RGB")
        if mode in ("RGBa", "La"):  # premultiplied alpha: Pillow converts these to straight alpha only
            image = image.convert("RGBA" if mode == "RGBa" else "LA")
            mode = image.mode
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ReferenceImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a mode Pillow cannot convert, or pixels it cannot read
        raise ReferenceImageError(
            f"{where}: cannot convert the PIL image of mode {mode!r} to RGB ({type(exc).__name__}: {exc}). Convert it to 'RGB' yourself."
        ) from None


#: Elements converted at a time: bounds the temporary copies of a large array.
_BLOCK = 1 << 20


def _to_uint8(values: np.ndarray, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``convert`` applied block of rows by block of rows into a new uint8 array (never more than a block of temporaries)."""
    out = np.empty(values.shape, dtype=np.uint8)
    row = max(1, int(np.prod(values.shape[1:])))
    step = max(1, _BLOCK // row)
    for start in range(0, values.shape[0], step):
        out[start : start + step] = convert(values[start : start + step])
    return out


# -- arrays and tensors --------------------------------------------------------------------------

#: Rounding noise tolerated outside [0, 1] in float images (e.g. from a VAE decode).
_FLOAT_SLACK = 1e-3
#: The integer tensor dtypes read as images (uint16 exists from torch 2.3).
_TENSOR_INTEGERS = tuple(d for d in (torch.uint8, getattr(torch, "uint16", None)) if d is not None)
_DTYPE_FIX = "use uint8, uint16 or float in [0, 1]"


def _from_tensor(tensor: torch.Tensor, where: str) -> PIL.Image.Image:
    if tensor.is_meta:
        raise ReferenceImageError(
            f"{where}: a tensor on the 'meta' device has a shape but no values. Pass a tensor with real values "
            "(one created or loaded on 'cpu' or 'cuda')."
        )
    if tensor.is_nested:
        raise ReferenceImageError(f"{where}: a nested tensor is not an image. Pass each image as its own reference.")
    if tensor.layout != torch.strided:
        raise ReferenceImageError(f"{where}: a {str(tensor.layout).removeprefix('torch.')} tensor is not supported. Pass a dense one: tensor.to_dense().")
    if tensor.is_quantized:
        raise ReferenceImageError(f"{where}: a quantized tensor is not supported. Pass tensor.dequantize().")
    if tensor.is_complex() or not (tensor.is_floating_point() or tensor.dtype in _TENSOR_INTEGERS):
        raise ReferenceImageError(f"{where}: unsupported tensor dtype {str(tensor.dtype).removeprefix('torch.')}; {_DTYPE_FIX}{_dtype_hint(tensor.dtype)}")
    _image_shape(tuple(tensor.shape), where, channels_first=True)  # before copying anything
    try:
        tensor = tensor.detach()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()  # numpy has no bfloat16 or float8
        array = tensor.numpy(force=True)  # copies to the CPU when needed
    except Exception as exc:  # noqa: BLE001 - a tensor subclass or a device that cannot hand its values over
        raise ReferenceImageError(
            f"{where}: the tensor's values cannot be read ({type(exc).__name__}: {exc}). Pass a plain CPU tensor or a numpy array."
        ) from None
    return _from_array(array, where, channels_first=True)


def _dtype_hint(dtype: Any) -> str:
    if dtype is torch.bool or (isinstance(dtype, np.dtype) and dtype.kind == "b"):
        return " (a mask: mask.astype(numpy.uint8) * 255)."
    integer = dtype.kind in "iu" if isinstance(dtype, np.dtype) else not (dtype.is_floating_point or dtype.is_complex)
    return " (0..255 integers: array.astype(numpy.uint8))." if integer else "."


def _image_shape(shape: tuple[int, ...], where: str, channels_first: bool) -> tuple[int, int, int | None, bool]:
    """``(height, width, channels or None, channels_first)`` of an image array's shape; refuses other shapes and sizes."""
    height = width = 0
    channels: int | None = -1  # an unsupported shape unless one of these matches
    first = len(shape) == 3 and channels_first and shape[0] in (1, 3, 4)
    if first:
        channels, height, width = shape
    elif len(shape) == 3:
        height, width, channels = shape
    elif len(shape) == 2:
        (height, width), channels = shape, None
    if channels not in (None, 1, 3, 4):
        message = f"{where}: an image array must be HxW, HxWx3 or HxWx4 (or CxHxW for tensors), got shape {shape}."
        if len(shape) == 3 and shape[-1] == 2:
            message += " For gray with alpha, pass PIL.Image.fromarray(array, mode='LA')."
        elif len(shape) == 4:
            message += " For a batch, pass each image as its own reference: list(array)."
        raise ReferenceImageError(message)
    _check_size((width, height), where)
    return height, width, channels, first


def _from_array(array: np.ndarray, where: str, channels_first: bool) -> PIL.Image.Image:
    array = np.asarray(array)  # a subclass (matrix, masked array) as a plain array; no copy
    _, _, channels, first = _image_shape(array.shape, where, channels_first)  # before converting anything
    dtype = array.dtype
    if not (dtype == np.uint8 or dtype.kind == "u" and dtype.itemsize == 2 or dtype.kind == "f"):
        raise ReferenceImageError(f"{where}: unsupported array dtype {dtype}; {_DTYPE_FIX}{_dtype_hint(dtype)}")
    if first:
        array = np.moveaxis(array, 0, -1)
    if channels == 1:
        array = array[..., 0]
    if dtype.kind == "u" and dtype.itemsize == 2:
        array = _to_uint8(array, lambda block: (block.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8))
    elif dtype.kind == "f":
        low, high = array.min(), array.max()  # NaN propagates, inf shows: no temporary the size of the image
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ReferenceImageError(f"{where}: the array contains NaN or infinite values. Replace them first, e.g. numpy.nan_to_num(array).")
        low, high = float(low), float(high)
        if low < -_FLOAT_SLACK or high > 1.0 + _FLOAT_SLACK:
            raise ReferenceImageError(
                f"{where}: float image values must lie in [0, 1], got [{low:g}, {high:g}]. "
                "Divide 0..255 values by 255, or map -1..1 values with (x + 1) / 2."
            )
        array = _to_uint8(array, lambda block: (np.clip(block, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    return PIL.Image.fromarray(np.ascontiguousarray(array))
