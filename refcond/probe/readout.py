"""The probe's readout: one learned query cross-attends over the condition tokens, then a classifier.

It reads a :class:`refcond.Condition` the way a UNet's cross-attention reads it — a query attends
over the tokens (padding masked out) through key and value projections — so what the readout can
get out of a condition is what an injected UNet could. Every aggregator gets the same readout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refcond.contracts import Condition
from refcond.probe.render import NUM_CLASSES


class Readout(torch.nn.Module):
    """One learned query, multi-head cross-attention over the condition, then LayerNorm-MLP to class logits.

    :param condition_dim: size of the condition tokens (the aggregator's ``output_dim``).
    :param width: size of the query and of the attention.
    :param heads: attention heads (dividing ``width``).
    """

    def __init__(self, condition_dim: int, width: int = 64, heads: int = 4, classes: int = NUM_CLASSES):
        super().__init__()
        if width % heads:
            raise ValueError(f"readout width {width} is not divisible by heads={heads}")
        self.heads = heads
        self.query = torch.nn.Parameter(torch.randn(1, width) / width**0.5)
        self.to_k = torch.nn.Linear(condition_dim, width, bias=False)
        self.to_v = torch.nn.Linear(condition_dim, width, bias=False)
        self.to_out = torch.nn.Linear(width, width)
        self.classifier = torch.nn.Sequential(
            torch.nn.LayerNorm(width), torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, classes)
        )

    def forward(self, condition: Condition) -> torch.Tensor:
        """Class logits ``[B, classes]`` of a condition ``[B, K, D]``."""
        batch, length, _ = condition.tokens.shape
        width = self.query.shape[-1]
        split = lambda t: t.view(batch, -1, self.heads, width // self.heads).transpose(1, 2)  # noqa: E731
        q = split(self.query.expand(batch, -1, -1))
        k, v = split(self.to_k(condition.tokens)), split(self.to_v(condition.tokens))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=condition.mask[:, None, None, :])
        return self.classifier(self.to_out(attended.transpose(1, 2).reshape(batch, width)))
