"""What the benchmark suites share: where they run, the SD1.5-shaped UNet, and synchronised timing."""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import UNet2DConditionModel

#: Where and in which precision to run (a GPU run: REFCOND_BENCH_DEVICE=cuda REFCOND_BENCH_DTYPE=float16).
DEVICE = torch.device(os.environ.get("REFCOND_BENCH_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("REFCOND_BENCH_DTYPE", "float32"))


def sd15_unet(sample_size: int) -> UNet2DConditionModel:
    """Stable Diffusion 1.5's UNet architecture (860M parameters), random weights."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def timed_rounds(benchmark: Any, step: Any, rounds: int) -> Any:
    """Time ``step`` with pytest-benchmark under inference mode, waiting for the GPU's kernels each round."""

    def synchronized() -> Any:
        out = step()
        if DEVICE.type == "cuda":  # time the kernels, not their launch
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        return benchmark.pedantic(synchronized, rounds=rounds, iterations=1, warmup_rounds=3 if DEVICE.type == "cuda" else 1)


def sd_pipeline_around(unet: UNet2DConditionModel, image_encoder: Any = None) -> Any:
    """A StableDiffusionPipeline around ``unet`` with the tiny VAE and text encoder, on DEVICE in DTYPE.

    Only the UNet is timed; the other parts just let refcond and diffusers build around it.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from refcond.testing import (
        tiny_feature_extractor,
        tiny_text_encoder,
        tiny_tokenizer,
        tiny_vae,
    )

    return StableDiffusionPipeline(
        unet=unet,
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=tiny_tokenizer(),
        scheduler=PNDMScheduler(skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=tiny_feature_extractor() if image_encoder is not None else None,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    ).to(DEVICE, DTYPE)
