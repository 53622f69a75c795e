"""Tiny random-weight diffusion pipelines and CLIP models, built offline from configs in seconds.

They run refcond's real code paths on a CPU: use them in tests, examples and the offline demo.
Weights are seeded, so two calls with the same seed build identical models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

TOKENIZER_DIR = Path(__file__).parent / "tiny_clip_tokenizer"

#: Pixel size of the tiny CLIP vision model's input.
IMAGE_ENCODER_SIZE = 32
#: Default output size, in pixels, of the tiny pipelines (UNet sample size 16, VAE factor 2).
IMAGE_SIZE = 32


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over a hand-written vocabulary of characters and a few words."""
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _text_config(hidden_size: int = 32, projection_dim: int | None = None) -> CLIPTextConfig:
    tokenizer = tiny_tokenizer()
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        projection_dim=projection_dim or hidden_size,
        hidden_act="gelu",
    )


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    """A two-layer CLIP text model with hidden size 32."""
    torch.manual_seed(seed)
    return CLIPTextModel(_text_config()).eval()


def tiny_text_encoder_with_projection(seed: int = 0) -> CLIPTextModelWithProjection:
    """A two-layer CLIP text model with a 32-d projection (SDXL's second text encoder)."""
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_text_config(projection_dim=32)).eval()


def tiny_image_encoder(seed: int = 0, hidden_size: int = 32, projection_dim: int = 32) -> CLIPVisionModelWithProjection:
    """A two-layer CLIP vision model on 32x32 images (8x8 patches: 17 tokens)."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=IMAGE_ENCODER_SIZE,
        patch_size=8,
        hidden_act="gelu",
    )
    return CLIPVisionModelWithProjection(config).eval()


def tiny_feature_extractor() -> CLIPImageProcessor:
    """The CLIP image processor matching :func:`tiny_image_encoder`."""
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_ENCODER_SIZE}, crop_size={"height": IMAGE_ENCODER_SIZE, "width": IMAGE_ENCODER_SIZE})


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A two-block VAE (scale factor 2, 4 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=IMAGE_SIZE,
    ).eval()


def tiny_unet(xl: bool = False, seed: int = 0) -> UNet2DConditionModel:
    """A UNet with block_out_channels (32, 64) and cross-attention in down, mid and up blocks.

    ``xl=True`` gives the SDXL layout: text-and-time added conditions, two transformer layers in
    the second block, cross-attention dim 64 (two 32-d text encoders concatenated).
    """
    torch.manual_seed(seed)
    common = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
    )
    if xl:
        config = dict(
            common,
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32,
        )
    else:
        config = dict(common, cross_attention_dim=32, attention_head_dim=(2, 4))
    return UNet2DConditionModel(**config).eval()


def tiny_sd15_pipeline(seed: int = 0, image_encoder: bool = True) -> StableDiffusionPipeline:
    """A Stable-Diffusion-1.5-like pipeline (with a CLIP ``image_encoder`` and ``feature_extractor``)."""
    return StableDiffusionPipeline(
        unet=tiny_unet(xl=False, seed=seed),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tiny_tokenizer(),
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=tiny_feature_extractor(),
        image_encoder=tiny_image_encoder(seed) if image_encoder else None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, image_encoder: bool = True) -> StableDiffusionXLPipeline:
    """A Stable-Diffusion-XL-like pipeline (two text encoders, added conditions, CLIP image encoder)."""
    return StableDiffusionXLPipeline(
        unet=tiny_unet(xl=True, seed=seed),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        text_encoder_2=tiny_text_encoder_with_projection(seed + 1),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading"),
        feature_extractor=tiny_feature_extractor(),
        image_encoder=tiny_image_encoder(seed) if image_encoder else None,
        force_zeros_for_empty_prompt=True,
    )
