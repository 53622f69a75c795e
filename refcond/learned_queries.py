"""The ``learned-queries`` aggregator: K learned queries and the references' tokens attend to each other.

EasyRef's aggregation idea without an MLLM: ``K`` learned query tokens are put in front of every
token of every reference of a group, and ``L`` pre-norm transformer layers run self-attention over
that whole sequence, so references meet each other (and the queries) before anything is pooled.
The ``K`` query outputs, normalised and projected, are the condition: ``K`` tokens whatever the
number of references.

It reads only :attr:`ReferenceEncoding.tokens` and :attr:`ReferenceEncoding.mask`, never
``source``, so any encoder's tokens feed it: pooled CLIP embeddings, CLIP hidden states, DINO
patches, an MLLM's mixed sequence. It adds no positional information: its output does not change
when the references of a group, or the tokens of the sequence, are permuted. Padding (mask
``False``) is never attended to, so a group gives the same condition alone as in a padded batch.

Weights (``aggregator.*`` in a checkpoint): ``queries`` ``[K, width]``, ``input.*`` (the encoder's
``embedding_dim`` -> ``width``), ``layers.<i>.*`` (``attention_norm``, ``qkv``, ``attention_out``,
``feedforward_norm``, ``feedforward.0``, ``feedforward.2``), ``output_norm.*`` and ``output.*``
(``width`` -> ``output_dim``). Fresh weights are drawn from torch's generator (seeded per role by
:func:`refcond.building.build`), on the backbone's device and dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from refcond.config import ComponentConfig
from refcond.contracts import MIXED_SOURCE, BuildContext, Condition, ReferenceEncoding
from refcond.errors import ConfigError

#: The most learned queries (condition tokens).
MAX_QUERIES = 4096
#: The most transformer layers.
MAX_LAYERS = 64
#: The largest width, head count and output size: wider than any UNet's cross-attention (2048) or MLLM (8192).
MAX_WIDTH = 16384
#: The most parameters the aggregator may have (2**29, about 537 million: 2 GiB in float32), checked
#: before anything is allocated, so that no combination of allowed sizes exhausts memory.
MAX_PARAMETERS = 2**29
#: Standard deviation of the fresh queries (ViT / Perceiver convention).
QUERY_INIT_STD = 0.02


class LearnedQueriesConfig(ComponentConfig):
    """Options of the ``learned-queries`` aggregator."""

    num_tokens: int = Field(default=16, ge=1, le=MAX_QUERIES, description=f"Learned queries K = condition tokens, whatever the number of references (1 to {MAX_QUERIES}).")
    layers: int = Field(default=2, ge=1, le=MAX_LAYERS, description=f"Pre-norm transformer layers L over [queries; all references' tokens] (1 to {MAX_LAYERS}).")
    heads: int = Field(default=8, ge=1, le=MAX_WIDTH, description="Attention heads; they must divide width.")
    width: int | None = Field(
        default=None, ge=1, le=MAX_WIDTH, description=f"Size of the tokens inside the layers (up to {MAX_WIDTH}); None = the encoder's embedding_dim."
    )
    output_dim: int | None = Field(
        default=None, ge=1, le=MAX_WIDTH, description=f"Size of the condition tokens (up to {MAX_WIDTH}); None = width."
    )
    ff_mult: int = Field(default=4, ge=1, le=16, description="The feed-forward layer's hidden size, as a multiple of width (1 to 16).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on attention weights and residual branches while training (0 to below 1).")

    def parameter_count(self, input_dim: int) -> int:
        """How many parameters the aggregator has when its encoder's tokens have size ``input_dim``."""
        width = self.width or input_dim
        hidden = self.ff_mult * width
        output = self.output_dim or width
        layer = 4 * width + (3 * width * width + 3 * width) + (width * width + width) + (2 * width * hidden + hidden + width)
        return self.num_tokens * width + (input_dim * width + width) + self.layers * layer + 2 * width + (width * output + output)


class _Layer(torch.nn.Module):
    """One pre-norm transformer layer: ``x + attention(norm(x))``, then ``x + feedforward(norm(x))``."""

    def __init__(self, width: int, heads: int, ff_mult: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.attention_norm = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.attention_out = torch.nn.Linear(width, width)
        self.feedforward_norm = torch.nn.LayerNorm(width)
        self.feedforward = torch.nn.Sequential(
            torch.nn.Linear(width, ff_mult * width), torch.nn.GELU(), torch.nn.Linear(ff_mult * width, width)
        )

    def forward(self, x: torch.Tensor, keys: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Update ``x`` ``[B, S, W]``; ``keys`` ``[B, S]`` bool says which positions may be attended to.

        ``rows``: update only the first ``rows`` positions (the others are read as keys and values,
        and dropped from the output): the last layer needs only the queries' outputs.
        """
        batch, length, width = x.shape
        head_dim = width // self.heads
        q, k, v = self.qkv(self.attention_norm(x)).view(batch, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        if rows is not None:
            x, q = x[:, :rows], q[:, :, :rows]
        p = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :], dropout_p=p)
        attended = attended.transpose(1, 2).reshape(batch, x.shape[1], width)
        x = x + F.dropout(self.attention_out(attended), p, self.training)
        return x + F.dropout(self.feedforward(self.feedforward_norm(x)), p, self.training)


class LearnedQueriesAggregator(torch.nn.Module):
    """K learned queries attend, with every reference's tokens, through L transformer layers; K tokens out.

    :param input_dim: the size of the encoder's tokens (its ``embedding_dim``).
    :param config: the options; ``width`` ``None`` means ``input_dim``.
    """

    def __init__(self, input_dim: int, config: LearnedQueriesConfig | None = None):
        super().__init__()
        self.config = config if config is not None else LearnedQueriesConfig()
        width = self.config.width or input_dim
        if width % self.config.heads:
            raise ConfigError(
                f"aggregator 'learned-queries': width {width}" + (" (the encoder's embedding_dim)" if self.config.width is None else "")
                + f" is not divisible by heads={self.config.heads}: choose heads that divide it, or set width."
            )
        count = self.config.parameter_count(input_dim)
        if count > MAX_PARAMETERS:
            raise ConfigError(
                f"aggregator 'learned-queries' would have {count / 1e9:.3g} billion parameters with {input_dim}-d encoder tokens, "
                f"more than the {MAX_PARAMETERS / 1e9:.3g} billion allowed: choose a smaller width, layers, ff_mult or num_tokens."
            )
        self.input_dim = input_dim
        self.width = width
        self.condition_dim = self.config.output_dim or width
        self.queries = torch.nn.Parameter(QUERY_INIT_STD * torch.randn(self.config.num_tokens, width))
        self.input = torch.nn.Linear(input_dim, width)
        self.layers = torch.nn.ModuleList(
            _Layer(width, self.config.heads, self.config.ff_mult, self.config.dropout) for _ in range(self.config.layers)
        )
        self.output_norm = torch.nn.LayerNorm(width)
        self.output = torch.nn.Linear(width, self.condition_dim)

    @classmethod
    def from_config(cls, config: LearnedQueriesConfig, context: BuildContext) -> LearnedQueriesAggregator:
        """Size the input from the composition's encoder (``embedding_dim``); place it on the backbone's device and dtype."""
        encoder = context.encoder
        dim = getattr(encoder, "embedding_dim", None)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            got = "no encoder" if encoder is None else f"encoder {type(encoder).__name__} with embedding_dim={dim!r}"
            raise ConfigError(
                "aggregator 'learned-queries' sizes its input layer from the encoder's embedding_dim (a positive int), "
                f"but was built with {got}. Build it in a composition that has an encoder."
            )
        aggregator = cls(dim, config)
        backbone = context.backbone
        if backbone is not None:
            aggregator.to(device=backbone.device, dtype=backbone.dtype)
        return aggregator

    def output_dim(self, input_dim: int) -> int:
        return self.condition_dim

    def forward(self, encoding: ReferenceEncoding, weights: torch.Tensor | None = None) -> Condition:
        if weights is not None:
            raise ConfigError(
                "aggregator 'learned-queries' takes no reference weights: its attention decides how much each reference counts. "
                "Drop reference_weights, or scale the whole condition with reference_scale."
            )
        if encoding.dim != self.input_dim:
            raise ConfigError(
                f"aggregator 'learned-queries' was built for tokens of size {self.input_dim} (its encoder's embedding_dim), "
                f"got {encoding.dim}. Use it with the encoder it was built with."
            )
        empty = (~encoding.mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ConfigError(f"aggregator 'learned-queries': group {empty[0]} has no reference tokens (its mask is all False).")
        weight = self.queries
        mask = encoding.mask.to(weight.device)
        tokens = encoding.tokens.to(device=weight.device, dtype=weight.dtype).masked_fill(~mask[..., None], 0)  # padding never reaches a value
        batch, count = encoding.batch_size, self.config.num_tokens
        x = torch.cat([weight.expand(batch, -1, -1), self.input(tokens)], dim=1)
        keys = torch.cat([mask.new_ones(batch, count), mask], dim=1)
        for i, layer in enumerate(self.layers):
            x = layer(x, keys, rows=count if i == len(self.layers) - 1 else None)
        out = self.output(self.output_norm(x))
        return Condition(
            out,
            torch.ones(batch, count, dtype=torch.bool, device=out.device),
            torch.full((batch, count), MIXED_SOURCE, dtype=torch.long, device=out.device),
        )
