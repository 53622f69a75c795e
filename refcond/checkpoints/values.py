"""What every checkpoint's tensors must be before refcond converts or loads them, whatever their format.

:func:`check_tensors` runs once per file, on the tensors as the file names them (so a message names
the file's own key), before any format plugin sees them. It refuses:

- keys that are not weight names: empty, longer than :data:`MAX_KEY_LENGTH`, or holding control
  characters;
- values that are not plain tensors: other objects, sparse or meta tensors, complex numbers (no
  component holds complex weights);
- tensors without values (a zero-sized dimension): no trained weight is empty, and a size an importer
  reads from such a shape (a token count, a LoRA rank) would claim memory the file does not back;
- non-finite values (NaN, inf): they make every image NaN;
- huge values: finite floating-point values beyond :data:`MAX_MAGNITUDE`, float16's largest finite
  value (65504), whatever the file's dtype. Loaded into a float16 pipeline such a value becomes inf;
  in a float32 one it overflows the activations (a LayerNorm's variance) into NaN. No trained weight
  of the supported formats comes near it.

Integer and bool tensors are left to the loader, which compares their kind with the parameter they
load into (:func:`refcond.check_state_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from refcond.errors import CheckpointError

#: The largest magnitude a floating-point weight may have: float16's largest finite value.
MAX_MAGNITUDE = float(torch.finfo(torch.float16).max)
#: The longest key a checkpoint may hold (real ones are under 200 characters).
MAX_KEY_LENGTH = 1000
#: Problems listed in one message; the rest are counted.
_SHOWN = 10


def check_tensors(tensors: Mapping[Any, Any], where: str) -> None:
    """Raise :class:`CheckpointError` naming ``where`` and every bad key of ``tensors`` (see the module docstring)."""
    problems: list[str] = []
    for key, value in tensors.items():
        problem = _key_problem(key) or _tensor_problem(value)
        if problem is not None:
            problems.append(f"key {_show_key(key)}: {problem}")
    if problems:
        shown = problems[:_SHOWN] + ([f"... and {len(problems) - _SHOWN} more"] if len(problems) > _SHOWN else [])
        raise CheckpointError(
            f"{where}: the checkpoint holds tensors refcond cannot load:\n  - "
            + "\n  - ".join(shown)
            + "\nThe file is corrupt, or was saved from a diverged or broken training run: download or export it again."
        )


def _key_problem(key: Any) -> str | None:
    if not isinstance(key, str):
        return f"the key is a {type(key).__name__}, not a string"
    if not key:
        return "the key is empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"the key is {len(key)} characters long (weight names are under {MAX_KEY_LENGTH})"
    if not key.isprintable():
        return "the key holds control characters"
    return None


def _tensor_problem(value: Any) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"holds a {type(value).__name__}, not a tensor"
    if value.layout != torch.strided:
        return f"holds a {value.layout} tensor; checkpoints hold dense tensors"
    if value.is_meta:
        return "holds a tensor without data (on the meta device)"
    if value.is_complex():
        return f"holds complex numbers ({_dtype(value)}); refcond's components hold real-valued weights"
    if 0 in value.shape:
        return f"holds no values (shape {tuple(value.shape)}); a weight has at least one value in every dimension"
    if not value.is_floating_point():
        return None
    low, high = _extremes(value)
    if low != low or high != high:  # NaN
        count = int(torch.isnan(value).sum())
        return f"holds NaN ({count} of {value.numel()} values, {_dtype(value)})"
    if abs(low) == float("inf") or abs(high) == float("inf"):
        count = int(torch.isinf(value).sum())
        return f"holds inf ({count} of {value.numel()} values, {_dtype(value)})"
    largest = max(abs(low), abs(high))
    if largest > MAX_MAGNITUDE:
        return (
            f"holds values as large as {largest:.4g} in magnitude ({_dtype(value)}), beyond {MAX_MAGNITUDE:g} (float16's largest "
            "finite value): they become inf in a float16 pipeline and overflow to NaN in a float32 one"
        )
    return None


def _extremes(value: torch.Tensor) -> tuple[float, float]:
    """Smallest and largest value in one pass, without a copy (NaN if any value is NaN)."""
    try:
        low, high = torch.aminmax(value.detach())
    except (RuntimeError, NotImplementedError):  # dtypes aminmax does not reduce (float8): widen first
        low, high = torch.aminmax(value.detach().float())
    return float(low), float(high)


def _dtype(value: torch.Tensor) -> str:
    return str(value.dtype).removeprefix("torch.")


def _show_key(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 120 else f"{text[:100]}...' ({len(key)} characters)"
