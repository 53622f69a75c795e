"""Configuration of the ``cross-attention`` injector."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from refcond import ComponentConfig

#: Upper bounds of the sizes, far above any published adapter (IP-Adapter: 4 or 16 tokens, a
#: 4-layer resampler of width 768-1280, 64-d heads) and low enough that no single one can exhaust
#: memory on its own; :data:`MAX_PROJECTOR_PARAMETERS` bounds them together.
MAX_TOKENS = 4096
MAX_DIM = 65536
MAX_DEPTH = 64
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_FF_MULT = 16
MAX_SCALE = 100.0
#: The most parameters a projector may have (2**29, about 537 million: 2 GiB in float32), six times
#: the largest published one (IP-Adapter Plus' resampler for SDXL, about 90 million). Counted before
#: anything is allocated, with the sizes left ``None`` (taken from the model when built) at
#: :data:`ASSUMED_MODEL_DIM`.
MAX_PROJECTOR_PARAMETERS = 2**29
#: The size a ``None`` dimension is counted at when the config is validated: SDXL's cross-attention
#: size, the largest of the supported UNets (SD1.5: 768, SD2: 1024), and more than the CLIP and
#: Qwen2-VL-2B features the built-in encoders emit (1280 pooled / 1664 tokens, 1536).
ASSUMED_MODEL_DIM = 2048


class CrossAttentionConfig(ComponentConfig):
    """Options of the ``cross-attention`` injector (decoupled cross-attention, as in IP-Adapter).

    The projector's input size comes from the encoder and aggregator, its output size and the
    per-layer sizes from the backbone's UNet; only the projector's own shape is set here. Every
    size has an upper bound, and the projector as a whole may have at most
    :data:`MAX_PROJECTOR_PARAMETERS` parameters (:meth:`projector_parameters`), checked when the
    config is validated, before anything is built.
    """

    projector: Literal["linear", "resampler", "mlp"] = Field(
        default="linear",
        description="'linear': IP-Adapter's Linear+LayerNorm (pooled embeddings); 'resampler': IP-Adapter Plus' "
        "perceiver resampler (token sequences, one reference at a time); 'mlp': EasyRef's Linear-GELU-Linear-LayerNorm.",
    )
    num_tokens: int = Field(
        default=4,
        ge=1,
        le=MAX_TOKENS,
        description="'linear': output tokens per input token; 'resampler': learned latent queries, i.e. output tokens "
        f"per reference. Ignored by 'mlp' (one output token per input token). 1 to {MAX_TOKENS}.",
    )
    input_dim: int | None = Field(
        default=None,
        ge=1,
        le=MAX_DIM,
        description="Token size the projector was made for. None takes it from the encoder and aggregator; when set "
        f"(an imported checkpoint sets it) a different encoder size is reported as an error before loading. At most {MAX_DIM}.",
    )
    resampler_dim: int | None = Field(
        default=None, ge=1, le=MAX_DIM, description=f"Width of the resampler's latents. None = the UNet's cross-attention dim. At most {MAX_DIM}."
    )
    resampler_depth: int = Field(default=4, ge=1, le=MAX_DEPTH, description=f"Number of resampler layers, 1 to {MAX_DEPTH}.")
    resampler_heads: int | None = Field(
        default=None,
        ge=1,
        le=MAX_HEADS,
        description=f"Attention heads of the resampler. None = max(1, resampler_dim // resampler_dim_head). At most {MAX_HEADS}.",
    )
    resampler_dim_head: int = Field(
        default=64, ge=1, le=MAX_HEAD_DIM, description=f"Size of one resampler attention head (64 in IP-Adapter Plus), 1 to {MAX_HEAD_DIM}."
    )
    resampler_ff_mult: int = Field(
        default=4, ge=1, le=MAX_FF_MULT, description=f"Expansion ratio of the resampler's feed-forward layers, 1 to {MAX_FF_MULT}."
    )
    mlp_hidden_dim: int | None = Field(
        default=None, ge=1, le=MAX_DIM, description=f"Hidden width of the 'mlp' projector. None = its input size. At most {MAX_DIM}."
    )
    scale: float = Field(
        default=1.0,
        ge=-MAX_SCALE,
        le=MAX_SCALE,
        description="Strength of the image attention in every layer; multiplied by the call's reference_scale. "
        f"A finite number from -{MAX_SCALE:g} to {MAX_SCALE:g}.",
    )

    @model_validator(mode="after")
    def _projector_size(self) -> CrossAttentionConfig:
        count = self.projector_parameters()
        if count > MAX_PROJECTOR_PARAMETERS:
            raise ValueError(
                f"the {self.projector} projector would have about {count / 1e9:.3g} billion parameters (sizes left None counted "
                f"at {ASSUMED_MODEL_DIM}), more than the {MAX_PROJECTOR_PARAMETERS / 1e9:.3g} billion allowed: "
                f"lower {self._size_fields()}"
            )
        return self

    def _size_fields(self) -> str:
        if self.projector == "linear":
            return "num_tokens or input_dim"
        if self.projector == "mlp":
            return "mlp_hidden_dim or input_dim"
        return "resampler_dim, resampler_depth, resampler_heads, resampler_dim_head or resampler_ff_mult"

    def projector_parameters(self, input_dim: int | None = None, output_dim: int | None = None) -> int:
        """How many parameters the projector has for these token sizes (``None``: :attr:`input_dim`, else
        :data:`ASSUMED_MODEL_DIM`), computed without building it."""
        i = input_dim or self.input_dim or ASSUMED_MODEL_DIM
        o = output_dim or ASSUMED_MODEL_DIM
        if self.projector == "linear":
            return i * self.num_tokens * o + self.num_tokens * o + 2 * o
        if self.projector == "mlp":
            hidden = self.mlp_hidden_dim or i
            return i * hidden + hidden + hidden * o + o + 2 * o
        dim = self.resampler_dim or o
        heads = self.resampler_heads or max(1, dim // self.resampler_dim_head)
        inner = heads * self.resampler_dim_head
        block = 6 * dim + 4 * dim * inner + 2 * dim * dim * self.resampler_ff_mult
        return self.num_tokens * dim + i * dim + dim + self.resampler_depth * block + dim * o + o + 2 * o
