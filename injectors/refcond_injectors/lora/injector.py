"""The ``lora`` injector: LoRA files loaded into the backbone pipeline through diffusers and PEFT."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from refcond import (
    Backbone,
    BuildContext,
    CheckpointError,
    Condition,
    ConfigError,
    IncompatibleBackboneError,
    RefcondError,
    ReferenceImageError,
    check_state_dict,
    layer_scales,
)
from refcond_injectors.lora.checks import check_lora, loadable_components
from refcond_injectors.lora.config import LoraInjectorConfig, LoraSource
from refcond_injectors.lora.files import (
    default_adapter_name,
    shadows_module_attribute,
    locate,
    read_lora,
    require_lora_support,
)
from refcond_injectors.lora.layers import LoraLayerWeights, peft_weight, target_layers
from refcond_injectors.lora.state import (
    FusedWeights,
    PeftSnapshot,
    peft_layers,
    quiet_loading,
)
from refcond_injectors.lora.tuning import tune_lora


class LoraInjector:
    """Loads LoRA files into the backbone's UNet and text encoders when attached.

    The files' weights live in the pipeline, as PEFT adapters, from :meth:`attach` to
    :meth:`LoraAttachment.detach`. With ``config.layers`` the injector also owns LoRA layers on
    every UNet attention layer (EasyRef's): their weights are its :meth:`state_dict`, which a
    refcond checkpoint stores and :meth:`load_state_dict` reads. Build it with :meth:`from_config`.
    """

    def __init__(self, config: LoraInjectorConfig, backbone: Backbone):
        self.config = config
        self.backbone = backbone
        self.own_layers: LoraLayerWeights | None = None
        if config.layers is not None:
            layers = target_layers(backbone.unet, config.layers.targets)
            self.own_layers = LoraLayerWeights(layers, config.layers.rank, device=backbone.device, dtype=backbone.dtype)
        self.attachment: LoraAttachment | None = None

    @classmethod
    def from_config(cls, config: LoraInjectorConfig, context: BuildContext) -> LoraInjector:
        """Check that the backbone loads LoRA and that every configured file exists (none is read yet)."""
        if context.backbone is None:
            raise ConfigError("injector 'lora' needs the backbone built before it.")
        require_lora_support(context.backbone.pipeline)
        for source in config.loras:
            locate(source.path, source.weight_name, allow_pickle=config.allow_pickle)
        return cls(config, context.backbone)

    @property
    def pipeline(self) -> Any:
        return self.backbone.pipeline

    def attach(self, unet: Any) -> LoraAttachment:
        """Load the configured LoRAs into the pipeline whose UNet is ``unet``; see :class:`LoraAttachment`."""
        if unet is not self.pipeline.unet:
            raise IncompatibleBackboneError(
                "injector 'lora' loads LoRA files through the pipeline it was built from (into its UNet and text "
                "encoders), so it attaches only to that pipeline's UNet; build it from the pipeline that owns this UNet."
            )
        if self.attachment is not None:
            raise ConfigError("this lora injector is attached already; detach it before attaching it again.")
        self.attachment = TunedLoraAttachment(self) if self.config.tuning is not None else LoraAttachment(self)
        return self.attachment

    # -- the weights of its own LoRA layers (config.layers) ---------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The own LoRA layers' weights, ``unet.<module>.lora_{A,B}.weight`` (empty without ``layers``).

        While attached these are the live weights of the PEFT adapter in the UNet, so a training
        step's changes are what a checkpoint saves.
        """
        if self.own_layers is None:
            return {}
        attachment = self.attachment
        if attachment is not None and attachment.own_adapter is not None:
            unet = self.pipeline.unet
            return {key: peft_weight(unet, key, attachment.own_adapter).detach() for key, _ in self.own_layers.items()}
        return {key: value.detach() for key, value in self.own_layers.items()}

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The own LoRA layers' live parameters (inside the UNet's PEFT layers, while attached), named as in :meth:`state_dict`.

        Nothing while detached or without ``layers``: the weights are then plain tensors held for the next attach.
        """
        attachment = self.attachment
        if self.own_layers is None or attachment is None or attachment.own_adapter is None:
            return
        unet = self.pipeline.unet
        for key, _ in self.own_layers.items():
            yield key, peft_weight(unet, key, attachment.own_adapter)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters of :meth:`named_parameters`."""
        for _, parameter in self.named_parameters():
            yield parameter

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load the own LoRA layers' weights (keys and shapes as :meth:`state_dict`); only while detached."""
        if self.own_layers is None:
            if state_dict:
                raise CheckpointError(f"injector 'lora' has no layers of its own (config layers is None), but got {len(state_dict)} weights for them.")
            return
        if self.attachment is not None:
            raise RefcondError("load the lora injector's weights before attaching it (refcond.from_pipe does), not while it is attached.")
        expected = dict(self.own_layers.items())
        check_state_dict(expected if strict else {k: v for k, v in expected.items() if k in state_dict}, state_dict)
        self.own_layers.load(state_dict)


#: How messages name the injector's own LoRA layers, and the base of their adapter name.
OWN_LAYERS_LABEL = "the lora injector's own layers (config layers)"
OWN_LAYERS_ADAPTER = "refcond_layers"
#: The adapter name of the LoRA tuned for the current group: the same for every group, so a compiled UNet keeps its graph.
TUNED_ADAPTER = "refcond_tuned"


class LoraAttachment:
    """The LoRA files of one :class:`LoraInjector`, loaded as PEFT adapters into the backbone pipeline.

    - Each file is checked against the backbone, then loaded with ``pipeline.load_lora_weights``
      under its own adapter name; all are activated together with their weights
      (``pipeline.set_adapters``), and fused into the base weights when the config says so.
    - Adapters the user loaded before stay active, with their exact per-layer weights.
    - :meth:`detach` puts the UNet and the text encoders back exactly: refcond's adapters and the
      layers PEFT wrapped for them go away (everything PEFT added, when the pipeline had no
      adapters before), fused layers get their original weights copied back, and the user's
      adapters get their active set and scalings back.

    The LoRAs do not read the condition and are not scaled by the call's ``reference_scale``.
    There is no ``adapt`` method: these LoRAs are fixed files, not learnt from the references.
    """

    def __init__(self, injector: LoraInjector):
        self.injector = injector
        self.pipeline = injector.pipeline
        self.config = injector.config
        self._sources: dict[str, LoraSource] = {}
        self._snapshot = PeftSnapshot.take(self.pipeline)
        self._fused = FusedWeights()
        self._attached = True
        self.own_adapter: str | None = None
        try:
            for source in self.config.loras:
                self._load(source, fuse=False)
            if injector.own_layers is not None:
                self.own_adapter = self._load_own_layers()
            if self.config.fuse:
                self._fuse()
        except BaseException:
            self.detach()
            raise

    # -- the tuning integration point ------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """The adapters this attachment loaded, in loading order."""
        return list(self._sources)

    def load(
        self,
        source: str | Path,
        *,
        adapter_name: str | None = None,
        scale: float | Mapping[str, Any] = 1.0,
        text_encoder_scale: float | None = None,
        weight_name: str | None = None,
    ) -> str:
        """Load one more LoRA file (checked like the configured ones) and activate it alongside the others.

        :param source: a ``.safetensors`` file, or a folder / hub id with ``weight_name``.
        :param scale: its UNet weight: a number or a per-block dict (diffusers' ``set_adapters`` format).
        :param text_encoder_scale: its text-encoder weight; None = ``scale`` if a number, else 1.0.
        :returns: its adapter name (``adapter_name``, or one derived from the file name).
        """
        self._require_attached()
        try:
            spec = LoraSource(
                path=str(source), weight_name=weight_name, adapter_name=adapter_name, scale=scale, text_encoder_scale=text_encoder_scale
            )
        except ValueError as exc:
            raise ConfigError(f"injector 'lora': invalid LoRA source {str(source)!r}: {exc}") from None
        return self._load(spec, fuse=self.config.fuse)

    def unload(self, adapter_name: str) -> None:
        """Remove one adapter this attachment loaded; the others stay active (and fused, if they were)."""
        self._require_attached()
        if adapter_name not in self._sources:
            raise ConfigError(f"injector 'lora' loaded no adapter {adapter_name!r}; it loaded {self.adapter_names}.")
        self._unfuse()
        with quiet_loading():
            self.pipeline.delete_adapters([adapter_name])
        del self._sources[adapter_name]
        self._snapshot.remove_added(self.pipeline)
        self._activate()
        if self.config.fuse:
            self._fuse()

    # -- the Attachment protocol ------------------------------------------------------------------

    @contextmanager
    def condition(
        self,
        condition: Condition | None,
        unconditional: Condition | None,
        scale: float | Mapping[str, Any] | None = None,
    ) -> Iterator[None]:
        """Nothing to bind: the LoRAs act on every step whatever the condition, and ``scale`` (the
        call's ``reference_scale``) does not weigh them; their weights come from the config."""
        self._require_attached()
        yield

    def detach(self) -> None:
        """Remove refcond's adapters and put the UNet and text encoders back exactly; idempotent."""
        if not self._attached:
            return
        self._unfuse()
        if self._sources:
            with quiet_loading():
                self.pipeline.delete_adapters(list(self._sources))
            self._sources.clear()
        self._snapshot.remove_added(self.pipeline)
        self._snapshot.reactivate(self.pipeline, [])
        self._snapshot.restore_pipeline_attributes(self.pipeline)
        self._attached = False
        self.own_adapter = None
        if self.injector.attachment is self:
            self.injector.attachment = None

    # -- internals --------------------------------------------------------------------------------

    def _require_attached(self) -> None:
        if not self._attached:
            raise RefcondError("this lora attachment was detached; attach the injector again.")

    def _load(self, spec: LoraSource, *, fuse: bool) -> str:
        allow_pickle = self.config.allow_pickle
        where = locate(spec.path, spec.weight_name, allow_pickle=allow_pickle)
        _check_blocks(spec.scale, self.pipeline.unet, where.label)
        lora = read_lora(self.pipeline, where, allow_pickle=allow_pickle)
        check_lora(self.pipeline, self.injector.backbone.name, lora.state_dict, where.label)
        name = self._adapter_name(spec, where.stem)
        return self._install(spec, name, where.label, where.location, where.loader_kwargs(allow_pickle), fuse=fuse)

    def _load_own_layers(self) -> str:
        """Load the injector's own LoRA layers (``config.layers``) as one more adapter."""
        layers = self.config.layers
        assert layers is not None and self.injector.own_layers is not None
        spec = LoraSource(path=OWN_LAYERS_LABEL, scale=layers.scale)
        name = self._adapter_name(spec, OWN_LAYERS_ADAPTER)
        state = {key: value.clone() for key, value in self.injector.own_layers.items()}  # diffusers may consume the dict
        return self._install(spec, name, OWN_LAYERS_LABEL, state, {}, fuse=False)

    def _install(self, spec: LoraSource, name: str, label: str, location: Any, loader_kwargs: dict[str, Any], *, fuse: bool) -> str:
        """Load one checked LoRA (a file location or a state dict) under ``name`` and activate it."""
        self._unfuse()
        before = PeftSnapshot.take(self.pipeline)
        try:
            with quiet_loading():
                self.pipeline.load_lora_weights(location, adapter_name=name, **loader_kwargs)
            self._sources[name] = spec.model_copy(update={"adapter_name": name})
            self._activate()
        except BaseException as exc:
            self._sources.pop(name, None)
            with quiet_loading():
                self.pipeline.delete_adapters([name])
            before.remove_added(self.pipeline)
            self._activate()
            if fuse and self._sources:
                self._fuse()
            if isinstance(exc, RefcondError) or not isinstance(exc, Exception):
                raise
            raise CheckpointError(f"diffusers could not load LoRA {label!r}: {exc}") from exc
        if fuse:
            self._fuse()
        return name

    def _adapter_name(self, spec: LoraSource, stem: str) -> str:
        taken = {name for names in self.pipeline.get_list_adapters().values() for name in names} | set(self._sources)
        if spec.adapter_name is not None:
            if shadows_module_attribute(spec.adapter_name):
                raise ConfigError(
                    f"injector 'lora': adapter name {spec.adapter_name!r} is the name of a torch module attribute, which PEFT's "
                    "layers cannot hold as an adapter; choose another (e.g. add a suffix), or leave adapter_name unset."
                )
            if spec.adapter_name in taken:
                raise ConfigError(
                    f"injector 'lora': adapter name {spec.adapter_name!r} is already loaded in the pipeline "
                    f"(adapters: {sorted(taken)}); choose another, or leave adapter_name unset to derive a free one."
                )
            return spec.adapter_name
        base = default_adapter_name(stem)
        name, count = base, 1
        while name in taken:
            count += 1
            name = f"{base}_{count}"
        return name

    def _weights(self, name: str) -> dict[str, Any]:
        """``set_adapters`` weights of one adapter, for the components that hold it."""
        spec = self._sources[name]
        holders = [c for c, names in self.pipeline.get_list_adapters().items() if name in names]
        return {c: (spec.scale if c == "unet" else spec.text_scale) for c in holders}

    def _activate(self) -> None:
        """Activate refcond's adapters with their weights, next to the adapters that were active before attach."""
        names = list(self._sources)
        if names:
            weights = [self._weights(name) for name in names]
            try:
                self.pipeline.set_adapters(names, adapter_weights=weights)
            except (ValueError, KeyError, TypeError) as exc:
                given = {name: self._sources[name].scale for name in names}
                raise ConfigError(f"injector 'lora': diffusers rejects the LoRA weights {given}: {exc}") from None
        self._snapshot.reactivate(self.pipeline, names)

    def _fuse(self) -> None:
        """Fuse every refcond adapter into the base weights, keeping the originals to copy back."""
        names = list(self._sources)
        if not names:
            return
        self._refuse_shared_layers(names)
        self._fused.save(self.pipeline, names)
        components = [c for c, held in self.pipeline.get_list_adapters().items() if set(held) & set(names)]
        self.pipeline.fuse_lora(components=components, adapter_names=names)

    def _unfuse(self) -> None:
        if self._fused:
            self._fused.restore(list(self._sources))
            self._snapshot.restore_pipeline_attributes(self.pipeline)

    def _refuse_shared_layers(self, names: list[str]) -> None:
        """PEFT runs only the base weights of a layer with a fused adapter: refuse to silence the user's unfused ones."""
        for component in loadable_components(self.pipeline):
            for path, layer in peft_layers(getattr(self.pipeline, component)):
                if not any(n in layer.lora_A for n in names):
                    continue
                theirs = [a for a in layer.active_adapters if a not in names and a in layer.lora_A and a not in layer.merged_adapters]
                if theirs:
                    raise ConfigError(
                        f"injector 'lora': fuse=true would silence your active LoRA {theirs[0]!r} in {component}.{path} "
                        "(PEFT runs a layer with a fused adapter on its base weights only). Set fuse=false, or fuse your "
                        "LoRA first (pipe.fuse_lora(adapter_names=[...]))."
                    )


class TunedLoraAttachment(LoraAttachment):
    """A :class:`LoraAttachment` that also learns from the references: the tuning-based baseline.

    It is a :class:`refcond.ReferenceAdapter`: before each generation the pipeline hands it the
    call's reference group, and :meth:`adapt` tunes a LoRA on it with :func:`tune_lora` (or finds
    the one tuned before in the cache: a second prompt over the same references costs nothing) and
    loads it beside the configured files, replacing the LoRA tuned for the previous group under the
    same adapter name (:data:`TUNED_ADAPTER`, unless the user holds one so named), so a compiled
    UNet meets the same modules for every group and keeps its graph.
    """

    def __init__(self, injector: LoraInjector):
        super().__init__(injector)
        self._tuned: tuple[Path, str] | None = None  # (file, adapter name) of the group tuned last

    def adapt(self, references: Any, captions: Any = None) -> None:
        """Tune (or reuse) the LoRA for ``references`` and make it the active tuned adapter."""
        self._require_attached()
        assert self.config.tuning is not None
        result = tune_lora(self.pipeline, references, config=self.config.tuning, captions=captions)
        if self._tuned is not None and self._tuned[0] == result.path:
            return  # the same group as last time: its LoRA is loaded already
        if self._tuned is not None:
            self.unload(self._tuned[1])
            self._tuned = None
        taken = {name for names in self.pipeline.get_list_adapters().values() for name in names}
        name = None if TUNED_ADAPTER in taken else TUNED_ADAPTER  # None: a free name derived from the file
        self._tuned = (result.path, self.load(result.path, adapter_name=name))

    @contextmanager
    def condition(
        self,
        condition: Condition | None,
        unconditional: Condition | None,
        scale: float | Mapping[str, Any] | None = None,
    ) -> Iterator[None]:
        """As :meth:`LoraAttachment.condition`, once a LoRA has been tuned."""
        if self._tuned is None:
            raise ReferenceImageError(
                "the lora injector tunes on the references, and has not tuned yet: pass the group to tune on as "
                "references=[...] in the call (later calls may leave it out to reuse the last group's LoRA)."
            )
        with super().condition(condition, unconditional, scale):
            yield

    def detach(self) -> None:
        super().detach()
        self._tuned = None


def _check_blocks(scale: Any, unet: Any, label: str) -> None:
    """Refuse per-block weights that name blocks the UNet lacks, or are not finite (diffusers would ignore or propagate them)."""
    if not isinstance(scale, Mapping):
        return
    try:
        layer_scales(unet, list(unet.attn_processors), scale, default=1.0, what=f"the per-block scale of LoRA {label!r}")
    except ConfigError as exc:
        raise ConfigError(f"injector 'lora': {exc}") from None
