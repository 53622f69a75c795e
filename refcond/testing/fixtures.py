"""pytest fixtures for refcond and plugin tests.

Enable them in a ``conftest.py`` with ``pytest_plugins = ["refcond.testing.fixtures"]``.
"""

from __future__ import annotations

from pathlib import Path

import PIL.Image

try:
    import pytest
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "refcond.testing.fixtures holds pytest fixtures, and pytest is not installed: install the test extra, "
        "pip install 'refcond[test]' (or pip install pytest). The rest of refcond.testing works without it."
    ) from None
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from refcond.plugins import Plugins, load_plugins
from refcond.testing.images import reference_images
from refcond.testing.models import tiny_sd15_pipeline, tiny_sdxl_pipeline
from refcond.testing.qwen2vl import save_tiny_qwen2vl


@pytest.fixture
def sd15_pipe() -> StableDiffusionPipeline:
    """A fresh tiny SD1.5-like pipeline with a CLIP image encoder (seed 0)."""
    return tiny_sd15_pipeline()


@pytest.fixture
def sdxl_pipe() -> StableDiffusionXLPipeline:
    """A fresh tiny SDXL-like pipeline with a CLIP image encoder (seed 0)."""
    return tiny_sdxl_pipeline()


@pytest.fixture
def references() -> list[PIL.Image.Image]:
    """Three distinct 48x48 RGB reference images."""
    return reference_images(3)


@pytest.fixture
def plugins() -> Plugins:
    """Plugins freshly loaded from the installed entry points (a new registry per test)."""
    return load_plugins()


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny Qwen2-VL (seed 0), loadable as the ``mllm`` encoder's ``model``."""
    return save_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl"))
