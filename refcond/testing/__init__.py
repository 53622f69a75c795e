"""Testing helpers for refcond and its plugins: tiny offline models, fixtures, conformance checks.

Use the fixtures in a plugin's tests with ``pytest_plugins = ["refcond.testing.fixtures"]`` in its
``conftest.py``.
"""

from refcond.testing.conformance import (
    check_aggregator,
    check_backbone,
    check_encoder,
    check_injector,
    make_condition,
    make_encoding,
)
from refcond.testing.images import reference_images
from refcond.testing.models import (
    IMAGE_ENCODER_SIZE,
    IMAGE_SIZE,
    tiny_feature_extractor,
    tiny_image_encoder,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)
from refcond.testing.qwen2vl import MAX_PIXELS as TINY_QWEN2VL_MAX_PIXELS
from refcond.testing.qwen2vl import MIN_PIXELS as TINY_QWEN2VL_MIN_PIXELS
from refcond.testing.qwen2vl import save_tiny_qwen2vl, tiny_qwen2vl, tiny_qwen2vl_processor

__all__ = [
    "IMAGE_ENCODER_SIZE",
    "IMAGE_SIZE",
    "TINY_QWEN2VL_MAX_PIXELS",
    "TINY_QWEN2VL_MIN_PIXELS",
    "check_aggregator",
    "check_backbone",
    "check_encoder",
    "check_injector",
    "make_condition",
    "make_encoding",
    "reference_images",
    "save_tiny_qwen2vl",
    "tiny_feature_extractor",
    "tiny_image_encoder",
    "tiny_qwen2vl",
    "tiny_qwen2vl_processor",
    "tiny_sd15_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_text_encoder",
    "tiny_tokenizer",
    "tiny_unet",
    "tiny_vae",
]
