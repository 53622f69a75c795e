"""The user-facing pipeline: a diffusers pipeline whose UNet reads a group of reference images."""

from __future__ import annotations

import hashlib
import importlib.metadata
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from refcond.building import Built, build, has_weights, roles
from refcond.call_arguments import check_call, check_weights, reference_weight_rows
from refcond.checkpoints.io import write_safetensors
from refcond.checkpoints.native import metadata_for
from refcond.config import Composition
from refcond.contracts import Condition, ReferenceAdapter
from refcond.errors import ConfigError, RefcondError, ReferenceImageError
from refcond.images import ReferenceInput, load_references
from refcond.offload import ModelOffload, execution_device
from refcond.plugins import Plugins, get_plugins
from refcond.unet import layer_scales
from refcond.weights import borrowed_weights, content_hash, describe_source, is_trainable, own_state_dict, weights_fingerprint

_CACHE_SIZE = 8


class RefcondPipeline:
    """A diffusers Stable Diffusion pipeline conditioned on reference images.

    Create one with :func:`refcond.from_pipe` or :func:`refcond.load`. Calling it takes the
    diffusers pipeline's own arguments plus ``references``; :meth:`detach` restores the pipeline.

    The components are exposed by role (``encoder``, ``aggregator``, ``injectors``) and their
    parameters by :meth:`named_parameters`, so training code selects what trains by role. With a
    component in training mode (:meth:`train`), :meth:`encode` keeps the autograd graph and
    :meth:`bind` feeds the condition to one UNet forward pass: a training loop needs nothing else.
    Encoded conditions are cached by reference content (and prompt, for encoders that read it),
    so a second prompt over the same references skips the encoder; the cache notices weight
    changes and is bypassed in training mode.
    """

    def __init__(self, built: Built, plugins: Plugins):
        self.composition: Composition = built.composition
        self.backbone = built.backbone
        self.encoder = built.encoder
        self.aggregator = built.aggregator
        self.injectors = built.injectors
        self.plugins = plugins
        self.pipeline = built.backbone.pipeline
        self._entries = dict(built.entries)
        self._carried = {role: set(prefixes) for role, prefixes in built.carried.items()}
        self._attachments: list[Any] = []
        self._offload: ModelOffload | None = None  # refcond's part of CPU offload (enable_model_cpu_offload)
        try:
            for injector in self.injectors:
                self._attachments.append(injector.attach(self.pipeline.unet))
        except BaseException:  # leave the pipeline as it was: undo the injectors already attached
            self.detach()
            raise
        self._cache: OrderedDict[tuple[Any, ...], tuple[Condition, Condition]] = OrderedDict()
        #: How many encoded conditions (one per distinct call) are kept; raise it to reuse the encodings
        #: of many reference groups across calls, as an ablation's cells that share this pipeline do.
        self.cache_size = _CACHE_SIZE
        self._content_hashes: dict[int, tuple[tuple[Any, ...], str]] = {}

    # -- training -------------------------------------------------------------------------------

    @property
    def training(self) -> bool:
        """Whether any component is in training mode (``module.training``)."""
        return any(getattr(component, "training", False) for component in self.components().values())

    def train(self, mode: bool = True) -> RefcondPipeline:
        """Put every component that has a training mode into it (``mode=False``: back to eval); returns self.

        Only refcond's components change mode: the pipeline's UNet, VAE and text encoders are yours
        (call ``pipe.unet.train()`` too if your loop needs its dropout).
        """
        for component in self.components().values():
            if callable(getattr(component, "train", None)):
                component.train(mode)
        return self

    def eval(self) -> RefcondPipeline:
        """``train(False)``."""
        return self.train(False)

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(role.name, parameter)`` for every parameter of every component, named as in checkpoints.

        Frozen ones included (check ``requires_grad``); an injector that keeps its weights inside the
        UNet while attached (the ``lora`` injector's layers) yields those live parameters.
        """
        for role, component in self.components().items():
            named = getattr(component, "named_parameters", None)
            if callable(named):
                for name, parameter in named():
                    yield f"{role}.{name}", parameter

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Every parameter of :meth:`named_parameters`."""
        for _, parameter in self.named_parameters():
            yield parameter

    # -- conditioning -------------------------------------------------------------------------

    def encode(
        self,
        references: Sequence[Sequence[ReferenceInput]],
        reference_weights: Sequence[Sequence[float]] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> tuple[Condition, Condition]:
        """Encode and aggregate a batch of reference groups.

        In inference (every component in eval mode) this runs under ``torch.inference_mode`` and
        results are cached; with a component in training mode it runs with autograd as the caller
        has it (so gradients reach the encoder's and aggregator's trainable parameters) and bypasses
        the cache.

        :param reference_weights: one list of weights per group (as long as the group), for
            weighting aggregators (``weighted-mean``).
        :param prompts: one prompt per group, for an encoder that reads the prompt with the
            references (``reads_prompt``, e.g. ``mllm``); other encoders ignore them.
        :returns: ``(condition, unconditional)``, each with one row per group; ``unconditional`` is
            what the negative branch of classifier-free guidance reads.
        """
        if self.encoder is None or self.aggregator is None:
            raise ConfigError(
                f"composition {self.composition.name or '(unnamed)'!r} has no encoder: its injectors "
                f"({', '.join(s.name for s in self.composition.injectors)}) read no encoded condition."
            )
        several = len(references) > 1
        groups = [load_references(group, group=b if several else None) for b, group in enumerate(references)]
        weights = _weights_tensor(reference_weights, [len(group) for group in groups])
        prompts = _encoder_prompts(self.encoder, prompts, len(groups))
        if self.training:
            self._cache.clear()  # weights are changing: nothing cached before stays valid
            return self._encode(groups, weights, prompts)
        key = (
            tuple(tuple(_digest(img) for img in group) for group in groups),
            None if weights is None else tuple(weights.flatten().tolist()),
            prompts,
            self._weights_fingerprint(),
        )
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with torch.inference_mode():
            result = self._encode(groups, weights, prompts)
        self._cache[key] = result
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def _encode(self, groups: list[list[PIL.Image.Image]], weights: torch.Tensor | None, prompts: tuple[str, ...] | None) -> tuple[Condition, Condition]:
        assert self.encoder is not None and self.aggregator is not None
        with self._onloaded("encoder"):
            encoding = self.encoder.encode(groups) if prompts is None else self.encoder.encode(groups, prompts=list(prompts))
            unconditional = self.encoder.encode_unconditional(encoding, groups)
        with self._onloaded("aggregator"):
            return self.aggregator(encoding, weights), self.aggregator(unconditional, weights)

    def _weights_fingerprint(self) -> tuple[Any, ...]:
        """What the cached conditions depend on: the encoder's and aggregator's weights, borrowed ones included."""
        modules: list[torch.nn.Module | None] = []
        for role in ("encoder", "aggregator"):
            component = getattr(self, role)
            modules.append(component if isinstance(component, torch.nn.Module) else None)
            modules.extend(part.module for part in borrowed_weights(component, role) if part.prefix is None)
        return weights_fingerprint(modules)

    def clear_cache(self) -> None:
        """Forget cached conditions (weight changes are noticed without it; see :func:`refcond.weights_fingerprint`)."""
        self._cache.clear()

    @contextmanager
    def bind(
        self,
        condition: Condition | None,
        unconditional: Condition | None = None,
        reference_scale: float | Mapping[str, Any] = 1.0,
    ) -> Iterator[None]:
        """Feed a condition to the UNet for the duration of a ``with`` block: the training-loop way in.

        Every injector binds it (projecting it and computing each layer's keys and values once);
        UNet forward passes inside the block read it, and nothing stays bound after it. Autograd is
        as the caller has it, so a loss on the UNet's output reaches the injectors' parameters.

        :param condition: what :meth:`encode` returned (one row per UNet batch row, or per
            conditional row under classifier-free guidance); ``None`` for compositions without
            an encoder.
        :param unconditional: the condition of the negative rows of a classifier-free-guidance batch
            ``[negative; positive]``; ``None`` when the batch has only positive rows.
        :param reference_scale: a number or a per-block dict (:func:`refcond.layer_scales`).
        """
        self._check_attached()
        check_reference_scale(self.backbone.unet, reference_scale)
        for name, value in (("condition", condition), ("unconditional", unconditional)):
            if value is not None and not isinstance(value, Condition):
                raise ConfigError(f"bind(): {name} must be a refcond.Condition (what rp.encode returns) or None, got {type(value).__name__}.")
        if unconditional is not None and condition is None:
            raise ConfigError("bind(): an unconditional condition needs the condition it pairs with; pass both, or neither.")
        with ExitStack() as stack:
            with self._onloaded("injectors"):  # binding projects the condition; the UNet steps need only the result
                for attachment in self._attachments:
                    stack.enter_context(attachment.condition(condition, unconditional, reference_scale))
            yield

    # -- generation ---------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        references: Sequence[ReferenceInput] | Sequence[Sequence[ReferenceInput]] | ReferenceInput | None = None,
        *,
        reference_scale: float | dict[str, Any] = 1.0,
        reference_weights: Sequence[float] | Sequence[Sequence[float]] | None = None,
        reference_captions: Sequence[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str | None = None,
        **pipeline_kwargs: Any,
    ) -> Any:
        """Generate images conditioned on ``prompt`` and the reference group(s).

        :param references: one group of images (paths, PIL images or arrays) for every prompt, or a
            list with one group per prompt.
        :param reference_scale: strength of the reference condition: a finite number (negative
            values push away from the references), or a per-block dict as in InstantStyle
            (``{"up": {"block_0": [0.0, 1.0, 0.0]}}``; unlisted blocks get 0).
        :param reference_weights: per-reference weights for weighting aggregators (``weighted-mean``):
            one list for every group, or one list per group.
        :param reference_captions: one caption per reference, for injectors that learn from the
            references themselves (``lora-tuning``); others ignore them.
        :param pipeline_kwargs: any other argument of the diffusers pipeline's ``__call__``
            (``height``, ``width``, ``latents``, ``callback_on_step_end``, ...).
        :returns: the diffusers pipeline's output (``.images``).

        Arguments left as ``None`` keep the diffusers pipeline's defaults.
        """
        self._check_attached()
        check_reference_scale(self.backbone.unet, reference_scale)
        if prompt is None and getattr(self.encoder, "reads_prompt", False):
            raise ConfigError("this composition's encoder reads the prompt with the references: pass prompt as text, not prompt_embeds.")
        batch = check_call(
            self.pipeline,
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type=output_type,
            kwargs=pipeline_kwargs,
        )
        prompt = list(prompt) if isinstance(prompt, tuple) else prompt  # diffusers takes lists
        negative_prompt = list(negative_prompt) if isinstance(negative_prompt, tuple) else negative_prompt
        adapters = [a for a in self._attachments if isinstance(a, ReferenceAdapter)]
        condition: Condition | None = None
        unconditional: Condition | None = None
        if self.encoder is not None or references is not None:
            groups, weights = _as_groups(references, reference_weights)
            if len(groups) not in (1, batch):
                raise ReferenceImageError(
                    f"got {len(groups)} reference groups for {batch} prompts: pass one group for all prompts, or one per prompt."
                )
            if adapters:
                if len(groups) != 1:
                    raise ReferenceImageError("an injector that learns from the references takes one group for all prompts.")
                for adapter in adapters:
                    adapter.adapt(load_references(groups[0]), reference_captions)
            elif self.encoder is None:
                raise ReferenceImageError(
                    "this composition has no encoder and no injector that learns from references: call it without references=."
                )
            if self.encoder is not None:
                prompts = None
                if getattr(self.encoder, "reads_prompt", False):
                    prompts = _prompt_list(prompt, batch)
                    if len(groups) == 1 and batch > 1:  # each prompt reads the group with its own text
                        groups, weights = groups * batch, None if weights is None else weights * batch
                with torch.no_grad():  # generating, even while components train (validation images)
                    condition, unconditional = self.encode(groups, weights, prompts)
                repeat = num_images_per_prompt * (batch if len(groups) == 1 else 1)
                condition, unconditional = condition.repeat_interleave(repeat), unconditional.repeat_interleave(repeat)

        call_kwargs = dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type=output_type,
        )
        call_kwargs = {k: v for k, v in call_kwargs.items() if v is not None}
        # Generation is inference: the per-call projections must not build an autograd graph that
        # lives through every denoising step (diffusers' own __call__ runs under no_grad too).
        with torch.no_grad(), self.bind(condition, unconditional, reference_scale):
            return self.pipeline(num_images_per_prompt=num_images_per_prompt, **call_kwargs, **pipeline_kwargs)

    # -- memory -------------------------------------------------------------------------------

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep every model on the CPU, each moved to the accelerator only while it runs: diffusers' switch, refcond's parts included.

        Calls the diffusers pipeline's own ``enable_model_cpu_offload(gpu_id, device)`` (same arguments
        and defaults: the accelerator found, index 0), then offloads refcond's modules the same way
        (accelerate's ``cpu_offload_with_hook``): the encoder and the aggregator are on the device only
        while :meth:`encode` runs them, each in turn; injector modules kept outside the UNet (the
        cross-attention injector's projector and image keys/values) only while :meth:`bind` projects the
        condition. All of them are back on the CPU before the UNet's first step, and the images are
        those generated without offload. Modules that are the pipeline's own (the ``clip`` encoder's
        ``image_encoder``) or share weights with it (LoRA layers in the UNet) move with diffusers' hooks.

        For generation: with a component in training mode and autograd on, :meth:`encode` and
        :meth:`bind` refuse to run. Undo with :meth:`remove_all_hooks`.
        """
        self._check_attached()
        self.pipeline.enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        self._offload_own_modules(execution_device(gpu_id, device))

    def remove_all_hooks(self) -> None:
        """Undo CPU offload: the pipeline's ``remove_all_hooks()`` (its models stay on the CPU, as diffusers leaves them:
        ``pipe.to(device)`` moves them), and refcond's modules go back to the devices they were on before offloading."""
        self.pipeline.remove_all_hooks()
        if self._offload is not None:
            self._offload.remove(restore=True)
            self._offload = None

    def _offload_own_modules(self, device: torch.device) -> None:
        home = None
        if self._offload is not None:  # offloaded already: keep where the modules were before the first time
            home = self._offload.home
            self._offload.remove(restore=False)
        self._offload = ModelOffload(self._own_modules(), device, home)

    def _own_modules(self) -> dict[str, list[torch.nn.Module]]:
        """The modules each role runs that diffusers' offload does not reach: outside the pipeline, with weights, none shared with it."""
        theirs = {id(p) for m in self.pipeline.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()}

        def own(candidates: Sequence[Any]) -> list[torch.nn.Module]:
            found: list[torch.nn.Module] = []
            for module in candidates:
                parameters = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
                if parameters and not any(id(p) in theirs for p in parameters) and all(module is not f for f in found):
                    found.append(module)
            return found

        modules = {
            role: own([component, *(part.module for part in borrowed_weights(component, role) if part.prefix is None)])
            for role, component in (("encoder", self.encoder), ("aggregator", self.aggregator))
        }
        modules["injectors"] = own(self.injectors)
        return modules

    @contextmanager
    def _onloaded(self, role: str) -> Iterator[None]:
        """Under CPU offload: ``role``'s modules on the execution device for the block, back on the CPU after it."""
        if self._offload is None:
            yield
            return
        if self.training and torch.is_grad_enabled():
            raise ConfigError(
                "CPU offload is for generation: a training step would keep gradients of weights moved back to the CPU. "
                "Call rp.remove_all_hooks() before training, or rp.eval() to generate."
            )
        with self._offload.onloaded(role):
            yield

    # -- lifecycle ----------------------------------------------------------------------------

    def detach(self) -> None:
        """Remove every injector: the pipeline's UNet is exactly as it was before ``from_pipe``.

        Every attachment is detached even if one of them raises; the first error is raised after.
        refcond's offload hooks go too (its modules stay on the CPU); the pipeline keeps diffusers'
        own CPU offload, if it was enabled (``pipe.remove_all_hooks()`` removes it).
        """
        if self._offload is not None:
            self._offload.remove(restore=False)
            self._offload = None
        errors: list[BaseException] = []
        for attachment in reversed(self._attachments):
            try:
                attachment.detach()
            except BaseException as exc:  # noqa: BLE001 - the others must still be detached
                errors.append(exc)
        self._attachments = []
        self._detached = True
        if errors:
            raise errors[0]

    def _check_attached(self) -> None:
        if getattr(self, "_detached", False):
            raise RefcondError("this RefcondPipeline was detached; build a new one with refcond.from_pipe(pipe, ...).")

    @property
    def attachments(self) -> list[Any]:
        """The handles of the attached injectors, in injector order (empty once detached)."""
        return list(self._attachments)

    def components(self) -> dict[str, Any]:
        """Components by checkpoint role: ``encoder``, ``aggregator``, ``injector.<i>``."""
        return roles(Built(self.composition, self.backbone, self.encoder, self.aggregator, self.injectors))

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint stores, keyed ``<role>.<parameter>``: each component's own weights.

        Not the backbone's, and not a component's borrowed pretrained weights
        (:class:`refcond.BorrowedWeights`) unless they were trained (a parameter requires grad) or
        loaded from a checkpoint that carried them.
        """
        out: dict[str, torch.Tensor] = {}
        for role, component in self.components().items():
            if has_weights(component):
                own = own_state_dict(component, borrowed_weights(component, role), self._carried.get(role, ()))
                out.update({f"{role}.{k}": v for k, v in own.items()})
        return out

    def adopt_trained_weights(self) -> None:
        """Count the borrowed weights that are trainable now as their components' own from now on.

        A trainer calls it when a stage that fine-tuned borrowed weights (the MLLM) ends: later
        stages may freeze them again, and checkpoints must still store the fine-tuned copy.
        """
        for role, component in self.components().items():
            for part in borrowed_weights(component, role):
                if part.prefix is not None and is_trainable(part.module):
                    self._carried.setdefault(role, set()).add(part.prefix)

    def save(self, path: str | Path) -> Path:
        """Write a refcond checkpoint atomically: the weights of :meth:`state_dict`, and in the metadata the
        composition (every config resolved, the backbone's model id) and where everything came from.

        A pipeline built in memory has no model id to record: the file then loads with
        ``refcond.load(path, pipe)``, and a warning says so.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ConfigError(f"refcond checkpoints are .safetensors files; got {str(path)!r}.")
        model = describe_source(self.backbone.model_id)
        if model["source"] is None:
            warnings.warn(
                f"{path}: the backbone pipeline was built in memory, so the checkpoint records no model to load it from. "
                "Load it with refcond.load(path, pipe), passing a pipeline of the same kind.",
                UserWarning,
                stacklevel=2,
            )
        backbone_config: dict[str, Any] = {"model": model["source"]}
        if self.composition.backbone is not None and "device" in self.composition.backbone.config:
            backbone_config["device"] = None  # the machine that loads it chooses its device
        composition = self.composition.with_overrides({"backbone": {"config": backbone_config}})
        state = self.state_dict()
        return write_safetensors(path, state, metadata_for(composition.model_dump(mode="json"), self._provenance(model, state)))

    def _provenance(self, model: dict[str, str | None], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        borrowed: dict[str, list[dict[str, Any]]] = {}
        for role, component in self.components().items():
            for part in borrowed_weights(component, role):
                stored = part.prefix is not None and any(key.startswith(f"{role}.{part.prefix}") for key in state)
                entry: dict[str, Any] = {"prefix": part.prefix, **describe_source(part.source), "stored": stored}
                if not stored:
                    entry["sha256"] = self._content_hash(part.module)
                    entry["dtype"] = next((str(p.dtype).removeprefix("torch.") for p in part.module.parameters() if p.is_floating_point()), None)
                borrowed.setdefault(role, []).append(entry)
        return {
            "refcond": _version("refcond"),
            "libraries": {name: _version(name) for name in LIBRARIES},
            "components": {
                role: {"name": entry.name, "plugin": entry.provenance.plugin, "distribution": entry.provenance.distribution, "version": entry.provenance.version}
                for role, entry in self._entries.items()
            },
            "backbone": {"name": self.backbone.name, "model": model["source"], "revision": model["revision"], "built_in_memory": model["source"] is None},
            "borrowed": borrowed,
        }

    def _content_hash(self, module: torch.nn.Module) -> str:
        """:func:`refcond.content_hash`, remembered while the module's weights stay as they were (saving every K
        training steps reads a frozen multi-GB trunk once, not at every save)."""
        fingerprint = weights_fingerprint([module])[1:]  # without the optimizer-step count: these weights are frozen
        known = self._content_hashes.get(id(module))
        if known is None or known[0] != fingerprint:
            known = self._content_hashes[id(module)] = (fingerprint, content_hash(module))
        return known[1]

    def __repr__(self) -> str:
        parts = [f"{role}={spec.name!r}" for role, spec in (("encoder", self.composition.encoder), ("aggregator", self.composition.aggregator)) if spec]
        parts.append(f"injectors={[s.name for s in self.composition.injectors]!r}")
        return f"RefcondPipeline({self.backbone.name}, {', '.join(parts)})"


#: Libraries whose versions a checkpoint records.
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_reference_scale(unet: Any, scale: Any) -> None:
    """Refuse a ``reference_scale`` that is not a finite number or a valid per-block dict, before anything runs."""
    layer_scales(unet, [], scale)  # validates the number or every block of the dict; no layer list needed


def _weights_tensor(reference_weights: Sequence[Sequence[float]] | None, counts: Sequence[int]) -> torch.Tensor | None:
    """``[B, N_max]`` weights, zero-padded for smaller groups; each group's list must match its size."""
    rows = reference_weight_rows(reference_weights)
    if rows is None:
        return None
    if len(rows) != len(counts):
        raise ConfigError(f"reference_weights has {len(rows)} lists for {len(counts)} reference groups: give one list per group.")
    checked = []
    for b, (row, count) in enumerate(zip(rows, counts)):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ConfigError(f"reference_weights for group {b} must be a list of numbers, got {row!r}.")
        if len(row) != count:
            raise ConfigError(f"reference_weights for group {b} has {len(row)} weights, but the group has {count} references: give one weight per reference.")
        checked.append(check_weights(row, b))
    width = max(counts)
    return torch.tensor([row + [0.0] * (width - len(row)) for row in checked])


def _digest(image: PIL.Image.Image) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _is_group_list(references: Any) -> bool:
    return isinstance(references, (list, tuple)) and len(references) > 0 and all(isinstance(r, (list, tuple)) for r in references)


def _as_groups(references: Any, weights: Any) -> tuple[list[Any], list[list[float]] | None]:
    if references is None or (isinstance(references, (list, tuple)) and len(references) == 0):
        load_references(None)  # raises the "no references" error
    groups = list(references) if _is_group_list(references) else [references]
    if weights is None:
        return groups, None
    weights = reference_weight_rows(weights)
    weights = [list(w) for w in weights] if _is_group_list(weights) else [list(weights)] * len(groups)
    return groups, weights


def _prompt_list(prompt: str | list[str], batch: int) -> list[str]:
    """One prompt per image of the batch (``prompt`` was checked: a string or a list of strings)."""
    return [prompt] * batch if isinstance(prompt, str) else list(prompt)


def _encoder_prompts(encoder: Any, prompts: Sequence[str] | None, groups: int) -> tuple[str, ...] | None:
    """The prompts an encoder that reads them gets (one per group); None for other encoders."""
    if not getattr(encoder, "reads_prompt", False):
        return None
    if prompts is None or len(prompts) != groups:
        given = "none" if prompts is None else str(len(prompts))
        raise ConfigError(f"the encoder reads the prompt with the references: pass one prompt per reference group ({groups}), got {given}.")
    return tuple(prompts)


def from_pipe(
    pipe: Any,
    composition: str | Path | Mapping[str, Any] | Composition | None = "ip-adapter",
    *,
    checkpoint: str | Path | dict[str, torch.Tensor] | None = None,
    allow_pickle: bool = False,
    plugins: Plugins | None = None,
    seed: int | None = None,
    **roles: Any,
) -> RefcondPipeline:
    """Condition an existing diffusers pipeline on reference images.

    The pipeline's modules are reused, not copied: its UNet is changed in place until
    :meth:`RefcondPipeline.detach`, and an encoder reuses its ``image_encoder`` and
    ``feature_extractor`` when it has them.

    :param composition: a registered recipe name (``"ip-adapter"``), a ``.toml``/``.json`` file, a
        dict or a :class:`Composition`; ``None`` takes it from a refcond ``checkpoint``.
    :param checkpoint: weights in any registered format (refcond, official IP-Adapter, ...); the
        file decides what it needs (an IP-Adapter Plus file selects the resampler projector).
    :param allow_pickle: read pickle-based files (``.bin``); only for files you trust.
    :param seed: fixes the weights the checkpoint does not provide (fresh ones): the same seed
        gives the same weights in any process. ``None`` draws them from torch's global generator.
    :param roles: per-role overrides, e.g. ``aggregator={"name": "concat"}`` or
        ``encoder={"config": {"output": "hidden_states"}}``; a nested dict merges into the
        role's config level by level.
    """
    plugins = plugins or get_plugins()
    built = build(composition, plugins, pipeline=pipe, checkpoint=checkpoint, allow_pickle=allow_pickle, overrides=roles, seed=seed)
    return RefcondPipeline(built, plugins)


def load(
    path: str | Path,
    pipe: Any = None,
    *,
    allow_pickle: bool = False,
    plugins: Plugins | None = None,
    seed: int | None = None,
    **roles: Any,
) -> RefcondPipeline:
    """Rebuild a composition from a checkpoint: a refcond checkpoint (:meth:`RefcondPipeline.save`), or
    a foreign file that names its recipe (an official IP-Adapter or EasyRef file, with ``pipe``).

    Without ``pipe`` the backbone is loaded from the model id a refcond checkpoint records; a
    checkpoint saved from a pipeline built in memory records none, so pass ``pipe``.
    """
    plugins = plugins or get_plugins()
    built = build(None, plugins, pipeline=pipe, checkpoint=path, allow_pickle=allow_pickle, overrides=roles, seed=seed)
    return RefcondPipeline(built, plugins)
