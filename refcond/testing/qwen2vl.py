"""A tiny random-weight Qwen2-VL and the pieces that prepare its inputs, built offline in well under a second.

They run the ``mllm`` encoder's real code path (chat template, image processor, vision tower, decoder)
on a CPU. The tokenizer is a byte-level BPE over a small hand-written vocabulary that holds Qwen2-VL's
special tokens; the tiny model's ``image_token_id`` / ``vision_start_token_id`` / ... are read from it,
so the two always agree. The chat template is Qwen2-VL's (default system prompt "You are a helpful
assistant.", one ``<|vision_start|><|image_pad|><|vision_end|>`` per image).

Sizes: decoder hidden 64, 3 layers, 4 heads / 2 key-value heads (grouped-query attention, as the 2B
model), head dim 16; vision tower 2 blocks of width 32, patch 2, temporal patch 2, merge 2x2 (so one
LLM token covers 4x4 pixels). The image processor keeps images between :data:`MIN_PIXELS` and
:data:`MAX_PIXELS` (the official 336-pixel rule scaled to a 16-pixel "image size"): a square image
becomes 16x16 pixels, 16 LLM tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

try:  # transformers >= 5: the PIL backend, which needs no torchvision
    from transformers import Qwen2VLImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import Qwen2VLImageProcessor as _ImageProcessor

QWEN2VL_TOKENIZER_DIR = Path(__file__).parent / "tiny_qwen2vl_tokenizer"

#: Pixels per side of a ViT patch, and patches per side merged into one LLM token.
PATCH_SIZE = 2
MERGE_SIZE = 2
_FACTOR = PATCH_SIZE * MERGE_SIZE
_IMAGE_SIZE = 16
#: The official resolution rule (``((size // 28 - 1) ** 2) * 28 * 28`` .. ``((size // 28) ** 2 + 1) * 28 * 28``)
#: with 28 = patch 14 x merge 2 replaced by the tiny model's 4 and 336 by 16.
MIN_PIXELS = ((_IMAGE_SIZE // _FACTOR - 1) ** 2) * _FACTOR * _FACTOR
#: The most pixels the tiny image processor resizes a reference to (see ``MIN_PIXELS``).
MAX_PIXELS = ((_IMAGE_SIZE // _FACTOR) ** 2 + 1) * _FACTOR * _FACTOR


def tiny_qwen2vl_tokenizer() -> Qwen2Tokenizer:
    """The byte-level BPE tokenizer of the tiny Qwen2-VL, with Qwen2-VL's special tokens and chat template."""
    return Qwen2Tokenizer.from_pretrained(str(QWEN2VL_TOKENIZER_DIR))


def tiny_qwen2vl_image_processor(
    min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> _ImageProcessor:
    """A Qwen2-VL image processor with the tiny vision tower's patch and merge sizes (PIL backend, no torchvision)."""
    return _ImageProcessor(
        patch_size=PATCH_SIZE,
        temporal_patch_size=2,
        merge_size=MERGE_SIZE,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def tiny_qwen2vl_processor(
    min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[_ImageProcessor, Qwen2Tokenizer]:
    """``(image_processor, tokenizer)``: what the ``mllm`` encoder needs besides the model.

    transformers 5's ``Qwen2VLProcessor`` also builds a video processor, which needs torchvision; the
    encoder therefore takes the two pieces and expands the image placeholders itself. The chat template
    travels with the tokenizer (``tokenizer.chat_template``).
    """
    return tiny_qwen2vl_image_processor(
        min_pixels, max_pixels
    ), tiny_qwen2vl_tokenizer()


def tiny_qwen2vl_config() -> Qwen2VLConfig:
    """The config of :func:`tiny_qwen2vl` (transformers 5 layout: ``text_config`` / ``vision_config``)."""
    tokenizer = tiny_qwen2vl_tokenizer()
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in _SPECIAL_IDS.items()
    }
    text_config = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_scaling": {
            "type": "mrope",
            "mrope_section": [2, 3, 3],
        },  # sums to head_dim / 2 = 8
        "rope_theta": 1_000_000.0,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "depth": 2,
        "embed_dim": 32,
        "num_heads": 2,
        "hidden_size": 64,  # the merger's output = the decoder's hidden size
        "mlp_ratio": 2,
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": 2,
        "spatial_merge_size": MERGE_SIZE,
        "in_channels": 3,
    }
    if (
        len(tokenizer) > text_config["vocab_size"]
    ):  # pragma: no cover - guards an edit of the vocabulary
        raise ValueError(
            f"the tiny Qwen2-VL vocabulary has {len(tokenizer)} tokens, more than vocab_size {text_config['vocab_size']}"
        )
    config = Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        **ids,
    )
    return config


_SPECIAL_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def tiny_qwen2vl(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """A seeded random-weight Qwen2-VL (3 decoder layers, hidden 64, sdpa attention), in eval mode."""
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_qwen2vl_config())
    # Random init leaves RMSNorm weights at 1; perturb them so a test can tell "norm applied" from "not".
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def save_tiny_qwen2vl(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny Qwen2-VL as a model folder (weights, config, tokenizer, image processor).

    The ``mllm`` encoder loads such a folder as it loads ``Qwen/Qwen2-VL-2B-Instruct``
    (``encoder = {"config": {"model": str(folder)}}``), so compositions run their real loading path
    offline. The image processor keeps the tiny resolution rule (:data:`MIN_PIXELS`..:data:`MAX_PIXELS`).
    """
    folder = Path(folder)
    tiny_qwen2vl(seed).save_pretrained(folder)
    image_processor, tokenizer = tiny_qwen2vl_processor()
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder
