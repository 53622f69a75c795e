"""Configuration of the ``cross-attention`` injector."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from refcond import ComponentConfig


class CrossAttentionConfig(ComponentConfig):
    """Options of the ``cross-attention`` injector (decoupled cross-attention, as in IP-Adapter).

    The projector's input size comes from the encoder and aggregator, its output size and the
    per-layer sizes from the backbone's UNet; only the projector's own shape is set here.
    """

    projector: Literal["linear", "resampler", "mlp"] = Field(
        default="linear",
        description="'linear': IP-Adapter's Linear+LayerNorm (pooled embeddings); 'resampler': IP-Adapter Plus' "
        "perceiver resampler (token sequences, one reference at a time); 'mlp': EasyRef's Linear-GELU-Linear-LayerNorm.",
    )
    num_tokens: int = Field(
        default=4,
        ge=1,
        description="'linear': output tokens per input token; 'resampler': learned latent queries, i.e. output tokens "
        "per reference. Ignored by 'mlp' (one output token per input token).",
    )
    input_dim: int | None = Field(
        default=None,
        ge=1,
        description="Token size the projector was made for. None takes it from the encoder and aggregator; when set "
        "(an imported checkpoint sets it) a different encoder size is reported as an error before loading.",
    )
    resampler_dim: int | None = Field(
        default=None, ge=1, description="Width of the resampler's latents. None = the UNet's cross-attention dim."
    )
    resampler_depth: int = Field(default=4, ge=1, description="Number of resampler layers.")
    resampler_heads: int | None = Field(
        default=None, ge=1, description="Attention heads of the resampler. None = max(1, resampler_dim // resampler_dim_head)."
    )
    resampler_dim_head: int = Field(default=64, ge=1, description="Size of one resampler attention head (64 in IP-Adapter Plus).")
    resampler_ff_mult: int = Field(default=4, ge=1, description="Expansion ratio of the resampler's feed-forward layers.")
    mlp_hidden_dim: int | None = Field(default=None, ge=1, description="Hidden width of the 'mlp' projector. None = its input size.")
    scale: float = Field(
        default=1.0,
        description="Strength of the image attention in every layer; multiplied by the call's reference_scale.",
    )
