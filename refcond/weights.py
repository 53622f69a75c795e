"""Whose weights are whose, and whether they changed.

A component owns the weights it trains; it may also *borrow* pretrained weights it did not train
(a Qwen2-VL trunk, a CLIP vision model) and list them with an optional ``borrowed_weights()``
method returning :class:`refcond.BorrowedWeights`. This module holds the rules the core applies:

- borrowed weights inside a component's state dict are frozen when the composition is built;
- a checkpoint stores a component's own weights, and a borrowed part only once it is trained
  (a parameter requires grad when saving) or was loaded from a checkpoint that carried it; other
  borrowed parts are named by source and :func:`content_hash` instead;
- :func:`weights_fingerprint` tells cheaply whether weights may have changed (caches key on it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from refcond.contracts import BorrowedWeights
from refcond.errors import ConfigError

#: A Hugging Face cache snapshot folder: ``.../models--org--name/snapshots/<commit>``.
_HUB_CACHE = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<revision>[0-9a-f]{7,64})")


def borrowed_weights(component: Any, role: str = "component") -> list[BorrowedWeights]:
    """What ``component.borrowed_weights()`` declares (an empty list when it has no such method)."""
    method = getattr(component, "borrowed_weights", None)
    if method is None:
        return []
    declared = list(method())
    for item in declared:
        if not isinstance(item, BorrowedWeights) or not isinstance(item.module, torch.nn.Module):
            raise ConfigError(
                f"{role} {type(component).__name__}.borrowed_weights() must return refcond.BorrowedWeights "
                f"items holding a torch module, got {item!r}."
            )
    return declared


def under(key: str, prefix: str) -> bool:
    """Whether state-dict ``key`` lies under ``prefix`` (``""`` holds every key)."""
    return prefix == "" or key.startswith(prefix)


def is_trainable(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` requires grad."""
    return any(p.requires_grad for p in module.parameters())


def content_hash(module: torch.nn.Module) -> str:
    """SHA-256 of ``module``'s state dict: every key, dtype, shape and the tensor bytes, in key order.

    Identical weights give the same hash on any device; a different dtype gives another hash. It
    reads every byte once (about a second per 1.5 GB on one CPU core).
    """
    return tensors_hash(module.state_dict())


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: every name, dtype, shape and the tensor bytes, in name order (see :func:`content_hash`)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(tensors.items()):
        tensor = tensor.detach()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            raw = tensor.contiguous().cpu().reshape(-1).view(torch.uint8)
            digest.update(memoryview(raw.numpy()))
    return digest.hexdigest()


def describe_source(source: str | None) -> dict[str, str | None]:
    """``{"source": ..., "revision": ...}``: a hub id (with the commit) rather than a cache folder path."""
    if not source:
        return {"source": None, "revision": None}
    match = _HUB_CACHE.search(str(source))
    if match:
        return {"source": f"{match['org']}/{match['name']}", "revision": match["revision"]}
    return {"source": str(source), "revision": None}


#: Elements read from each tensor by :func:`weights_fingerprint` (evenly spaced).
PROBES_PER_TENSOR = 64
_optimizer_steps = 0
_counting_steps = False


def _count_optimizer_steps() -> None:
    """Count every optimizer step of the process (torch's public global step hook), once installed."""
    global _counting_steps
    if not _counting_steps:
        register_optimizer_step_post_hook(_on_optimizer_step)
        _counting_steps = True


def _on_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def weights_fingerprint(modules: Iterable[torch.nn.Module | None]) -> tuple[Any, ...]:
    """A cheap summary of the weights of ``modules`` that changes when they do; caches key on it.

    It covers every parameter and buffer: which parameter object holds it, on which device, in
    which dtype and shape (``.to()``, ``load_state_dict(assign=True)``); the values of
    :data:`PROBES_PER_TENSOR` evenly spaced elements of each (``load_state_dict``, an in-place edit
    of the whole tensor); and the number of optimizer steps taken in the process so far (training,
    whichever weights it moved). Not where a tensor's memory is: weights moved to another device and
    back (CPU offload moves them at every call) read the same as before.
    It reads a few elements per tensor, not all of them, so it costs microseconds per tensor even
    for a 2B-parameter model; an in-place edit of a few elements outside the probed ones, made
    without an optimizer, is not noticed (clear the cache by hand after such surgery).

    Returns ``(optimizer steps so far, tensor layout, probe digests)``; compare whole values.
    """
    _count_optimizer_steps()
    layout: list[Any] = []
    probes: dict[torch.device, list[torch.Tensor]] = {}
    with torch.no_grad():
        for module in modules:
            if module is None:
                layout.append(None)
                continue
            # A parameter keeps its object when .to() moves it and gets a new one from load_state_dict(assign=True);
            # buffers get new objects at every move, so their values (the probes) speak for them.
            tensors = [(name, id(p), p) for name, p in module.named_parameters()] + [(name, None, b) for name, b in module.named_buffers()]
            for name, identity, tensor in tensors:
                layout.append((name, identity, str(tensor.device), tensor.dtype, tuple(tensor.shape)))
                if tensor.numel():
                    flat = tensor.detach().reshape(-1)
                    sample = flat[:: max(1, flat.numel() // PROBES_PER_TENSOR)][:PROBES_PER_TENSOR]
                    # float64 keeps every float32/bfloat16/float16 value exact (mps has no float64)
                    probes.setdefault(tensor.device, []).append(sample.to(torch.float32 if tensor.device.type == "mps" else torch.float64))
    values = tuple(hashlib.sha256(torch.cat(parts).cpu().numpy().tobytes()).hexdigest() for _, parts in sorted(probes.items(), key=lambda kv: str(kv[0])))
    return (_optimizer_steps, tuple(layout), values)


def own_state_dict(component: Any, borrowed: Iterable[BorrowedWeights], carried: Iterable[str]) -> dict[str, torch.Tensor]:
    """``component.state_dict()`` without the borrowed parts that are neither trained nor carried.

    :param carried: prefixes of borrowed parts that were loaded from a checkpoint (fine-tuned copies).
    """
    state: Mapping[str, torch.Tensor] = component.state_dict()
    carried = set(carried)
    for part in borrowed:
        if part.prefix is None or part.prefix in carried or is_trainable(part.module):
            continue
        state = {key: value for key, value in state.items() if not under(key, part.prefix)}
    return dict(state)
