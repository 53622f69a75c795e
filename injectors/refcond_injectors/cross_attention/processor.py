"""The attention processor that adds decoupled image attention to one cross-attention layer.

It reads keys and values computed once per generation (:class:`BoundKV`) and does only the
attention itself at each denoising step. Its text attention is the math of diffusers'
``AttnProcessor2_0``; the image attention, ``scale * SDPA(Q, K_ip, V_ip)`` summed into the text
attention before ``to_out``, is that of ``IPAdapterAttnProcessor2_0``. With nothing bound (a
layer whose scale is 0 is never bound), it hands the call to the processor it replaced, so the layer
computes exactly what it computed before.

Under ``torch.compile`` nothing here breaks the graph, and a new binding of the same shapes reuses
the compiled graph: every value that changes between bindings (keys, values, mask, scale) reaches
the graph as a tensor, and the Python-side branches read only structure (the batch layout, whether
the condition has padding, device and dtype), never values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from refcond import RefcondError


@dataclass
class BoundKV:
    """One layer's image keys and values for one generation, already split into heads.

    :ivar key: ``[R, heads, K, head_dim]``; rows are ``cat(unconditional, conditional)`` when
        ``has_unconditional`` (R = 2B), else the conditional rows only (R = B).
    :ivar mask: ``[R, 1, 1, K]`` bool (True = attend), or None when no token is padding.
    :ivar scale: strength of this layer's image attention; never 0 (such a layer is not bound).
    :ivar scale_tensor: ``scale`` as a 0-d float32 tensor on ``key``'s device: what a compiled
        graph reads, so that a new scale is a new input, not a guard failure and a recompile.
        Eager calls multiply by the Python float, as diffusers does.
    """

    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    has_unconditional: bool
    scale: float
    scale_tensor: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.scale_tensor = torch.tensor(self.scale, dtype=torch.float32, device=self.key.device)

    @property
    def conditional_rows(self) -> int:
        return self.key.shape[0] // 2 if self.has_unconditional else self.key.shape[0]

    def to(self, reference: torch.Tensor) -> BoundKV:
        """A copy on ``reference``'s device and dtype (when a hook moved the UNet after binding)."""
        mask = None if self.mask is None else self.mask.to(reference.device)
        key = self.key.to(device=reference.device, dtype=reference.dtype)
        value = self.value.to(device=reference.device, dtype=reference.dtype)
        return BoundKV(key, value, mask, self.has_unconditional, self.scale)

    def select(self, batch_size: int) -> tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The rows of the UNet batch that get image attention, and their keys, values and mask.

        Under classifier-free guidance diffusers runs ``[unconditional; conditional]`` (2B rows);
        without it, B rows. Without an unconditional condition the first half gets none.
        """
        b = self.conditional_rows
        mask = self.mask
        if self.has_unconditional and batch_size == 2 * b:
            return slice(0, batch_size), self.key, self.value, mask
        if self.has_unconditional and batch_size == b:
            return slice(0, b), self.key[b:], self.value[b:], None if mask is None else mask[b:]
        if not self.has_unconditional and batch_size == b:
            return slice(0, b), self.key, self.value, mask
        if not self.has_unconditional and batch_size == 2 * b:
            return slice(b, 2 * b), self.key, self.value, mask
        raise RefcondError(
            f"the UNet was called with a batch of {batch_size}, but the bound reference condition has {b} row(s) "
            f"(expected {b}, or {2 * b} with classifier-free guidance). Pass one reference group per prompt, or one for all."
        )


class DecoupledCrossAttnProcessor(nn.Module):
    """Cross-attention with an added image attention over keys/values bound per generation.

    It has no parameters: the ``to_k_ip``/``to_v_ip`` layers live in the injector, so attaching
    adds nothing to the UNet's ``state_dict``.
    """

    def __init__(self, original: Any, heads: int):
        super().__init__()
        # Not a registered submodule: the replaced processor must come back untouched on detach.
        self.__dict__["original"] = original
        self.heads = heads
        self.bound: BoundKV | None = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        bound = self.bound
        if bound is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        if bound.key.device != query.device or bound.key.dtype != query.dtype:
            bound = self.bound = bound.to(query)
        rows, ip_key, ip_value, ip_mask = bound.select(batch_size)
        image = F.scaled_dot_product_attention(query[rows], ip_key, ip_value, attn_mask=ip_mask, dropout_p=0.0, is_causal=False)
        image = image.transpose(1, 2).reshape(image.shape[0], -1, attn.heads * head_dim).to(query.dtype)
        # A Python float would be baked into a compiled graph (a guard on its value); the tensor is an input.
        scale = bound.scale_tensor if torch.compiler.is_compiling() else bound.scale
        if rows == slice(0, batch_size):
            hidden_states = hidden_states + scale * image
        else:  # only the conditional half of a guidance batch reads the reference
            hidden_states = torch.cat([hidden_states[: rows.start], hidden_states[rows] + scale * image])

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def extra_repr(self) -> str:
        return f"heads={self.heads}, original={type(self.original).__name__}, bound={self.bound is not None}"
