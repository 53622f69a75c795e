"""Test helpers for EasyRef compositions.

- :func:`tiny_easyref_overrides`: settings that run the ``easyref`` composition on the tiny Qwen2-VL;
- :func:`fabricate_official_checkpoint`: an official-layout file with random weights for any UNet;
- :class:`OfficialProcessor`, :func:`official_unet`, :func:`official_projection`: the official UNet
  side (``LoRAIPAttnProcessor2_0`` / ``LoRAAttnProcessor2_0``, ``MLPProjModel``) written out from its
  equations, the oracle of the parity tests and the official path of the benchmarks.

Nothing here downloads: the MLLM is :func:`refcond.testing.save_tiny_qwen2vl`'s folder and the UNet
is the pipeline's own (the tiny test pipelines, or any real one).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from refcond import cross_attention_layers
from refcond.testing import TINY_QWEN2VL_MAX_PIXELS, TINY_QWEN2VL_MIN_PIXELS, tiny_qwen2vl

#: Reference tokens and LoRA rank of the tiny settings (64 and 128 in the release).
TINY_NUM_TOKENS = 8
TINY_LORA_RANK = 4


def tiny_easyref_overrides(qwen2vl_dir: str | Path, **encoder_config: Any) -> dict[str, Any]:
    """Role overrides that make the ``easyref`` composition run on the tiny Qwen2-VL in ``qwen2vl_dir``.

    ``refcond.from_pipe(pipe, "easyref", **tiny_easyref_overrides(folder))``: float32, the tiny
    resolution rule, 8 reference tokens, rank-4 LoRA. ``encoder_config`` adds encoder settings.
    """
    encoder = {"model": str(qwen2vl_dir), "dtype": "float32", "min_pixels": TINY_QWEN2VL_MIN_PIXELS, "max_pixels": TINY_QWEN2VL_MAX_PIXELS, **encoder_config}
    return {
        "encoder": {"config": encoder},
        "aggregator": {"config": {"num_tokens": TINY_NUM_TOKENS}},
        "injectors": {"lora": {"config": {"layers": {"rank": TINY_LORA_RANK}}}},
    }


def fabricate_official_checkpoint(
    unet: torch.nn.Module,
    *,
    mllm: torch.nn.Module | None = None,
    num_tokens: int = TINY_NUM_TOKENS,
    lora_rank: int | None = TINY_LORA_RANK,
    include_mllm: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A state dict in the official EasyRef layout for ``unet`` and a Qwen2-VL, with seeded random weights.

    Shapes follow the official modules: ``image_proj_model.proj.{0,2,3}`` (Linear-GELU-Linear-LayerNorm
    from the MLLM's hidden size to the UNet's cross-attention dim), ``mllm_final_layer.*`` (reference
    tokens, a copy of the MLLM's last decoder layer and final norm, perturbed), ``to_k_ip``/``to_v_ip``
    on every cross-attention layer and, with ``lora_rank``, non-zero LoRA ``down``/``up`` weights on
    ``to_q/to_k/to_v/to_out`` of every attention layer. ``include_mllm`` adds the fine-tuned MLLM
    (``multimodal_llm.*`` in transformers 4.x names, without the last layer, with ``lm_head``).

    :param mllm: the Qwen2-VL the file is made for; default :func:`refcond.testing.tiny_qwen2vl`.
    """
    mllm = mllm if mllm is not None else tiny_qwen2vl()
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=generator)

    language = mllm.model.language_model
    hidden = int(language.norm.weight.shape[0])
    layers = cross_attention_layers(unet)
    cross_dim = layers[0].cross_attention_dim
    sd: dict[str, torch.Tensor] = {
        "image_proj_model.proj.0.weight": rand(hidden, hidden),
        "image_proj_model.proj.0.bias": rand(hidden),
        "image_proj_model.proj.2.weight": rand(cross_dim, hidden),
        "image_proj_model.proj.2.bias": rand(cross_dim),
        "image_proj_model.proj.3.weight": 1 + rand(cross_dim),
        "image_proj_model.proj.3.bias": rand(cross_dim),
        "mllm_final_layer.reference_tokens": rand(num_tokens, hidden),
        "mllm_final_layer.norm.weight": language.norm.weight.detach() + rand(hidden),
    }
    for key, value in language.layers[-1].state_dict().items():
        sd[f"mllm_final_layer.layers.0.{key}"] = value.detach() + rand(*value.shape, scale=0.02)
    for layer in layers:
        for name in ("to_k_ip", "to_v_ip"):
            sd[f"unet.{layer.name}.{name}.weight"] = rand(layer.hidden_size, layer.cross_attention_dim)
    if lora_rank is not None:
        for processor in unet.attn_processors:
            attention = processor.removesuffix(".processor")
            for target, module in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
                linear = unet.get_submodule(f"{attention}.{module}")
                sd[f"unet.{processor}.{target}_lora.down.weight"] = rand(lora_rank, linear.in_features)
                sd[f"unet.{processor}.{target}_lora.up.weight"] = rand(linear.out_features, lora_rank)
    if include_mllm:
        for key, value in mllm.state_dict().items():
            official = _official_mllm_key(key, len(language.layers))
            if official is not None:
                sd[official] = value.detach() + rand(*value.shape, scale=0.02)
    return {key: value.contiguous() for key, value in sd.items()}


def _official_mllm_key(key: str, num_layers: int) -> str | None:
    """A transformers-5 Qwen2-VL key in the official (transformers 4.x) names; None for the last layer."""
    if key.startswith("model.language_model.layers."):
        index = int(key.split(".")[3])
        return None if index == num_layers - 1 else "multimodal_llm.model." + key.removeprefix("model.language_model.")
    if key.startswith("model.language_model."):
        return "multimodal_llm.model." + key.removeprefix("model.language_model.")
    if key.startswith("model.visual."):
        return "multimodal_llm.visual." + key.removeprefix("model.visual.")
    return "multimodal_llm." + key  # lm_head.weight


# -- the official UNet math (parity oracle; also the official path in the benchmarks) -----------------


class OfficialProcessor:
    """``LoRAIPAttnProcessor2_0`` (with ``ip``) / ``LoRAAttnProcessor2_0`` (without), from the official equations."""

    def __init__(self, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], ip: tuple[torch.Tensor, torch.Tensor] | None, num_tokens: int, scale: float):
        self.lora, self.ip, self.num_tokens, self.scale = lora, ip, num_tokens, scale

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        down, up = self.lora[name]
        return F.linear(F.linear(x, down), up)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, attention_mask: Any = None, temb: Any = None, **_: Any) -> torch.Tensor:
        assert hidden_states.ndim == 3 and attention_mask is None
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states) + self._lora("to_q", hidden_states)
        if encoder_hidden_states is None:
            text, reference = hidden_states, None
        else:
            end = encoder_hidden_states.shape[1] - self.num_tokens
            text, reference = encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]
        key = attn.to_k(text) + self._lora("to_k", text)
        value = attn.to_v(text) + self._lora("to_v", text)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value))
        if self.ip is not None and reference is not None:
            to_k_ip, to_v_ip = self.ip
            image = F.scaled_dot_product_attention(heads(query), heads(F.linear(reference, to_k_ip)), heads(F.linear(reference, to_v_ip)))
            out = out + self.scale * image
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[-1])
        out = attn.to_out[0](out) + self._lora("to_out", out)
        return attn.to_out[1](out)


def official_unet(unet: torch.nn.Module, sd: dict[str, torch.Tensor], num_tokens: int, scale: float) -> torch.nn.Module:
    """A copy of the plain UNet with the official processors and the file's weights installed."""
    unet = copy.deepcopy(unet)
    processors = {}
    for name in unet.attn_processors:
        lora = {t: (sd[f"unet.{name}.{t}_lora.down.weight"], sd[f"unet.{name}.{t}_lora.up.weight"]) for t in ("to_q", "to_k", "to_v", "to_out")}
        ip = (sd[f"unet.{name}.to_k_ip.weight"], sd[f"unet.{name}.to_v_ip.weight"]) if name.endswith("attn2.processor") else None
        processors[name] = OfficialProcessor(lora, ip, num_tokens, scale)
    unet.set_attn_processor(processors)
    return unet


def official_projection(sd: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """``MLPProjModel``: LayerNorm(Linear(GELU(Linear(x))))."""
    x = F.gelu(F.linear(tokens, sd["image_proj_model.proj.0.weight"], sd["image_proj_model.proj.0.bias"]))
    x = F.linear(x, sd["image_proj_model.proj.2.weight"], sd["image_proj_model.proj.2.bias"])
    return F.layer_norm(x, x.shape[-1:], sd["image_proj_model.proj.3.weight"], sd["image_proj_model.proj.3.bias"])
