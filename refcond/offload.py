"""CPU offload of refcond's own modules, beside diffusers' ``enable_model_cpu_offload``.

diffusers offloads the modules of its pipeline (text encoders, UNet, VAE) with accelerate's
:func:`accelerate.cpu_offload_with_hook`: a module moves to the accelerator when its ``forward`` runs
and back to the CPU when the next model of the chain starts. refcond's encoder, aggregator and
injectors live outside the pipeline, and the encoder is not run through ``forward`` (an encoder is
called through ``encode``), so :class:`ModelOffload` moves them itself: each role's modules go to the
execution device for the stretch of code that runs them and back to the CPU at its end, before the
UNet runs. They carry accelerate's hook all the same, so a direct ``forward`` call (an aggregator
called by hand) moves its module too, exactly as a diffusers component.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

CPU = torch.device("cpu")


def execution_device(gpu_id: int | None, device: torch.device | str | None) -> torch.device:
    """The device diffusers' ``enable_model_cpu_offload(gpu_id, device)`` runs models on: ``<type>:<index>``."""
    if device is None:
        from diffusers.utils.torch_utils import get_device

        device = get_device()
    parsed = torch.device(device)
    return torch.device(f"{parsed.type}:{gpu_id or parsed.index or 0}")


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's first parameter (or buffer) is; the CPU for a module without tensors."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return CPU


class ModelOffload:
    """refcond's modules, by role, kept on the CPU and on ``device`` only while :meth:`onloaded` runs them.

    :param modules: role -> the modules that role runs (each with at least one parameter).
    :param device: the execution device.
    :param home: module id -> the device to put it back on when the hooks are removed
        (:meth:`remove` with ``restore=True``); defaults to where each module is now.
    """

    def __init__(self, modules: Mapping[str, Sequence[torch.nn.Module]], device: torch.device, home: Mapping[int, torch.device] | None = None):
        from accelerate import cpu_offload_with_hook

        self.device = device
        # Tensors on the CPU report "cpu", never "cpu:0" (diffusers' name for a CPU execution device, which tests use):
        # the hook compares the two, and would copy the weights again at every forward.
        hook_device = CPU if device.type == "cpu" else device
        self.home = dict(home or {})
        self.hooks: dict[str, list[Any]] = {}
        for role, group in modules.items():
            for module in group:
                self.home.setdefault(id(module), module_device(module))
            with torch.inference_mode(False):  # the hook moves the module to the CPU: see _move
                self.hooks[role] = [cpu_offload_with_hook(module, hook_device)[1] for module in group]

    @contextmanager
    def onloaded(self, role: str) -> Iterator[None]:
        """Run a block with ``role``'s modules on the execution device; they are back on the CPU after it, even if it raises."""
        hooks = self.hooks.get(role, [])
        try:
            _move([hook.model for hook in hooks], self.device)
            yield
        finally:
            with torch.inference_mode(False):  # see _move
                for hook in hooks:
                    hook.offload()
            if hooks and self.device.type != "cpu":  # hand the freed memory back, as accelerate does between models
                from diffusers.utils.torch_utils import empty_device_cache

                empty_device_cache(self.device.type)

    def remove(self, restore: bool) -> None:
        """Remove the hooks; ``restore``: put every module back where it was before offloading (else leave it on the CPU)."""
        for hooks in self.hooks.values():
            for hook in hooks:
                hook.remove()
                if restore:
                    _move([hook.model], self.home[id(hook.model)])
        self.hooks = {}


def _move(modules: Sequence[torch.nn.Module], device: torch.device) -> None:
    # Outside inference mode: a parameter moved there would become an inference tensor, which a later
    # load_state_dict or training step may not touch.
    with torch.inference_mode(False):
        for module in modules:
            module.to(device)
