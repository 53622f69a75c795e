"""The ``cross-attention`` injector: a projector plus decoupled ``to_k_ip``/``to_v_ip`` per cross-attention layer."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn

from refcond import (
    BuildContext,
    layer_scales,
    require_per_reference_tokens,
    Condition,
    ConfigError,
    IncompatibleBackboneError,
    RefcondError,
)
from refcond_injectors.cross_attention.config import MAX_PROJECTOR_PARAMETERS, CrossAttentionConfig
from refcond_injectors.cross_attention.layers import (
    CrossAttentionLayer,
    cross_attention_layers,
    describe_layout,
)
from refcond_injectors.cross_attention.processor import (
    BoundKV,
    DecoupledCrossAttnProcessor,
)
from refcond_injectors.cross_attention.projectors import (
    LinearProjector,
    MLPProjector,
    ResamplerProjector,
    project_condition,
)


#: The processors whose math the decoupled processor reproduces for the text attention (diffusers' defaults).
REPLACEABLE_PROCESSORS = (AttnProcessor2_0, AttnProcessor)


class DecoupledKV(nn.Module):
    """The image key and value projections of one cross-attention layer (no bias, as in IP-Adapter)."""

    def __init__(self, cross_attention_dim: int, hidden_size: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)


def build_projector(config: CrossAttentionConfig, input_dim: int, output_dim: int) -> nn.Module:
    """The projector ``config`` asks for, mapping ``input_dim`` tokens to ``output_dim`` tokens."""
    if config.projector == "linear":
        return LinearProjector(input_dim, output_dim, config.num_tokens)
    if config.projector == "mlp":
        return MLPProjector(input_dim, output_dim, config.mlp_hidden_dim)
    dim = config.resampler_dim or output_dim
    heads = config.resampler_heads or max(1, dim // config.resampler_dim_head)
    return ResamplerProjector(
        input_dim,
        output_dim,
        num_tokens=config.num_tokens,
        dim=dim,
        depth=config.resampler_depth,
        heads=heads,
        dim_head=config.resampler_dim_head,
        ff_mult=config.resampler_ff_mult,
    )


class CrossAttentionInjector(nn.Module):
    """Decoupled cross-attention (IP-Adapter): image tokens get their own keys and values in every
    cross-attention layer, and their attention is added to the text attention.

    Parameters: ``projector.*`` and ``layers.<i>.to_k_ip.weight`` / ``layers.<i>.to_v_ip.weight``,
    ``i`` counting the UNet's cross-attention layers in ``unet.attn_processors`` order.
    """

    def __init__(self, config: CrossAttentionConfig, input_dim: int, layers: list[CrossAttentionLayer]):
        super().__init__()
        if not layers:
            raise IncompatibleBackboneError("the UNet has no cross-attention (attn2) layers to inject into.")
        self.config = config
        self.input_dim = input_dim
        self.layout = list(layers)
        self.cross_attention_dim = layers[0].cross_attention_dim
        self.projector = build_projector(config, input_dim, self.cross_attention_dim)
        self.layers = nn.ModuleList(DecoupledKV(layer.cross_attention_dim, layer.hidden_size) for layer in layers)

    @classmethod
    def from_config(cls, config: CrossAttentionConfig, context: BuildContext) -> CrossAttentionInjector:
        """Size the projector from the encoder/aggregator and the layers from the backbone's UNet.

        Without a checkpoint, ``to_k_ip``/``to_v_ip`` start as copies of each layer's text
        ``to_k``/``to_v`` (IP-Adapter's initialisation), so training starts from a sensible point.
        """
        if context.backbone is None or context.encoder is None or context.aggregator is None:
            raise ConfigError("injector 'cross-attention' needs a backbone, an encoder and an aggregator built before it.")
        if config.projector == "resampler":  # it resamples each reference's tokens on their own
            require_per_reference_tokens(context, "injector 'cross-attention' with the 'resampler' projector")
        input_dim = context.aggregator.output_dim(context.encoder.embedding_dim)
        if config.input_dim is not None and config.input_dim != input_dim:
            raise IncompatibleBackboneError(
                f"injector 'cross-attention': its projector takes {config.input_dim}-d reference features (input_dim, "
                f"usually set by the checkpoint), but the encoder {type(context.encoder).__name__} with this aggregator "
                f"yields {input_dim}-d features. Use the image encoder the checkpoint was trained with "
                "(e.g. encoder config model='h94/IP-Adapter', subfolder='models/image_encoder')."
            )
        unet = context.backbone.unet
        output_dim = context.backbone.cross_attention_dim
        count = config.projector_parameters(input_dim, output_dim)
        if count > MAX_PROJECTOR_PARAMETERS:  # the config was checked with assumed sizes; these are the real ones
            raise ConfigError(
                f"injector 'cross-attention': with {input_dim}-d reference features and the UNet's {output_dim}-d tokens, the "
                f"{config.projector} projector would have {count / 1e9:.3g} billion parameters, more than the "
                f"{MAX_PROJECTOR_PARAMETERS / 1e9:.3g} billion allowed; choose smaller projector sizes."
            )
        injector = cls(config, input_dim, cross_attention_layers(unet))
        with torch.no_grad():
            for layer, kv in zip(injector.layout, injector.layers):
                attn = unet.get_submodule(layer.module_path)
                kv.to_k_ip.weight.copy_(attn.to_k.weight)
                kv.to_v_ip.weight.copy_(attn.to_v.weight)
        return injector.to(device=context.backbone.device, dtype=context.backbone.dtype)

    def project(self, condition: Condition) -> tuple[torch.Tensor, torch.Tensor]:
        """Project a condition into image tokens: ``(tokens [B, K, cross_dim], mask [B, K])``."""
        if condition.dim != self.input_dim:
            raise ConfigError(
                f"injector 'cross-attention' takes {self.input_dim}-d condition tokens, got {condition.dim}-d. "
                "The encoder or aggregator changed after the injector was built."
            )
        return project_condition(self.projector, condition)

    def attach(self, unet: Any) -> CrossAttentionAttachment:
        """Swap every cross-attention processor of ``unet`` for a decoupled one; see :class:`CrossAttentionAttachment`."""
        return CrossAttentionAttachment(self, unet)


class CrossAttentionAttachment:
    """The injector attached to one UNet.

    Attaching changes nothing but the ``attn2`` processors (not ``unet.config``, not
    ``encoder_hid_proj``); :meth:`detach` puts the original processor objects back.
    """

    def __init__(self, injector: CrossAttentionInjector, unet: Any):
        layers = cross_attention_layers(unet)
        if [(la.name, la.hidden_size, la.cross_attention_dim) for la in layers] != [
            (la.name, la.hidden_size, la.cross_attention_dim) for la in injector.layout
        ]:
            raise IncompatibleBackboneError(
                f"injector 'cross-attention' was built for a UNet with {describe_layout(injector.layout)}; "
                f"this UNet has {describe_layout(layers)}. Build the injector from this pipeline."
            )
        self.injector = injector
        self.unet = unet
        self._modules = [unet.get_submodule(layer.module_path) for layer in layers]
        self._originals = [module.processor for module in self._modules]
        if any(isinstance(original, DecoupledCrossAttnProcessor) for original in self._originals):
            # A bound outer processor does its own attention and would silently drop the inner one's.
            raise ConfigError(
                "a cross-attention injector is already attached to this UNet; one UNet takes one. Put all "
                "references in one group (with a concat or mean aggregator), or detach the other first."
            )
        for layer, original in zip(layers, self._originals):
            if type(original) not in REPLACEABLE_PROCESSORS:  # a subclass may compute something else
                # Bound, the decoupled processor computes the text attention itself: a custom one would be bypassed.
                raise ConfigError(
                    f"the UNet's {layer.module_path} runs attention processor {type(original).__name__}; while a reference "
                    "condition is bound the cross-attention injector computes that layer's attention itself and would bypass it. "
                    f"It replaces only diffusers' default processors ({', '.join(c.__name__ for c in REPLACEABLE_PROCESSORS)}): "
                    "restore them with pipe.unet.set_default_attn_processor() before refcond.from_pipe, and set yours again after detach()."
                )
        self._processors = [DecoupledCrossAttnProcessor(original, layer.heads) for original, layer in zip(self._originals, layers)]
        for module, processor in zip(self._modules, self._processors):
            module.set_processor(processor)
        self._attached = True

    @contextmanager
    def condition(
        self,
        condition: Condition,
        unconditional: Condition | None,
        scale: float | Mapping[str, Any] | None = None,
    ) -> Iterator[None]:
        """Bind a condition for one generation.

        The condition (and the unconditional one) is projected once and every layer's image keys
        and values are computed once, cast to the UNet's dtype and device; each denoising step then
        only attends. ``scale`` is a float or an InstantStyle per-block dict (unlisted blocks get
        0), multiplied by the config's ``scale``. Nothing stays bound after the ``with`` block.
        """
        if not self._attached:
            raise RefcondError("this cross-attention attachment was detached; attach the injector again.")
        if condition is None:
            raise ConfigError("the cross-attention injector reads a condition: bind what rp.encode(...) returned, not None.")
        if unconditional is not None and unconditional.batch_size != condition.batch_size:
            raise ConfigError(
                f"the unconditional condition has {unconditional.batch_size} rows but the condition has {condition.batch_size}."
            )
        scales = layer_scales(self.unet, [layer.name for layer in self.injector.layout], scale, base=self.injector.config.scale)
        if not any(scales):  # every layer runs its original processor: nothing to compute
            yield
            return
        both = condition if unconditional is None else Condition.concat_batches([unconditional, condition])
        tokens, mask = self.injector.project(both)
        attend = None if bool(mask.all()) else mask[:, None, None, :]
        try:
            for module, processor, kv, layer_scale in zip(self._modules, self._processors, self.injector.layers, scales):
                if layer_scale == 0:
                    continue  # the layer runs its original processor: no keys/values needed
                target = module.to_k.weight
                key = _split_heads(kv.to_k_ip(tokens), processor.heads).to(device=target.device, dtype=target.dtype)
                value = _split_heads(kv.to_v_ip(tokens), processor.heads).to(device=target.device, dtype=target.dtype)
                processor.bound = BoundKV(
                    key, value, None if attend is None else attend.to(target.device), unconditional is not None, layer_scale
                )
            yield
        finally:
            for processor in self._processors:
                processor.bound = None

    def detach(self) -> None:
        """Put the original processors back, object for object; idempotent."""
        if not self._attached:
            return
        for module, processor in zip(self._modules, self._processors):
            if module.processor is not processor:
                raise RefcondError(
                    "cannot detach the cross-attention injector: another processor replaced it on "
                    f"{type(module).__name__} after it was attached. Detach what was attached later first."
                )
        for module, original, processor in zip(self._modules, self._originals, self._processors):
            processor.bound = None
            module.set_processor(original)
        self._attached = False


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, K, heads * d]`` -> ``[B, heads, K, d]``."""
    b, length, inner = t.shape
    return t.view(b, length, heads, inner // heads).transpose(1, 2)
