"""pytest fixtures for refcond and plugin tests.

Enable them in a ``conftest.py`` with ``pytest_plugins = ["refcond.testing.fixtures"]``.
"""

from __future__ import annotations

import PIL.Image
import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from refcond.plugins import Plugins, load_plugins
from refcond.testing.images import reference_images
from refcond.testing.models import tiny_sd15_pipeline, tiny_sdxl_pipeline


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
