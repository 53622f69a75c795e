"""The ``reference-tokens`` aggregator: EasyRef's "efficient reference aggregation".

``K`` learnable tokens are appended after the MLLM trunk's output (the ``mllm`` encoder's tokens) and
the whole sequence goes through a copy of the MLLM's last decoder layer and final norm; the last
``K`` outputs are the condition. The condition has ``K`` tokens whatever the number of references.

Defaults reproduce the official code (``TempleX98/EasyRef``, ``mllm_final_layer``):

* **causal attention** in that layer: the official ``is_causal = False`` is ignored by Qwen2-VL's sdpa
  attention, so reference token ``k`` sees the MLLM tokens and reference tokens ``0..k`` only.
  ``attention="bidirectional"`` lets every token see every token (a new training run's choice: the
  released weights were trained causal);
* **positions restart at 0**: the layer runs as a fresh forward over ``L + K`` tokens with 1-D
  positions ``0..L+K-1`` (on all three M-RoPE axes), not continuing the trunk's;
* the reference tokens start as ``0.1 * randn``.

Padding: the official code appends the reference tokens after the (padded) sequence and encodes one
reference set at a time, so its reference tokens always follow the last real token. Here each row's
real tokens are packed to the right, the reference tokens placed right after them, and positions
count from the row's first real token: every group gets exactly the official single-set result,
whatever the padding of the encoding (left, right, or none).

Weights: ``reference_tokens``, ``layers.0.*`` and ``norm.weight``: the official ``mllm_final_layer.*``
keys without the prefix.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from refcond_encoders import run_decoder

from refcond import (
    MIXED_SOURCE,
    BuildContext,
    ComponentConfig,
    Condition,
    ConfigError,
    ReferenceEncoding,
)


#: The most reference tokens: 64 times the official count, and few enough that the tokens and the
#: attention over them fit in memory next to any MLLM.
MAX_REFERENCE_TOKENS = 4096


class ReferenceTokensConfig(ComponentConfig):
    """Options of the ``reference-tokens`` aggregator."""

    num_tokens: int = Field(
        default=64,
        gt=0,
        le=MAX_REFERENCE_TOKENS,
        description=f"Number of learnable reference tokens K = condition length (official: 64), 1 to {MAX_REFERENCE_TOKENS}.",
    )
    attention: Literal["causal", "bidirectional"] = Field(
        default="causal",
        description="Attention in the copied last layer. 'causal' is what the official EasyRef weights were trained with; "
        "'bidirectional' lets every reference token see all others (for new training runs).",
    )


class ReferenceTokensAggregator(torch.nn.Module):
    """K learnable reference tokens read the MLLM sequence through a copy of its last decoder layer (EasyRef).

    :param layer: a Qwen2-VL decoder layer (a copy: this module trains it).
    :param norm: the final RMSNorm (a copy).
    :param rotary_emb: the decoder's rotary embedding (no weights; kept outside the module tree so
        ``.to(dtype)`` leaves its float32 frequencies alone).
    """

    def __init__(
        self,
        layer: torch.nn.Module,
        norm: torch.nn.Module,
        rotary_emb: torch.nn.Module,
        config: ReferenceTokensConfig | None = None,
    ):
        super().__init__()
        self.config = config if config is not None else ReferenceTokensConfig()
        weight = norm.weight
        self.hidden_size = int(weight.shape[0])
        self.reference_tokens = torch.nn.Parameter(
            0.1
            * torch.randn(
                self.config.num_tokens,
                self.hidden_size,
                device=weight.device,
                dtype=weight.dtype,
            )
        )
        self.layers = torch.nn.ModuleList([layer])
        self.norm = norm
        self.__dict__["rotary_emb"] = rotary_emb

    @classmethod
    def from_config(
        cls, config: ReferenceTokensConfig, context: BuildContext
    ) -> ReferenceTokensAggregator:
        """Copy the last decoder layer, final norm and rotary embedding from the composition's encoder."""
        encoder: Any = context.encoder
        if not callable(getattr(encoder, "final_layer", None)):
            raise ConfigError(
                "aggregator 'reference-tokens' needs an encoder that hands over its MLLM's last decoder layer "
                f"(a final_layer() method, as encoder 'mllm' has); got {type(encoder).__name__ if encoder is not None else 'no encoder'}. "
                "Use encoder 'mllm' with this aggregator."
            )
        layer, norm, rotary_emb = encoder.final_layer()
        return cls(layer, norm, rotary_emb, config)

    def output_dim(self, input_dim: int) -> int:
        return self.hidden_size

    def forward(
        self, encoding: ReferenceEncoding, weights: torch.Tensor | None = None
    ) -> Condition:
        if weights is not None:
            raise ConfigError(
                "aggregator 'reference-tokens' takes no reference weights: references are combined by the MLLM's attention. "
                "Drop reference_weights, or scale the whole condition with reference_scale."
            )
        if encoding.dim != self.hidden_size:
            raise ConfigError(
                f"aggregator 'reference-tokens' reads tokens of size {self.hidden_size} (its MLLM's hidden size), got {encoding.dim}. "
                "Use it with the encoder 'mllm' it was built from."
            )
        hidden, valid = self._sequence(encoding)
        out = run_decoder(
            self.layers,
            self.__dict__["rotary_emb"],
            hidden,
            valid,
            causal=self.config.attention == "causal",
        )
        tokens = self.norm(out)[:, -self.config.num_tokens :]
        batch, length = tokens.shape[:2]
        return Condition(
            tokens,
            torch.ones(batch, length, dtype=torch.bool, device=tokens.device),
            torch.full(
                (batch, length), MIXED_SOURCE, dtype=torch.long, device=tokens.device
            ),
        )

    def _sequence(
        self, encoding: ReferenceEncoding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: padding, the real tokens, then the reference tokens (``[B, n_max + K, D]`` and its mask)."""
        tokens = encoding.tokens.to(self.reference_tokens.dtype)
        lengths = encoding.mask.sum(dim=1).tolist()
        longest = max(lengths)
        references = self.reference_tokens.to(tokens.device)
        rows, masks = [], []
        for b, n in enumerate(lengths):
            if n == 0:
                raise ConfigError(
                    f"aggregator 'reference-tokens': group {b} has no tokens (its mask is all False)."
                )
            pad = longest - n
            rows.append(
                torch.cat(
                    [
                        tokens.new_zeros(pad, tokens.shape[-1]),
                        tokens[b][encoding.mask[b]],
                        references,
                    ]
                )
            )
            masks.append(
                torch.arange(longest + len(references), device=tokens.device) >= pad
            )
        return torch.stack(rows), torch.stack(masks)
