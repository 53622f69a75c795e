"""refcond's ``ip-adapter`` composition reproduces diffusers' IP-Adapter with the same weights.

Each case builds two identical tiny pipelines (diffusers changes its UNet in place), writes a
fabricated checkpoint in the official layout, runs refcond on one and diffusers'
``load_ip_adapter`` on the other with the same seed, and compares the final latents.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from refcond_injectors.testing import fabricate_ip_adapter_state_dict
from safetensors.torch import save_file

import refcond
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline

BUILDERS = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}
PROMPT = "a red cat"
TOLERANCE = 1e-4


def _checkpoint(tmp_path: Path, pipe: Any, variant: str) -> Path:
    path = tmp_path / f"ip-adapter_{variant}.safetensors"
    save_file(fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, variant=variant, seed=1), str(path))
    return path


def _generate(pipe: Any, guidance: float, **kwargs: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=guidance, generator=generator, output_type="latent", **kwargs).images


def _diffusers(pipe: Any, checkpoint: Path, scale: Any = None) -> Any:
    pipe.load_ip_adapter(str(checkpoint.parent), subfolder="", weight_name=checkpoint.name, image_encoder_folder=None)
    if scale is not None:
        pipe.set_ip_adapter_scale(scale)
    return pipe


def _refcond_vs_diffusers(
    tmp_path: Path, backbone: str, variant: str, aggregator: str, guidance: float, scale: Any = 1.0, count: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(refcond latents, diffusers latents, plain-UNet latents) for the same seed and prompt."""
    ours, theirs = BUILDERS[backbone](), BUILDERS[backbone]()
    refs = reference_images(count)
    checkpoint = _checkpoint(tmp_path, ours, variant)

    rp = refcond.from_pipe(ours, "ip-adapter", checkpoint=checkpoint, aggregator=aggregator)
    latents = _generate(rp, guidance, references=refs, reference_scale=scale)

    _diffusers(theirs, checkpoint, None if scale == 1.0 else scale)
    if aggregator == "concat":
        expected = _generate(theirs, guidance, ip_adapter_image=[refs])  # one adapter, several images
    else:
        expected = _generate(theirs, guidance, ip_adapter_image_embeds=[_mean_embeds(theirs, refs, variant, guidance > 1)])
    return latents, expected, _plain(backbone, guidance)


@functools.cache
def _plain(backbone: str, guidance: float) -> torch.Tensor:
    """Latents of the UNet without any adapter (same seed), computed once per backbone and guidance."""
    return _generate(BUILDERS[backbone](), guidance)


@torch.no_grad()
def _mean_embeds(pipe: Any, refs: list[Any], variant: str, guidance: bool) -> torch.Tensor:
    """Averaged CLIP features in diffusers' ``ip_adapter_image_embeds`` layout: ``[neg; pos]`` under guidance."""
    pixels = pipe.feature_extractor(refs, return_tensors="pt").pixel_values
    if variant == "base":
        positive = pipe.image_encoder(pixels).image_embeds.mean(dim=0)[None, None]  # [1, 1, D]
        negative = torch.zeros_like(positive)
    else:
        positive = pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-2].mean(dim=0)[None, None]  # [1, 1, T, D]
        blank = torch.zeros_like(pixels[:1])
        negative = pipe.image_encoder(blank, output_hidden_states=True).hidden_states[-2][None]
    return torch.cat([negative, positive]) if guidance else positive


def _assert_parity(latents: torch.Tensor, expected: torch.Tensor, plain: torch.Tensor) -> None:
    assert latents.shape == expected.shape
    diff = (latents - expected).abs().max().item()
    assert diff <= TOLERANCE, f"refcond and diffusers differ by {diff:.3g}"
    # The references must matter, or parity would hold trivially.
    assert (latents - plain).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
@pytest.mark.parametrize("variant", ["base", "plus"])
def test_concat_matches_diffusers_multi_image(tmp_path: Path, backbone: str, variant: str) -> None:
    _assert_parity(*_refcond_vs_diffusers(tmp_path, backbone, variant, "concat", guidance=5.0))


@pytest.mark.parametrize(("backbone", "variant", "count"), [("sd15", "plus", 2), ("sdxl", "base", 3)])
def test_concat_matches_diffusers_without_guidance(tmp_path: Path, backbone: str, variant: str, count: int) -> None:
    _assert_parity(*_refcond_vs_diffusers(tmp_path, backbone, variant, "concat", guidance=1.0, count=count))


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
@pytest.mark.parametrize("variant", ["base", "plus"])
def test_mean_matches_diffusers_fed_averaged_embeddings(tmp_path: Path, backbone: str, variant: str) -> None:
    _assert_parity(*_refcond_vs_diffusers(tmp_path, backbone, variant, "mean", guidance=5.0))


def test_mean_matches_diffusers_without_guidance(tmp_path: Path) -> None:
    _assert_parity(*_refcond_vs_diffusers(tmp_path, "sdxl", "plus", "mean", guidance=1.0, count=2))


def test_float_scale_matches_set_ip_adapter_scale(tmp_path: Path) -> None:
    latents, expected, plain = _refcond_vs_diffusers(tmp_path, "sd15", "plus", "concat", guidance=5.0, scale=0.5)
    _assert_parity(latents, expected, plain)


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
def test_per_block_scale_matches_instantstyle_dict(tmp_path: Path, backbone: str) -> None:
    scale = {"down": {"block_1": 0.5}, "up": {"block_0": [0.0, 1.0]}}
    _assert_parity(*_refcond_vs_diffusers(tmp_path, backbone, "base", "concat", guidance=5.0, scale=scale))


def test_full_variant_mlp_projector_matches_diffusers(tmp_path: Path) -> None:
    _assert_parity(*_refcond_vs_diffusers(tmp_path, "sd15", "full", "concat", guidance=5.0, count=2))
