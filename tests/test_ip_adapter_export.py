"""Exporting a composition to the official IP-Adapter layout (``refcond_injectors.to_ip_adapter`` /
``save_ip_adapter``).

Three checks: importing an official file and exporting it gives the file back bit for bit;
exporting a composition and importing the file gives its weights back bit for bit; and — the one
that matters to a user — a composition with trained-looking weights, exported, loads in diffusers'
``load_ip_adapter`` and generates what refcond generates (max |Δlatent| <= 1e-4, float32).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from refcond_injectors import save_ip_adapter, to_ip_adapter
from refcond_injectors.testing import fabricate_ip_adapter_state_dict
from safetensors import safe_open

import refcond
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline

BUILDERS = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}
PROMPT = "a red cat"
TOLERANCE = 1e-4
#: The overrides that make a fresh ``ip-adapter`` composition of each official variant.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "plus": {"encoder": {"config": {"output": "hidden_states"}}, "injectors": {0: {"config": {"projector": "resampler", "num_tokens": 16}}}},
    "full": {"encoder": {"config": {"output": "hidden_states"}}, "injectors": {0: {"config": {"projector": "mlp"}}}},
}


def _trained(pipe: Any, variant: str, aggregator: str = "concat", seed: int = 0, **overrides: Any) -> refcond.RefcondPipeline:
    """A fresh composition of ``variant`` whose every weight is moved off its initialisation, as training would."""
    roles = {**VARIANTS[variant], **overrides}
    rp = refcond.from_pipe(pipe, "ip-adapter", seed=seed, aggregator=aggregator, **roles)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, parameter in rp.named_parameters():
            spread = float(parameter.std()) if parameter.numel() > 1 and float(parameter.std()) > 0 else 0.1
            parameter.add_(0.5 * spread * torch.randn(parameter.shape, generator=generator))
    return rp


def _generate(pipe: Any, guidance: float = 5.0, **kwargs: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=guidance, generator=generator, output_type="latent", **kwargs).images


@functools.cache
def _plain(backbone: str) -> torch.Tensor:
    return _generate(BUILDERS[backbone]())


def _assert_same(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(tensors) == sorted(expected)
    different = [k for k in expected if tensors[k].dtype != expected[k].dtype or not torch.equal(tensors[k], expected[k])]
    assert not different, f"not bit-identical: {different[:5]}"


# -- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
@pytest.mark.parametrize("variant", ["base", "plus", "full"])
def test_an_imported_official_file_exports_bit_for_bit(backbone: str, variant: str) -> None:
    pipe = BUILDERS[backbone]()
    official = fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, variant=variant, seed=3)
    rp = refcond.from_pipe(pipe, "ip-adapter", checkpoint=dict(official))
    _assert_same(to_ip_adapter(rp), official)


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
@pytest.mark.parametrize("variant", ["base", "plus", "full"])
def test_an_exported_composition_imports_bit_for_bit(tmp_path: Path, backbone: str, variant: str) -> None:
    rp = _trained(BUILDERS[backbone](), variant)
    path = save_ip_adapter(rp, tmp_path / "exported.safetensors")
    again = refcond.from_pipe(BUILDERS[backbone](), "ip-adapter", checkpoint=path, aggregator="concat")
    _assert_same(again.state_dict(), rp.state_dict())
    assert again.composition.encoder == rp.composition.encoder
    config, expected = again.injectors[0].config, rp.injectors[0].config
    for field in ("projector", "num_tokens", "resampler_depth", "resampler_ff_mult"):
        assert getattr(config, field) == getattr(expected, field), field


def test_sizes_diffusers_does_not_read_still_round_trip_with_a_warning() -> None:
    plus = {"projector": "resampler", "num_tokens": 8, "resampler_depth": 2, "resampler_ff_mult": 2}
    mlp = {"projector": "mlp", "mlp_hidden_dim": 24}
    for variant, config in (("base", {"num_tokens": 16}), ("plus", plus), ("full", mlp)):
        rp = _trained(tiny_sd15_pipeline(), variant, injectors={0: {"config": config}})
        with pytest.warns(UserWarning, match="diffusers' load_ip_adapter will refuse it"):
            exported = to_ip_adapter(rp)
        again = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", checkpoint=exported, aggregator="concat")
        _assert_same(again.state_dict(), rp.state_dict())
        assert again.injectors[0].config.model_dump(exclude={"input_dim", "resampler_dim", "resampler_heads"}) == rp.injectors[0].config.model_dump(
            exclude={"input_dim", "resampler_dim", "resampler_heads"}
        )


def test_the_export_numbers_layers_as_the_official_files_do() -> None:
    pipe = tiny_sdxl_pipeline()
    rp = _trained(pipe, "base")
    exported = to_ip_adapter(rp)
    numbers = sorted({int(k.split(".")[1]) for k in exported if k.startswith("ip_adapter.")})
    assert numbers == [2 * k + 1 for k in range(len(rp.injectors[0].layers))]
    first = rp.injectors[0].layers[0]
    assert torch.equal(exported["ip_adapter.1.to_k_ip.weight"], first.to_k_ip.weight)
    assert torch.equal(exported["ip_adapter.1.to_v_ip.weight"], first.to_v_ip.weight)


def test_save_writes_safetensors_with_a_note_and_casts_on_request(tmp_path: Path) -> None:
    rp = _trained(tiny_sd15_pipeline(), "plus")
    path = save_ip_adapter(rp, tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert metadata["format"] == "pt"
    assert "aggregator 'concat'" in metadata["refcond.exported_from"] and "'resampler'" in metadata["refcond.exported_from"]
    assert dtypes == {"F16"}
    assert not list(tmp_path.glob("*.tmp*")), "the atomic write left a temporary file"
    with pytest.raises(refcond.ConfigError, match=r"written as \.safetensors"):
        save_ip_adapter(rp, tmp_path / "adapter.bin")


# -- diffusers loads the export ---------------------------------------------------------------------


def _refcond_vs_diffusers(tmp_path: Path, backbone: str, variant: str, count: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(refcond latents, diffusers latents from the exported file, plain-UNet latents)."""
    refs = reference_images(count)
    rp = _trained(BUILDERS[backbone](), variant, aggregator="concat", seed=7)
    path = save_ip_adapter(rp, tmp_path / f"ip-adapter_{variant}.safetensors")
    latents = _generate(rp, references=refs)

    theirs = BUILDERS[backbone]()
    theirs.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    expected = _generate(theirs, ip_adapter_image=[refs])  # one adapter, several images: concat
    return latents, expected, _plain(backbone)


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
@pytest.mark.parametrize("variant", ["base", "plus", "full"])
def test_diffusers_loads_the_export_and_generates_the_same(tmp_path: Path, backbone: str, variant: str) -> None:
    latents, expected, plain = _refcond_vs_diffusers(tmp_path, backbone, variant)
    assert latents.shape == expected.shape
    diff = (latents - expected).abs().max().item()
    assert diff <= TOLERANCE, f"refcond and diffusers (loading refcond's export) differ by {diff:.3g}"
    assert (latents - plain).abs().max().item() > 100 * TOLERANCE  # the references matter


def test_an_export_generates_the_same_in_refcond(tmp_path: Path) -> None:
    """The aggregator is not in the file: imported with the same one, the export generates what the original did."""
    refs = reference_images(2)
    rp = _trained(tiny_sdxl_pipeline(), "plus", aggregator="mean")
    path = save_ip_adapter(rp, tmp_path / "mean.safetensors")
    again = refcond.from_pipe(tiny_sdxl_pipeline(), "ip-adapter", checkpoint=path)
    assert again.composition.aggregator.name == "mean"
    assert torch.equal(_generate(again, references=refs), _generate(rp, references=refs))


# -- what the official layout cannot hold -----------------------------------------------------------


def test_a_composition_without_cross_attention_is_refused() -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "lora-tuning", seed=0)
    with pytest.raises(refcond.ConfigError, match=r"no 'cross-attention' injector .* rp\.save"):
        to_ip_adapter(rp)


def test_only_a_refcond_pipeline_exports() -> None:
    with pytest.raises(refcond.ConfigError, match="takes a refcond.RefcondPipeline"):
        to_ip_adapter(tiny_sd15_pipeline())


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        ({"encoder": "pixel-stats"}, r"encoder 'pixel-stats'; official IP-Adapter files are read through CLIP"),
        ({"encoder": {"config": {"output": "hidden_states"}}}, r"output is 'hidden_states', but .* 'linear' projector .* 'image_embeds'"),
        (
            {"encoder": {"config": {"output": "hidden_states", "hidden_layer": -3}}, "injectors": {0: {"config": {"projector": "mlp"}}}},
            r"hidden layer -3; .* penultimate layer \(-2\)",
        ),
        (
            {
                "encoder": {"config": {"output": "hidden_states"}},
                "injectors": {0: {"config": {"projector": "resampler", "resampler_heads": 2, "resampler_dim_head": 32}}},
            },
            r"2 heads of 32; .* read as 1 heads of 64 .* resampler_dim_head=64",
        ),
    ],
    ids=["encoder", "encoder-output", "hidden-layer", "head-size"],
)
def test_what_the_official_layout_cannot_express_is_refused(roles: dict[str, Any], message: str) -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0, **roles)
    with pytest.raises(refcond.ConfigError, match=message):
        to_ip_adapter(rp)


def test_weights_outside_the_injector_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    state = rp.state_dict()
    monkeypatch.setattr(rp, "state_dict", lambda: {**state, "aggregator.tokens": torch.zeros(2)})
    with pytest.raises(refcond.ConfigError, match=r"weights outside the cross-attention injector \(aggregator"):
        to_ip_adapter(rp)


def test_a_scale_that_is_not_one_is_named_as_lost() -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0, injectors={0: {"config": {"scale": 0.5}}})
    with pytest.warns(UserWarning, match=r"scale 0\.5 is a setting, not a weight"):
        to_ip_adapter(rp)
