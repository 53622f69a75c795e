"""Tests of refcond-example: installed, conforming to refcond's contracts, and usable end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from refcond_example import MaxAggregator, PixelStatsConfig, PixelStatsEncoder

import refcond
from refcond import ConfigError, ReferenceEncoding
from refcond.testing import (
    check_aggregator,
    check_encoder,
    check_injector,
)

COMPOSITION = {
    "encoder": {"name": "pixel-stats", "config": {"dim": 16, "tokens": 2}},
    "aggregator": "max",
    "injectors": ["cross-attention"],
}


def test_plugin_is_installed():
    distributions = [info.distribution for info in refcond.load_plugins().plugins()]
    assert "refcond-example" in distributions


def test_components_are_registered_with_their_provenance(plugins):
    for kind, name in [("aggregator", "max"), ("encoder", "pixel-stats")]:
        entry = plugins.registry.get(kind, name)
        assert entry.provenance.distribution == "refcond-example"
        assert entry.description


# -- max ------------------------------------------------------------------------------------------


def test_max_conforms():
    check_aggregator(MaxAggregator(), fixed_length=2)  # 2 tokens per reference in the default encoding


def test_max_takes_the_elementwise_maximum_of_each_groups_references():
    tokens = torch.tensor(
        [
            [[1.0, -5.0], [3.0, 0.0], [2.0, -1.0]],  # group 0: three references, one token each
            [[-2.0, -3.0], [0.0, 0.0], [0.0, 0.0]],  # group 1: one reference, then padding (zeros)
        ]
    )
    mask = torch.tensor([[True, True, True], [True, False, False]])
    source = torch.tensor([[0, 1, 2], [0, -1, -1]])
    condition = MaxAggregator()(ReferenceEncoding(tokens, mask, source))
    assert condition.tokens.tolist() == [[[3.0, 0.0]], [[-2.0, -3.0]]]  # padding never wins
    assert condition.mask.all() and (condition.source == -1).all()


def test_max_refuses_weights_and_uneven_references():
    encoding = ReferenceEncoding(torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool), torch.tensor([[0, 0, 1]]))
    with pytest.raises(ConfigError, match="same number of tokens from every reference; group 0 has \\[1, 2\\]"):
        MaxAggregator()(encoding)
    with pytest.raises(ConfigError, match="takes no reference weights"):
        MaxAggregator()(encoding, weights=torch.ones(1, 2))


# -- pixel-stats ----------------------------------------------------------------------------------


def test_pixel_stats_conforms_and_chains_into_max():
    encoder = PixelStatsEncoder(PixelStatsConfig(dim=16, tokens=3))
    assert encoder.reads_prompt is False  # the pipeline encodes a group once, whatever the prompt
    encoding = check_encoder(encoder)
    assert encoding.mask.sum(dim=1).tolist() == [6, 3]  # 2 and 1 references, 3 tokens each
    check_aggregator(MaxAggregator(), encoding, fixed_length=3)


def test_pixel_stats_reads_colours_and_is_reproducible():
    red, blue = Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))
    encoder = PixelStatsEncoder(PixelStatsConfig(dim=8))
    stats = encoder.statistics([red, blue])
    assert stats.shape == (2, 3 * (2 + 3))
    assert stats[0, :3].tolist() == [1.0, 0.0, 0.0] and stats[1, :3].tolist() == [0.0, 0.0, 1.0]  # channel means
    same_seed = PixelStatsEncoder(PixelStatsConfig(dim=8))
    assert torch.equal(encoder.encode([[red]]).tokens, same_seed.encode([[red]]).tokens)
    assert not torch.equal(encoder.encode([[red]]).tokens, encoder.encode([[blue]]).tokens)


def test_pixel_stats_config_errors_name_the_field(sd15_pipe):
    with pytest.raises(ConfigError, match="unknown field 'dims'. Did you mean 'dim'"):
        refcond.from_pipe(sd15_pipe, {**COMPOSITION, "encoder": {"name": "pixel-stats", "config": {"dims": 8}}})
    with pytest.raises(ConfigError, match="quantiles must lie in \\[0, 1\\]"):
        refcond.from_pipe(sd15_pipe, {**COMPOSITION, "encoder": {"name": "pixel-stats", "config": {"quantiles": [0.5, 2]}}})


# -- end to end -----------------------------------------------------------------------------------


def _generate(pipe, **kwargs):
    return pipe("a red square", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture
def needs_cross_attention(plugins):
    if "cross-attention" not in plugins.registry.names("injector"):
        pytest.skip("the cross-attention injector (refcond-injectors) is not installed")


@pytest.mark.usefixtures("needs_cross_attention")
def test_example_components_drive_a_generation(sd15_pipe, references, tmp_path):
    plain = _generate(sd15_pipe)
    rp = refcond.from_pipe(sd15_pipe, COMPOSITION)

    conditioned = _generate(rp, references=references)
    assert conditioned.shape == plain.shape == (1, 32, 32, 3)
    assert np.isfinite(conditioned).all()
    assert not np.allclose(conditioned, plain, atol=1e-4)

    # The encoder's weights travel in refcond checkpoints under the "encoder." role.
    path = rp.save(tmp_path / "example.safetensors")
    assert any(key.startswith("encoder.proj.") for key in rp.state_dict())
    rp.detach()
    assert np.array_equal(_generate(sd15_pipe), plain)
    # Detached, the injector passes the contract checks on the plain UNet (one injector per UNet at a time),
    # fed conditions of the max aggregator's size: pixel-stats' dim.
    check_injector(rp.injectors[0], sd15_pipe.unet, dim=16)

    reloaded = refcond.load(path, sd15_pipe)
    assert reloaded.composition.encoder.name == "pixel-stats"
    assert np.allclose(_generate(reloaded, references=references), conditioned, atol=1e-6)
    reloaded.detach()


def test_pixel_stats_sizes_are_bounded_before_the_projection_is_allocated(sd15_pipe):
    for config, message in (({"dim": 10**11}, r"dim: Input should be less than or equal to 4096"), ({"seed": -(2**63) - 1}, r"seed: Input should be greater than or equal to -9223372036854775808")):
        with pytest.raises(ConfigError, match=message):
            refcond.from_pipe(sd15_pipe, {**COMPOSITION, "encoder": {"name": "pixel-stats", "config": config}})
