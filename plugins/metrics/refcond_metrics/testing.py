"""Tiny random-weight CLIP and DINO models for tests: built offline from configs, saved with their processors.

A folder written by :func:`save_tiny_clip` or :func:`save_tiny_dino` is what a metric's ``model``
config option takes, in place of ``openai/clip-vit-base-patch32`` or ``facebook/dino-vits16``. The
models have the real architectures (``CLIPModel``, ``ViTModel``) at a few thousand parameters, on
32 x 32 images; weights are seeded, so two folders saved with the same seed hold the same model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, ViTConfig, ViTImageProcessorPil, ViTModel

from refcond.testing import tiny_tokenizer

#: Pixel size of the tiny models' input (8 x 8 patches: 17 tokens with the CLS token).
TINY_IMAGE_SIZE = 32


def tiny_clip(seed: int = 0) -> CLIPModel:
    """A two-layer CLIP (text and vision towers of width 32, 16-d projections) over refcond's tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": 8,
    }
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def tiny_clip_processor() -> CLIPProcessor:
    """CLIP's processor for :func:`tiny_clip`: the tiny tokenizer, short side to 32 pixels and a 32 x 32 centre crop."""
    size = TINY_IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer())


def tiny_dino(seed: int = 0) -> ViTModel:
    """A two-layer ViT of width 32 without pooler, as DINO checkpoints load (``ViTModel``)."""
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
    )
    return ViTModel(config, add_pooling_layer=False).eval()


def tiny_dino_processor() -> ViTImageProcessorPil:
    """DINO's image processor for :func:`tiny_dino`: resized to 32 x 32, ImageNet mean and standard deviation."""
    return ViTImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Save :func:`tiny_clip` and its processor to ``folder``: a ``model`` for ``clip-i`` and ``clip-t``."""
    folder = Path(folder)
    tiny_clip(seed).save_pretrained(folder)
    tiny_clip_processor().save_pretrained(folder)
    return folder


def save_tiny_dino(folder: str | Path, seed: int = 0) -> Path:
    """Save :func:`tiny_dino` and its image processor to ``folder``: a ``model`` for ``dino-i``."""
    folder = Path(folder)
    tiny_dino(seed).save_pretrained(folder)
    tiny_dino_processor().save_pretrained(folder)
    return folder
