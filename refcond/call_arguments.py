"""Checking a generation call's arguments before anything runs: refcond's own, and diffusers' rules.

:meth:`refcond.RefcondPipeline.__call__` passes its arguments here first, so a bad one is a
:class:`refcond.ConfigError` naming the argument — not a torch or diffusers error from deep inside
the denoising loop, and not a silently black image.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from refcond.aggregators import MAX_WEIGHT
from refcond.errors import ConfigError, did_you_mean

#: The most images one prompt may ask for in one call.
MAX_IMAGES_PER_PROMPT = 1024
#: The most denoising steps one call may ask for.
MAX_INFERENCE_STEPS = 10_000
#: Reference weights are relative: their magnitude is bounded so that weighted sums of features stay
#: finite in float16 (the weighted-mean aggregator's bound on the weights in its config).
MAX_REFERENCE_WEIGHT = MAX_WEIGHT
#: Keyword arguments diffusers' pipelines still take through ``**kwargs``, with a deprecation warning.
DEPRECATED_KEYWORDS = ("callback", "callback_steps")
#: diffusers' output types.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def prompt_batch(prompt: Any, kwargs: Mapping[str, Any]) -> int:
    """How many prompts the call has (a string, a non-empty list of strings, or ``prompt_embeds``)."""
    if prompt is None:
        embeds = kwargs.get("prompt_embeds")
        if isinstance(embeds, torch.Tensor) and embeds.ndim == 3:
            return int(embeds.shape[0])
        raise ConfigError("pass a prompt (a string or a list of strings), or prompt_embeds ([batch, tokens, dim]).")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ConfigError("prompt is an empty list: pass one string per image to generate.")
        bad = [i for i, p in enumerate(prompt) if not isinstance(p, str)]
        if bad:
            raise ConfigError(f"prompt[{bad[0]}] is a {type(prompt[bad[0]]).__name__}, not a string: a prompt list holds strings only.")
        return len(prompt)
    raise ConfigError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}.")


def check_call(
    pipeline: Any,
    *,
    prompt: Any,
    negative_prompt: Any,
    num_images_per_prompt: Any,
    num_inference_steps: Any,
    guidance_scale: Any,
    generator: Any,
    output_type: Any,
    kwargs: Mapping[str, Any],
) -> int:
    """Check a call's arguments against refcond's and the diffusers pipeline's rules; returns the number of prompts.

    diffusers' rules are its pipeline's own ``check_inputs``, run here with its errors turned into
    :class:`refcond.ConfigError`, plus what diffusers checks later (negative prompts per prompt,
    one generator per image, the output type).
    """
    batch = prompt_batch(prompt, kwargs)
    _check_keywords(pipeline, kwargs)
    _check_count("num_images_per_prompt", num_images_per_prompt, 1, MAX_IMAGES_PER_PROMPT)
    if num_inference_steps is not None:
        _check_count("num_inference_steps", num_inference_steps, 1, MAX_INFERENCE_STEPS)
    if guidance_scale is not None:
        finite_number("guidance_scale", guidance_scale)
    if negative_prompt is not None:
        if isinstance(negative_prompt, (list, tuple)):
            bad = [i for i, p in enumerate(negative_prompt) if not isinstance(p, str)]
            if bad:
                raise ConfigError(f"negative_prompt[{bad[0]}] is a {type(negative_prompt[bad[0]]).__name__}, not a string.")
            if len(negative_prompt) != batch:
                raise ConfigError(
                    f"negative_prompt has {len(negative_prompt)} entries for {batch} prompt(s): give one string for all, or one per prompt."
                )
        elif not isinstance(negative_prompt, str):
            raise ConfigError(f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}.")
    if isinstance(generator, (list, tuple)):
        images = batch * int(num_images_per_prompt)
        if len(generator) != images or not all(isinstance(g, torch.Generator) for g in generator):
            raise ConfigError(f"generator is a list of {len(generator)}: give one torch.Generator, or a list of {images} (one per image).")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator (or a list, one per image), got {type(generator).__name__}.")
    if output_type is not None and output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output_type {output_type!r} is not one of {', '.join(map(repr, OUTPUT_TYPES))}.")
    _diffusers_check_inputs(pipeline, prompt, negative_prompt, kwargs)
    return batch


def finite_number(name: str, value: Any) -> float:
    """``value`` as a float, refusing what is not a real number or not finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r}.")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {number}.")
    return number


def reference_weight_rows(weights: Any) -> list[Any] | None:
    """``reference_weights`` as plain lists (a tensor or array becomes its nested list), refusing what is no list."""
    if weights is None:
        return None
    if isinstance(weights, (torch.Tensor, np.ndarray)):
        if weights.ndim == 0:
            raise ConfigError("reference_weights is a scalar: give one weight per reference, e.g. [1.0, 0.5].")
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ConfigError(f"reference_weights must be a list of numbers (one per reference) or one such list per group, got {weights!r}.")
    return list(weights)


def check_weights(row: Sequence[Any], group: int) -> list[float]:
    """One group's weights as floats: real, finite, within :data:`MAX_REFERENCE_WEIGHT` in magnitude."""
    out = []
    for i, value in enumerate(row):
        number = finite_number(f"reference_weights for group {group}, reference {i}", value)
        if abs(number) > MAX_REFERENCE_WEIGHT:
            raise ConfigError(
                f"reference_weights for group {group}, reference {i} is {number:g}; weights are relative, so keep them within "
                f"±{MAX_REFERENCE_WEIGHT:g} (divide them all by the largest)."
            )
        out.append(number)
    return out


def _check_count(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}.")
    if not low <= int(value) <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}.")


def _check_keywords(pipeline: Any, kwargs: Mapping[str, Any]) -> None:
    """Extra keyword arguments must be ones the diffusers pipeline's ``__call__`` takes."""
    parameters = inspect.signature(type(pipeline).__call__).parameters
    # diffusers' pipelines take **kwargs only for deprecated callbacks and ignore other names silently: a typo would change nothing.
    named = {name for name, p in parameters.items() if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    unknown = sorted(set(kwargs) - named - set(DEPRECATED_KEYWORDS))
    if unknown:
        raise ConfigError(
            f"{type(pipeline).__name__} takes no argument {unknown[0]!r}.{did_you_mean(unknown[0], named)} "
            "Pass refcond's own arguments (references, reference_scale, reference_weights, reference_captions) and the diffusers pipeline's."
        )


def _diffusers_check_inputs(pipeline: Any, prompt: Any, negative_prompt: Any, kwargs: Mapping[str, Any]) -> None:
    """Run the pipeline's own ``check_inputs`` with the call's values (and diffusers' default size)."""
    check = getattr(pipeline, "check_inputs", None)
    if not callable(check):
        return
    unet, scale = pipeline.unet, getattr(pipeline, "vae_scale_factor", 8)
    size = unet.config.sample_size * scale
    for name in ("height", "width"):
        value = kwargs.get(name)
        if value is not None:
            _check_count(name, value, 8, 1 << 16)
    values = {
        "prompt": list(prompt) if isinstance(prompt, tuple) else prompt,
        "negative_prompt": list(negative_prompt) if isinstance(negative_prompt, tuple) else negative_prompt,
        "height": kwargs.get("height") or size,
        "width": kwargs.get("width") or size,
        "callback_steps": None,
        **{k: v for k, v in kwargs.items() if k not in ("height", "width")},
    }
    parameters = inspect.signature(check).parameters
    try:
        check(**{name: values.get(name) for name in parameters if name in values or parameters[name].default is inspect.Parameter.empty})
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{type(pipeline).__name__} refuses these arguments: {exc}") from None
