"""Projectors: turn condition tokens into the image tokens the decoupled cross-attention reads.

Three designs, all written from the published descriptions:

- ``linear``: IP-Adapter's ``ImageProjModel``. Every input token becomes ``num_tokens`` tokens:
  ``LayerNorm(Linear(x).reshape(num_tokens, cross_dim))``.
- ``resampler``: IP-Adapter Plus' perceiver resampler. ``num_tokens`` learned latents attend, layer
  after layer, to ``concat(inputs, latents)``; it reads a *set* of tokens (one reference's CLIP
  hidden states) and returns ``num_tokens`` tokens whatever the set's length.
- ``mlp``: EasyRef's (and IP-Adapter Full's) ``Linear - GELU - Linear - LayerNorm``, token by token.

:func:`project_condition` applies a projector to a :class:`refcond.Condition`, running a set-wise
projector once per reference (``source``) as diffusers runs the resampler once per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from refcond import MIXED_SOURCE, Condition


class LinearProjector(nn.Module):
    """IP-Adapter base projector: each input token -> ``num_tokens`` tokens of size ``output_dim``."""

    tokenwise = True

    def __init__(self, input_dim: int, output_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.output_dim = output_dim
        self.proj = nn.Linear(input_dim, num_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, L, input_dim]`` -> ``[M, L * num_tokens, output_dim]`` (token ``l`` gives outputs ``l*k .. l*k+k-1``)."""
        m, length, _ = x.shape
        out = self.proj(x).reshape(m, length * self.num_tokens, self.output_dim)
        return self.norm(out)

    def tokens_per_input(self) -> int:
        return self.num_tokens


#: The official ``Sequential`` names of the MLP projector's layers (``proj.{0,2,3}``, in IP-Adapter
#: Full's ``image_proj`` and EasyRef's ``image_proj_model``) -> :class:`MLPProjector`'s.
MLP_OFFICIAL_NAMES = {"proj.0": "fc1", "proj.2": "fc2", "proj.3": "norm"}


class MLPProjector(nn.Module):
    """EasyRef / IP-Adapter Full projector: ``LayerNorm(fc2(GELU(fc1(x))))`` on every token."""

    tokenwise = True

    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or input_dim
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, L, input_dim]`` -> ``[M, L, output_dim]``."""
        return self.norm(self.fc2(F.gelu(self.fc1(x))))

    def tokens_per_input(self) -> int:
        return 1


class ResamplerBlock(nn.Module):
    """One perceiver layer: latents attend to ``concat(inputs, latents)``, then a feed-forward, both residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_inputs = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, dim * ff_mult, bias=False)
        self.ff_out = nn.Linear(dim * ff_mult, dim, bias=False)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        m, length, inner = t.shape
        return t.view(m, length, self.heads, inner // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        inputs = self.norm_inputs(x)
        normed = self.norm_latents(latents)
        context = torch.cat([inputs, normed], dim=1)
        q = self._split_heads(self.to_q(normed))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        attended = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dim_head)) v
        m, heads, length, dim_head = attended.shape
        latents = self.to_out(attended.transpose(1, 2).reshape(m, length, heads * dim_head)) + latents
        return self.ff_out(F.gelu(self.ff_in(self.ff_norm(latents)))) + latents


class ResamplerProjector(nn.Module):
    """IP-Adapter Plus perceiver resampler: a set of tokens -> ``num_tokens`` tokens of size ``output_dim``."""

    tokenwise = False

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        num_tokens: int,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        ff_mult: int,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_tokens, dim) / math.sqrt(dim))
        self.proj_in = nn.Linear(input_dim, dim)
        self.layers = nn.ModuleList(ResamplerBlock(dim, heads, dim_head, ff_mult) for _ in range(depth))
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, T, input_dim]`` (M sets of T tokens) -> ``[M, num_tokens, output_dim]``."""
        x = self.proj_in(x)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm_out(self.proj_out(latents))


Projector = LinearProjector | MLPProjector | ResamplerProjector


def project_condition(projector: nn.Module, condition: Condition) -> tuple[torch.Tensor, torch.Tensor]:
    """Project a condition: ``(tokens [B, K, output_dim], mask [B, K])``.

    A token-wise projector maps every token (padding is projected too, and stays masked out). A
    set-wise projector (the resampler) runs once per reference of each group, the references told
    apart by ``source``; tokens with source -1 form one set. The outputs of a group's sets are
    concatenated in the order the sets first appear, so ``concat`` over N references gives
    ``N * num_tokens`` tokens, as diffusers does for several images.
    """
    weight = next(projector.parameters())
    tokens = condition.tokens.to(device=weight.device, dtype=weight.dtype)
    if tokens.is_inference() and not torch.is_inference_mode_enabled():
        tokens = tokens.clone()  # an encoding made under inference_mode, projected where autograd may record
    if projector.tokenwise:
        out = projector(tokens)
        mask = condition.mask.to(weight.device).repeat_interleave(projector.tokens_per_input(), dim=1)
        return out, mask

    sets: list[torch.Tensor] = []
    owners: list[int] = []
    for b in range(condition.batch_size):
        valid = condition.mask[b].to(tokens.device)
        row, source = tokens[b][valid], condition.source[b].to(tokens.device)[valid]
        for s in _in_order_of_appearance(source):
            sets.append(row[source == s])
            owners.append(b)
    outputs = _project_sets(projector, sets)
    rows = [torch.cat([o for o, owner in zip(outputs, owners) if owner == b]) for b in range(condition.batch_size)]
    return _pad_rows(rows)


def _in_order_of_appearance(source: torch.Tensor) -> list[int]:
    seen: dict[int, None] = {}
    for s in source.tolist():
        seen.setdefault(int(s), None)
    return list(seen) if seen else [MIXED_SOURCE]


def _project_sets(projector: nn.Module, sets: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the projector on every set, batching sets of equal length into one call."""
    outputs: list[torch.Tensor | None] = [None] * len(sets)
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(sets):
        by_length.setdefault(s.shape[0], []).append(i)
    for indices in by_length.values():
        projected = projector(torch.stack([sets[i] for i in indices]))
        for j, i in enumerate(indices):
            outputs[i] = projected[j]
    return outputs  # type: ignore[return-value]


def _pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(r.shape[0] for r in rows)
    if all(r.shape[0] == length for r in rows):
        return torch.stack(rows), torch.ones(len(rows), length, dtype=torch.bool, device=rows[0].device)
    tokens = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for b, r in enumerate(rows):
        tokens[b, : r.shape[0]] = r
        mask[b, : r.shape[0]] = True
    return tokens, mask
