"""The few private names of torch, diffusers, PEFT and accelerate that refcond cannot do without.

refcond builds on the public APIs of these libraries. Where none does what refcond must do (put a
shared model back exactly as it was; run its own accelerate state beside a caller's), the private
name is used here and nowhere else: ``tests/test_compat.py`` fails on a private import from one of
these libraries anywhere else in the shipped code.

Each helper imports its library when called (importing refcond imports none of them), says which
private name it wraps and why no public API does the job, and raises :class:`LibraryVersionError`
(a :class:`~refcond.errors.RefcondError`) naming the library, its installed version and the version
refcond is tested with when the private name is gone. :data:`TESTED_VERSIONS` are those versions;
the README lists them too.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from refcond.errors import RefcondError

#: The library versions refcond's test suite runs with (the README's "Tested with").
TESTED_VERSIONS = {
    "torch": "2.13.0",
    "diffusers": "0.42.1",
    "transformers": "5.24.0",
    "peft": "0.21.2",
    "accelerate": "1.15.0",
}


class LibraryVersionError(RefcondError, RuntimeError):
    """An installed library lacks a private name refcond relies on: another version than the tested one.

    :ivar library: the distribution (``"accelerate"``).
    :ivar name: the private name that is missing (``"PartialState._shared_state"``).
    :ivar installed: its installed version (``"not installed"`` when it is not).
    :ivar tested: the version refcond is tested with.
    """

    def __init__(self, library: str, name: str, needed_for: str):
        self.library, self.name = library, name
        self.installed, self.tested = installed_version(library), TESTED_VERSIONS.get(library, "unknown")
        pin = f"pip install '{library}=={self.tested}'" if library in TESTED_VERSIONS else f"install another {library}"
        super().__init__(
            f"{needed_for} uses {library}'s internal {name}, which {library} {self.installed} does not have. "
            f"refcond is tested with {library} {self.tested}: install that version ({pin})."
        )


def installed_version(library: str) -> str:
    """The installed version of the distribution ``library``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# -- private instance attributes saved and put back ------------------------------------------------
#
# Loading, fusing or tuning a LoRA makes diffusers, transformers and PEFT set instance attributes on
# the models and the pipeline that no public API unsets. refcond records them before it loads
# anything and puts back exactly what it found (or removes them), so that detaching leaves the user's
# pipeline as it was. The private names are listed here, in one place; the public ones (``peft_config``,
# ``lora_scale``) are listed where they are used.

#: Set on a model (UNet, text encoders) while loading or fusing LoRA adapters: diffusers' and
#: transformers' ``_hf_peft_config_loaded`` (PEFT loaded), transformers 5's ``_weight_conversions``
#: (key renamings of the loaded checkpoint) and diffusers' ``_safe_fusing`` (``fuse_lora(safe_fusing=)``).
PEFT_MODEL_ATTRIBUTES = ("_hf_peft_config_loaded", "_weight_conversions", "_safe_fusing")
#: Set on a pipeline by diffusers' ``fuse_lora`` / ``unfuse_lora``: the set of fused adapters.
LORA_PIPELINE_ATTRIBUTES = ("_merged_adapters",)
#: A diffusers pipeline's progress-bar settings: ``set_progress_bar_config`` writes them, nothing
#: public reads them back.
PROGRESS_BAR_ATTRIBUTES = ("_progress_bar_config",)

_ABSENT = object()


def instance_attributes(obj: Any, names: Iterable[str]) -> dict[str, Any]:
    """The instance attributes ``names`` of ``obj`` (the objects themselves; a marker for absent ones)."""
    return {name: obj.__dict__.get(name, _ABSENT) for name in names}


def restore_instance_attributes(obj: Any, saved: Mapping[str, Any]) -> None:
    """Put back what :func:`instance_attributes` recorded: the same objects, and no attribute that was absent."""
    for name, value in saved.items():
        if value is _ABSENT:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = value


@contextmanager
def progress_bar_disabled(pipeline: Any) -> Iterator[None]:
    """Run a diffusers pipeline without its progress bar, and give it back its own settings after.

    The bar is switched off with the public ``set_progress_bar_config(disable=True)``; diffusers has no
    public getter for the settings it replaces, so they are saved and restored through the private
    ``DiffusionPipeline._progress_bar_config`` (:data:`PROGRESS_BAR_ATTRIBUTES`).

    :raises LibraryVersionError: ``set_progress_bar_config`` no longer stores ``_progress_bar_config``.
    """
    saved = instance_attributes(pipeline, PROGRESS_BAR_ATTRIBUTES)
    try:
        pipeline.set_progress_bar_config(disable=True)
        if not all(name in pipeline.__dict__ for name in PROGRESS_BAR_ATTRIBUTES):
            raise LibraryVersionError("diffusers", "DiffusionPipeline._progress_bar_config", "restoring a pipeline's progress-bar settings")
        yield
    finally:
        restore_instance_attributes(pipeline, saved)


# -- diffusers ---------------------------------------------------------------------------------


def lora_loadable_modules(pipeline: Any) -> list[str] | None:
    """The names of the components diffusers loads LoRA weights into for ``pipeline``'s class.

    Wraps diffusers' private class attribute ``LoraBaseMixin._lora_loadable_modules``
    (``["unet", "text_encoder"]`` for Stable Diffusion, plus ``"text_encoder_2"`` for SDXL): diffusers'
    own loaders read it, and no public method returns it (``get_list_adapters`` lists only components
    that already hold adapters).

    :returns: the list, or None when ``pipeline`` is no diffusers LoRA-loading pipeline.
    :raises LibraryVersionError: a LoRA-loading pipeline without ``_lora_loadable_modules``.
    """
    from diffusers.loaders.lora_base import LoraBaseMixin

    if not isinstance(pipeline, LoraBaseMixin):
        return None
    names = getattr(pipeline, "_lora_loadable_modules", None)
    if not isinstance(names, (list, tuple)):
        raise LibraryVersionError("diffusers", "LoraBaseMixin._lora_loadable_modules", "finding the components a LoRA file loads into")
    return list(names)


# -- accelerate ----------------------------------------------------------------------------------


@contextmanager
def separate_accelerate_state() -> Iterator[int]:
    """Let the block build its own ``accelerate.Accelerator``; give accelerate's process state back after.

    accelerate keeps one state per process, shared by every ``Accelerator`` (the Borg pattern in
    ``PartialState``, ``AcceleratorState`` and ``GradientState``), and refuses a second ``Accelerator``
    with another ``mixed_precision`` (or ``cpu``) while one exists. A library function that trains with
    its own settings must neither trip over its caller's state nor leave its own behind. accelerate 1.x
    has no public way to set the state aside or to reset it (its only reset, ``_reset_state``, is
    private and cannot restore), so this empties and refills the private ``_shared_state`` dicts of the
    three classes, in place.

    :returns: (as the ``with`` target) the number of processes of the caller's state, 1 when it has none:
        more than one means a distributed run, where a single-process Accelerator must not be built.
    :raises LibraryVersionError: accelerate's state classes have no ``_shared_state`` dict.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState

    states = (PartialState, AcceleratorState, GradientState)
    shared = []
    for state in states:
        values = getattr(state, "_shared_state", None)
        if not isinstance(values, dict):
            raise LibraryVersionError("accelerate", f"{state.__name__}._shared_state", "running a single-process Accelerator beside the caller's")
        shared.append(values)
    saved = [dict(values) for values in shared]
    for values in shared:
        values.clear()  # in place: with torch_xla, _shared_state is a descriptor that returns this dict
    try:
        yield int(saved[0].get("num_processes", 1))
    finally:
        for values, before in zip(shared, saved):
            values.clear()
            values.update(before)


# -- torch ---------------------------------------------------------------------------------------


def forward_hook_ids(module: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The ids of the forward pre-hooks and forward hooks registered on ``module``.

    Wraps torch's private ``Module._forward_pre_hooks`` / ``Module._forward_hooks``: torch returns a
    handle from ``register_forward_hook``, but has no public way to list the hooks a module holds, which
    a check that nothing was left behind needs.

    :raises LibraryVersionError: ``module`` has no such dicts.
    """
    pre, post = getattr(module, "_forward_pre_hooks", None), getattr(module, "_forward_hooks", None)
    if not isinstance(pre, Mapping) or not isinstance(post, Mapping):
        raise LibraryVersionError("torch", "Module._forward_pre_hooks / Module._forward_hooks", "listing a module's forward hooks")
    return tuple(pre), tuple(post)
