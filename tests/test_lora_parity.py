"""The ``lora`` injector reproduces diffusers' own LoRA loading with the same files.

Each case writes fabricated LoRA files (random, every ``B``/``up`` weight non-zero, text-encoder
keys included), runs refcond's ``lora`` injector on one tiny pipeline and diffusers'
``load_lora_weights`` + ``set_adapters`` (+ ``fuse_lora``) on a second identical one, with the
same seed, and compares the final latents. Each case also checks that the LoRAs change the
output, so a loader that silently loaded nothing would fail.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from refcond_injectors.testing import fabricate_lora_metadata, fabricate_lora_state_dict
from safetensors.torch import save_file

import refcond
from refcond.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

BUILDERS = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}
TOLERANCE = 1e-4
#: How much the LoRAs must at least move the latents for a case to mean anything.
VISIBLE = 1e-2


def _lora_file(tmp_path: Path, pipe: Any, layout: str, seed: int, name: str | None = None) -> Path:
    """A fabricated LoRA file; diffusers-layout files carry adapter metadata with alpha != rank (scaling 0.5)."""
    state = fabricate_lora_state_dict(pipe, layout, rank=4, seed=seed)
    metadata = fabricate_lora_metadata(state, lora_alpha=2.0) if layout == "diffusers" else None
    path = tmp_path / f"{name or layout}-{seed}.safetensors"
    save_file(state, str(path), metadata=metadata)
    return path


def _generate(pipe: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red cat", num_inference_steps=2, guidance_scale=5.0, generator=generator, output_type="latent").images


@functools.cache
def _plain(backbone: str) -> torch.Tensor:
    return _generate(BUILDERS[backbone]())


def _compare(backbone: str, loras: list[dict[str, Any]], diffusers_setup: Any, fuse: bool = False) -> None:
    """refcond with ``loras`` on one pipeline vs ``diffusers_setup(pipe)`` on a second one."""
    ours, theirs = BUILDERS[backbone](), BUILDERS[backbone]()
    rp = refcond.from_pipe(ours, {"injectors": [{"name": "lora", "config": {"loras": loras, "fuse": fuse}}]})
    latents = _generate(rp)
    diffusers_setup(theirs)
    expected = _generate(theirs)
    difference = (latents - expected).abs().max().item()
    assert difference <= TOLERANCE, f"refcond and diffusers differ by {difference:.3g}"
    assert (latents - _plain(backbone)).abs().max().item() > VISIBLE, "the LoRAs do not change the output"


@pytest.mark.parametrize("layout", ["diffusers", "attn-procs", "kohya"])
@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
def test_one_lora_matches_diffusers(tmp_path, backbone, layout):
    path = _lora_file(tmp_path, BUILDERS[backbone](), layout, seed=1)

    def diffusers(pipe: Any) -> None:
        pipe.load_lora_weights(str(path), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.7])

    _compare(backbone, [{"path": str(path), "scale": 0.7}], diffusers)


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
def test_two_loras_with_their_weights_match_diffusers(tmp_path, backbone):
    pipe = BUILDERS[backbone]()
    first, second = _lora_file(tmp_path, pipe, "kohya", seed=1), _lora_file(tmp_path, pipe, "diffusers", seed=2)

    def diffusers(pipe: Any) -> None:
        pipe.load_lora_weights(str(first), adapter_name="first")
        pipe.load_lora_weights(str(second), adapter_name="second")
        pipe.set_adapters(["first", "second"], adapter_weights=[0.7, 0.4])

    _compare(backbone, [{"path": str(first), "scale": 0.7}, {"path": str(second), "scale": 0.4}], diffusers)


def test_per_block_scales_match_diffusers(tmp_path):
    path = _lora_file(tmp_path, tiny_sd15_pipeline(), "kohya", seed=3)
    blocks = {"down": 0.5, "mid": 0.0, "up": {"block_0": [1.0, 0.2], "block_1": 0.8}}

    def diffusers(pipe: Any) -> None:
        pipe.load_lora_weights(str(path), adapter_name="blocks")
        pipe.set_adapters(["blocks"], adapter_weights=[{"unet": blocks, "text_encoder": 0.3}])

    _compare("sd15", [{"path": str(path), "scale": blocks, "text_encoder_scale": 0.3}], diffusers)


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
def test_fused_loras_match_diffusers_fuse_lora(tmp_path, backbone):
    pipe = BUILDERS[backbone]()
    first, second = _lora_file(tmp_path, pipe, "attn-procs", seed=4), _lora_file(tmp_path, pipe, "kohya", seed=5)
    components = ["unet", "text_encoder"] + (["text_encoder_2"] if backbone == "sdxl" else [])

    def diffusers(pipe: Any) -> None:
        pipe.load_lora_weights(str(first), adapter_name="first")
        pipe.load_lora_weights(str(second), adapter_name="second")
        pipe.set_adapters(["first", "second"], adapter_weights=[0.7, 0.4])
        pipe.fuse_lora(components=components, adapter_names=["first", "second"])

    _compare(backbone, [{"path": str(first), "scale": 0.7}, {"path": str(second), "scale": 0.4}], diffusers, fuse=True)
