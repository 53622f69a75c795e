"""The user-facing pipeline: a diffusers pipeline whose UNet reads a group of reference images."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from refcond.building import Built, build, has_weights, roles
from refcond.checkpoints.io import write_safetensors
from refcond.checkpoints.native import metadata_for
from refcond.config import Composition
from refcond.contracts import Condition, ReferenceAdapter
from refcond.errors import ConfigError, RefcondError, ReferenceImageError
from refcond.images import ReferenceInput, load_references
from refcond.plugins import Plugins, get_plugins

_CACHE_SIZE = 8


class RefcondPipeline:
    """A diffusers Stable Diffusion pipeline conditioned on reference images.

    Create one with :func:`refcond.from_pipe` or :func:`refcond.load`. Calling it takes the
    diffusers pipeline's own arguments plus ``references``; :meth:`detach` restores the pipeline.

    The components are exposed by role (``encoder``, ``aggregator``, ``injectors``) so training
    code can select parameters by role. Encoded conditions are cached by reference content, so a
    second prompt over the same references skips the encoder.
    """

    def __init__(self, built: Built, plugins: Plugins):
        self.composition: Composition = built.composition
        self.backbone = built.backbone
        self.encoder = built.encoder
        self.aggregator = built.aggregator
        self.injectors = built.injectors
        self.plugins = plugins
        self.pipeline = built.backbone.pipeline
        self._attachments: list[Any] = []
        try:
            for injector in self.injectors:
                self._attachments.append(injector.attach(self.pipeline.unet))
        except BaseException:  # leave the pipeline as it was: undo the injectors already attached
            self.detach()
            raise
        self._cache: OrderedDict[tuple[Any, ...], tuple[Condition, Condition]] = OrderedDict()

    # -- conditioning -------------------------------------------------------------------------

    def encode(
        self,
        references: Sequence[Sequence[ReferenceInput]],
        reference_weights: Sequence[Sequence[float]] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> tuple[Condition, Condition]:
        """Encode and aggregate a batch of reference groups.

        :param prompts: one prompt per group, for an encoder that reads the prompt with the
            references (``reads_prompt``, e.g. ``mllm`` with ``append_prompt``); others ignore them.
        :returns: ``(condition, unconditional)``, each with one row per group; ``unconditional`` is
            what the negative branch of classifier-free guidance reads.
        """
        if self.encoder is None or self.aggregator is None:
            raise ConfigError(
                f"composition {self.composition.name or '(unnamed)'!r} has no encoder: its injectors "
                f"({', '.join(s.name for s in self.composition.injectors)}) read no encoded condition."
            )
        groups = [load_references(group) for group in references]
        weights = None if reference_weights is None else torch.tensor([list(map(float, w)) for w in reference_weights])
        prompts = _encoder_prompts(self.encoder, prompts, len(groups))
        key = (
            tuple(tuple(_digest(img) for img in group) for group in groups),
            None if weights is None else tuple(weights.flatten().tolist()),
            prompts,
        )
        cacheable = not any(getattr(c, "training", False) for c in (self.encoder, self.aggregator))
        if cacheable and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with torch.inference_mode():
            encoding = self.encoder.encode(groups) if prompts is None else self.encoder.encode(groups, prompts=list(prompts))  # type: ignore[call-arg]
            unconditional = self.encoder.encode_unconditional(encoding, groups)
            result = (self.aggregator(encoding, weights), self.aggregator(unconditional, weights))
        if cacheable:
            self._cache[key] = result
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return result

    def clear_cache(self) -> None:
        """Forget cached conditions (done automatically while a component is in training mode)."""
        self._cache.clear()

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
        :param reference_scale: strength of the reference condition: a float, or a per-block dict as
            in InstantStyle (``{"up": {"block_0": [0.0, 1.0, 0.0]}}``; unlisted blocks get 0).
        :param reference_weights: per-reference weights for weighting aggregators (``weighted-mean``).
        :param reference_captions: one caption per reference, for injectors that learn from the
            references themselves (``lora-tuning``); others ignore them.
        :param pipeline_kwargs: any other argument of the diffusers pipeline's ``__call__``
            (``height``, ``width``, ``latents``, ``callback_on_step_end``, ...).
        :returns: the diffusers pipeline's output (``.images``).

        Arguments left as ``None`` keep the diffusers pipeline's defaults.
        """
        self._check_attached()
        batch = _prompt_batch(prompt, pipeline_kwargs)
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
        with torch.no_grad(), ExitStack() as stack:
            for attachment in self._attachments:
                stack.enter_context(attachment.condition(condition, unconditional, reference_scale))
            return self.pipeline(num_images_per_prompt=num_images_per_prompt, **call_kwargs, **pipeline_kwargs)

    # -- lifecycle ----------------------------------------------------------------------------

    def detach(self) -> None:
        """Remove every injector: the pipeline's UNet is exactly as it was before ``from_pipe``."""
        for attachment in reversed(self._attachments):
            attachment.detach()
        self._attachments = []
        self._detached = True

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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights refcond owns (not the backbone's), keyed ``<role>.<parameter>``."""
        out: dict[str, torch.Tensor] = {}
        for role, component in self.components().items():
            if has_weights(component):
                out.update({f"{role}.{k}": v for k, v in component.state_dict().items()})
        return out

    def save(self, path: str | Path) -> Path:
        """Write a refcond checkpoint (``.safetensors``, composition in the metadata) atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ConfigError(f"refcond checkpoints are .safetensors files; got {str(path)!r}.")
        composition = self.composition.with_overrides({"backbone": {"config": {"model": self.backbone.model_id}}})
        return write_safetensors(path, self.state_dict(), metadata_for(composition.model_dump(mode="json")))

    def __repr__(self) -> str:
        parts = [f"{role}={spec.name!r}" for role, spec in (("encoder", self.composition.encoder), ("aggregator", self.composition.aggregator)) if spec]
        parts.append(f"injectors={[s.name for s in self.composition.injectors]!r}")
        return f"RefcondPipeline({self.backbone.name}, {', '.join(parts)})"


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
    weights = [list(w) for w in weights] if _is_group_list(weights) else [list(weights)] * len(groups)
    return groups, weights


def _prompt_list(prompt: Any, batch: int) -> list[str]:
    if isinstance(prompt, str):
        return [prompt] * batch
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ConfigError("this composition's encoder reads the prompt with the references: pass prompt as text, not prompt_embeds.")


def _encoder_prompts(encoder: Any, prompts: Sequence[str] | None, groups: int) -> tuple[str, ...] | None:
    """The prompts an encoder that reads them gets (one per group); None for other encoders."""
    if not getattr(encoder, "reads_prompt", False):
        return None
    if prompts is None or len(prompts) != groups:
        given = "none" if prompts is None else str(len(prompts))
        raise ConfigError(f"the encoder reads the prompt with the references: pass one prompt per reference group ({groups}), got {given}.")
    return tuple(prompts)


def _prompt_batch(prompt: Any, kwargs: Mapping[str, Any]) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    embeds = kwargs.get("prompt_embeds")
    if embeds is not None:
        return int(embeds.shape[0])
    raise ConfigError("pass a prompt (a string or a list of strings), or prompt_embeds.")


def from_pipe(
    pipe: Any,
    composition: str | Path | Mapping[str, Any] | Composition | None = "ip-adapter",
    *,
    checkpoint: str | Path | dict[str, torch.Tensor] | None = None,
    allow_pickle: bool = False,
    plugins: Plugins | None = None,
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
    :param roles: per-role overrides, e.g. ``aggregator={"name": "concat"}`` or
        ``encoder={"config": {"output": "hidden_states"}}``.
    """
    plugins = plugins or get_plugins()
    built = build(composition, plugins, pipeline=pipe, checkpoint=checkpoint, allow_pickle=allow_pickle, overrides=roles)
    return RefcondPipeline(built, plugins)


def load(path: str | Path, pipe: Any = None, *, plugins: Plugins | None = None, **roles: Any) -> RefcondPipeline:
    """Rebuild a composition from a refcond checkpoint written by :meth:`RefcondPipeline.save`.

    Without ``pipe`` the backbone is loaded from the model id recorded in the checkpoint.
    """
    plugins = plugins or get_plugins()
    built = build(None, plugins, pipeline=pipe, checkpoint=path, overrides=roles)
    return RefcondPipeline(built, plugins)
