"""Writing files atomically: a temporary file in the target folder, then a rename.

Every file refcond writes (checkpoints, images, reports) goes through :func:`atomic_write`, so an
interrupted run never leaves a truncated file behind and a reader never sees a half-written one.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import PIL.Image

from refcond.errors import ConfigError, OutputError


def image_format(path: str | Path) -> str:
    """The Pillow format name that a file name's suffix selects (``out.png`` -> ``PNG``).

    Called before any model is loaded, so a bad output name fails in a second, not after generating.
    """
    suffix = Path(path).suffix.lower()
    formats = PIL.Image.registered_extensions()
    if suffix not in formats:
        common = ", ".join(s for s in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff") if s in formats)
        raise ConfigError(
            f"cannot tell the image format of output {str(path)!r} from its suffix {suffix or '(none)'!r}. Use one of {common}."
        )
    if formats[suffix].upper() not in PIL.Image.SAVE:  # registered_extensions() has loaded every plugin
        raise ConfigError(f"Pillow can read but not write {formats[suffix]} files ({str(path)!r}); use .png or .jpg.")
    return formats[suffix]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    Parent folders are created. The old file, if any, stays intact when ``write`` fails; an
    :class:`OSError` becomes an :class:`OutputError` naming the path.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        # Some writers (safetensors) create private 0600 files: give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def write_image(path: str | Path, image: PIL.Image.Image) -> Path:
    """Save ``image`` to ``path`` (format from the suffix), creating parent folders; returns the path."""
    path = Path(path)
    fmt = image_format(path)
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented, key-sorted UTF-8 JSON with a final newline; returns the path."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
