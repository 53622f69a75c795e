"""Reading reference images: paths, PIL images, numpy arrays or tensors, normalised to RGB PIL."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from refcond.errors import ReferenceImageError

ReferenceInput = str | Path | PIL.Image.Image | np.ndarray | torch.Tensor


def load_references(references: ReferenceInput | Sequence[ReferenceInput] | None) -> list[PIL.Image.Image]:
    """Load one reference group as RGB PIL images.

    Accepts file paths, PIL images, ``HxW``/``HxWxC`` uint8 or float (0..1) arrays and ``CxHxW``
    tensors. Grayscale, palette, RGBA (composited onto white) and 16-bit images are converted.
    """
    if references is None:
        raise ReferenceImageError(_NO_REFERENCES)
    if not isinstance(references, (list, tuple)):  # one image (any other object is reported as unsupported)
        references = [references]
    images = [load_reference(item, index) for index, item in enumerate(references)]
    if not images:
        raise ReferenceImageError(_NO_REFERENCES)
    return images


_NO_REFERENCES = (
    "no reference images given: pass references=[image, ...] with at least one image "
    "(a file path, a PIL image, or an HxWxC array)."
)


def load_reference(item: ReferenceInput, index: int = 0) -> PIL.Image.Image:
    """Load one reference; ``index`` is its position in the group, used in error messages."""
    where = f"reference {index}"
    if isinstance(item, (str, Path)):
        path = Path(item)
        where = f"reference {index} ({str(path)!r})"
        if not path.exists():
            raise ReferenceImageError(f"{where}: file not found. Check the path, or pass a PIL image instead.")
        if path.is_dir():
            raise ReferenceImageError(f"{where}: is a folder, not an image file. Pass the image files inside it.")
        try:
            with PIL.Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
            raise ReferenceImageError(
                f"{where}: not a readable image ({type(exc).__name__}: {exc}). "
                "Pass a PNG, JPEG, WebP or other format that Pillow opens."
            ) from None
    elif isinstance(item, PIL.Image.Image):
        image = item
    elif isinstance(item, torch.Tensor):
        tensor = item.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # numpy has no bfloat16
        image = _from_array(tensor.numpy(), where, channels_first=True)
    elif isinstance(item, np.ndarray):
        image = _from_array(item, where, channels_first=False)
    else:
        raise ReferenceImageError(
            f"{where}: unsupported type {type(item).__name__}; pass a file path, a PIL image, a numpy array or a tensor."
        )
    return to_rgb(image)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit and float modes are rescaled, alpha is composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        if image.mode == "F" and values.max() <= 1.0:
            top = 1.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


#: Rounding noise tolerated outside [0, 1] in float images (e.g. from a VAE decode).
_FLOAT_SLACK = 1e-3


def _from_array(array: np.ndarray, where: str, channels_first: bool) -> PIL.Image.Image:
    if array.ndim == 3 and channels_first and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ReferenceImageError(
            f"{where}: an image array must be HxW, HxWx3 or HxWx4 (or CxHxW for tensors), got shape {array.shape}."
        )
    if array.dtype == np.uint16:
        array = (array.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ReferenceImageError(f"{where}: the array contains NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < -_FLOAT_SLACK or high > 1.0 + _FLOAT_SLACK:
            raise ReferenceImageError(
                f"{where}: float image values must lie in [0, 1], got [{low:g}, {high:g}]. "
                "Divide 0..255 values by 255, or map -1..1 values with (x + 1) / 2."
            )
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ReferenceImageError(f"{where}: unsupported array dtype {array.dtype}; use uint8, uint16 or float in [0, 1].")
    return PIL.Image.fromarray(np.ascontiguousarray(array))
