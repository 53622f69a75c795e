"""refcond.unet: the cross-attention layer order and per-block strengths, checked against diffusers' own readings."""

from __future__ import annotations

import pytest
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales  # the oracle: diffusers' expansion

from refcond import ConfigError, cross_attention_layers, layer_scales
from refcond.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

SCALES = [
    0.7,
    {"up": {"block_0": [0.0, 1.0]}},  # InstantStyle: one transformer of one block
    {"down": 0.5, "mid": 0.25, "up": {"block_1": 0.8}},
    {"down": {"block_1": [0.3]}, "up": 2.0},  # a one-element list counts for every transformer of the block
    {"mid": [1.5]},
    {},
]


def diffusers_reading(unet, names: list[str], scale, default: float) -> list[float]:
    """Per layer, the value diffusers' set_ip_adapter_scale / set_adapters give it: the last matching prefix wins."""
    (expanded,) = _maybe_expand_lora_scales(unet, [scale], default_scale=default)
    if not isinstance(expanded, dict):
        return [float(expanded)] * len(names)
    out = []
    for name in names:
        value = default
        for prefix, v in expanded.items():
            if name.startswith(prefix):
                value = v
        out.append(float(value))
    return out


@pytest.mark.parametrize("build", [tiny_sd15_pipeline, tiny_sdxl_pipeline], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("default", [0.0, 1.0])
@pytest.mark.parametrize("scale", SCALES, ids=range(len(SCALES)))
def test_per_block_strengths_read_as_diffusers_reads_them(build, default, scale) -> None:
    unet = build().unet
    names = list(unet.attn_processors)  # self- and cross-attention layers alike
    assert layer_scales(unet, names, scale, default=default) == diffusers_reading(unet, names, scale, default)


def test_base_multiplies_every_value_and_none_means_base() -> None:
    unet = tiny_sd15_pipeline().unet
    names = [layer.name for layer in cross_attention_layers(unet)]
    assert layer_scales(unet, names, None, base=0.6) == [0.6] * len(names)
    halves = layer_scales(unet, names, {"up": 1.0}, base=0.5)
    assert halves == [0.5 if name.startswith("up_blocks") else 0.0 for name in names]


def test_cross_attention_layers_follow_attn_processors_order() -> None:
    unet = tiny_sdxl_pipeline().unet
    processors = list(unet.attn_processors)
    layers = cross_attention_layers(unet)
    assert [layer.name for layer in layers] == [name for name in processors if name.endswith("attn2.processor")]
    assert [layer.index for layer in layers] == [processors.index(layer.name) for layer in layers]
    for layer in layers:
        attention = unet.get_submodule(layer.module_path)
        assert (layer.hidden_size, layer.cross_attention_dim, layer.heads) == (attention.to_k.out_features, attention.to_k.in_features, attention.heads)


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        ({"up": {"block_9": 1.0}}, r"up has no block\(s\) with attention layers named \['block_9'\]"),
        ({"left": 1.0}, r"unknown block group\(s\) \['left'\]"),
        ({"up": {"block_0": [1.0, 2.0, 3.0]}}, r"up\.block_0: the block has 2 transformer\(s\), so give 1 or 2 values, got 3"),
        ({"mid": "high"}, r"must be a number"),
        (float("nan"), r"must be a finite number, got nan"),
        ({"down": float("inf")}, r"reference_scale down\.block_0 must be a finite number, got inf"),
        (True, r"must be a number"),
    ],
)
def test_bad_strengths_name_what_is_wrong(scale, message) -> None:
    unet = tiny_sd15_pipeline().unet
    with pytest.raises(ConfigError, match=message):
        layer_scales(unet, list(unet.attn_processors), scale)


def test_negative_strengths_are_allowed() -> None:
    unet = tiny_sd15_pipeline().unet
    names = list(unet.attn_processors)
    assert layer_scales(unet, names, -0.5) == [-0.5] * len(names)
