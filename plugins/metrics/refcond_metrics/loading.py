"""Where a metric's model comes from and where it runs: the options every metric shares, and one copy per model.

:class:`MetricModelConfig` holds the options of a metric that runs a pretrained model (device,
dtype, batch size); each metric adds its ``model`` field with its own default. :func:`load_model`
loads a model once per process and placement: two metrics built on the same checkpoint, device and
dtype (``clip-i`` and ``clip-t``) share one copy for as long as either is alive.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from refcond import BuildContext, ComponentConfig, ConfigError, DeviceName, check_device, load_pretrained

#: Config ``dtype`` names and the torch dtypes they stand for.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: The most images (or prompts) a config's ``batch_size`` may ask to run at once.
MAX_BATCH_SIZE = 4096


class MetricModelConfig(ComponentConfig):
    """Options shared by the metrics that run a pretrained model (subclasses add ``model``)."""

    device: DeviceName | None = Field(
        default=None,
        description="Device the model runs on, e.g. 'cuda', 'cuda:1', 'cpu'. None: the backbone's device when the metric is "
        "built with one (the evaluation run's), else 'cpu'.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32",
        description="Weights and activations dtype. float32 by default, as the published numbers were computed; cosines are "
        "always computed in float32.",
    )
    batch_size: int = Field(
        default=32,
        ge=1,
        le=MAX_BATCH_SIZE,
        description=f"Most images (or prompts) run through the model at once; at most {MAX_BATCH_SIZE}. Values do not depend on it.",
    )


def placement(config: MetricModelConfig, context: BuildContext, who: str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a metric's model runs in: the config's, or the backbone's device, or the CPU.

    :raises refcond.ConfigError: the config names a device this machine lacks.
    """
    if config.device is not None:
        check_device(config.device, f"{who}: config device")
        device = torch.device(config.device)
    elif context.backbone is not None:
        device = torch.device(context.backbone.device)
    else:
        device = torch.device("cpu")
    return device, DTYPES[config.dtype]


#: Loaded models by (class, source, device, dtype, options), kept while some metric holds them.
_LOADED: weakref.WeakValueDictionary[tuple[Any, ...], torch.nn.Module] = weakref.WeakValueDictionary()


def load_model(cls: Any, model: str, who: str, device: torch.device, dtype: torch.dtype, **kwargs: Any) -> torch.nn.Module:
    """``cls.from_pretrained(model)`` in ``dtype`` on ``device``, in eval mode, loaded once while it is in use.

    A second call with the same class, source (a folder is compared by its resolved path), device,
    dtype and keyword arguments returns the same model object as long as a metric built by the
    first still holds it. Errors are those of :func:`refcond.load_pretrained` (a
    :class:`refcond.ConfigError` naming ``who`` and the config field).
    """
    key = (cls, _source_key(model), str(device), dtype, tuple(sorted(kwargs.items())))
    loaded = _LOADED.get(key)
    if loaded is None:
        loaded = load_pretrained(cls, model, who, dtype=dtype, **kwargs)
        if not isinstance(loaded, torch.nn.Module):
            raise ConfigError(f"{who}: config model {model!r} loaded as a {type(loaded).__name__}, not a torch model.")
        loaded = loaded.to(device).eval()
        _LOADED[key] = loaded
    return loaded


def _source_key(model: str) -> str:
    try:
        path = Path(model).expanduser()
        return str(path.resolve()) if path.is_dir() else model
    except (OSError, RuntimeError):  # a name too long for a path: load_pretrained reports it
        return model
