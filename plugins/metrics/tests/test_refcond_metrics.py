"""The metrics of refcond-metrics on tiny random-weight CLIP and DINO models saved to folders.

Every value is compared with an independent computation written here with transformers' models,
one image and one prompt at a time: ``get_image_features`` / ``get_text_features`` for CLIP,
``last_hidden_state[:, 0]`` for DINO, then ``torch.nn.functional.cosine_similarity`` and a plain
mean over the references.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from statistics import mean
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor, ViTImageProcessorPil, ViTModel

import refcond
import refcond_metrics
from refcond import BuildContext, ConfigError, ReferenceImageError
from refcond.testing import reference_images
from refcond_metrics.testing import save_tiny_clip, save_tiny_dino

METRICS = ["clip-i", "clip-t", "dino-i"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    return save_tiny_dino(tmp_path_factory.mktemp("tiny-dino"))


@pytest.fixture(scope="module")
def registry():
    return refcond.from_modules(refcond_metrics).registry


@pytest.fixture(scope="module")
def folders(clip_dir, dino_dir) -> dict[str, Path]:
    return {"clip-i": clip_dir, "clip-t": clip_dir, "dino-i": dino_dir}


def build(registry, name: str, **config):
    """Build a registered metric the way refcond builds a component: validated config, then factory(config, context)."""
    entry = registry.get("metric", name)
    return entry.obj(entry.config(**config), BuildContext())


# -- the independent computation -----------------------------------------------------------------


@functools.lru_cache
def clip(folder: Path) -> tuple[CLIPModel, CLIPProcessor]:
    return CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)


@functools.lru_cache
def dino(folder: Path) -> tuple[ViTModel, ViTImageProcessorPil]:
    return ViTModel.from_pretrained(folder, add_pooling_layer=False), ViTImageProcessorPil.from_pretrained(folder)


def clip_image_embedding(folder: Path, image: PIL.Image.Image) -> torch.Tensor:
    model, processor = clip(folder)
    with torch.no_grad():
        out = model.get_image_features(**processor(images=[image.convert("RGB")], return_tensors="pt"))
    return (out if isinstance(out, torch.Tensor) else out.pooler_output)[0]


def clip_text_embedding(folder: Path, prompt: str) -> torch.Tensor:
    model, processor = clip(folder)
    tokens = processor.tokenizer([prompt], truncation=True, max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(**tokens)
    return (out if isinstance(out, torch.Tensor) else out.pooler_output)[0]


def dino_embedding(folder: Path, image: PIL.Image.Image) -> torch.Tensor:
    model, processor = dino(folder)
    with torch.no_grad():
        return model(**processor(images=[image.convert("RGB")], return_tensors="pt")).last_hidden_state[0, 0]


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a[None], b[None]).item()


def expected(name: str, folder: Path, images, references, prompts) -> list[float]:
    if name == "clip-t":
        return [cos(clip_image_embedding(folder, image), clip_text_embedding(folder, prompt)) for image, prompt in zip(images, prompts)]
    embedding = clip_image_embedding if name == "clip-i" else dino_embedding
    return [mean(cos(embedding(folder, image), embedding(folder, ref)) for ref in group) for image, group in zip(images, references)]


# -- a sample call: groups of 1, 2 and 3 references, one reference shared by two groups ----------

PICTURES = reference_images(6, size=40, seed=3)
SHARED = PICTURES[3]
IMAGES = PICTURES[:3]
REFERENCES = [[SHARED], [PICTURES[4], SHARED], [PICTURES[5], PICTURES[0].rotate(90), PICTURES[1]]]
PROMPTS = ["a red cube", "a red cube", "a photo of sks dog on the beach " * 8]  # the last is longer than 77 tokens


def test_the_metrics_are_registered_through_the_entry_point():
    registry = refcond.load_plugins().registry
    for name in METRICS:
        entry = registry.get("metric", name)
        assert entry.provenance.distribution == "refcond-metrics", entry.provenance
    defaults = {name: registry.get("metric", name).config().model for name in METRICS}
    assert defaults == {"clip-i": "openai/clip-vit-base-patch32", "clip-t": "openai/clip-vit-base-patch32", "dino-i": "facebook/dino-vits16"}


@pytest.mark.parametrize("name", METRICS)
def test_each_value_matches_an_independent_computation(registry, folders, name):
    metric = build(registry, name, model=str(folders[name]), batch_size=2)  # 2 < the 7 distinct images: several batches
    assert isinstance(metric, refcond.Metric)
    result = metric(IMAGES, REFERENCES, PROMPTS)
    assert list(result) == [name]
    values = result[name]
    assert len(values) == len(IMAGES) and all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in values)
    assert values == pytest.approx(expected(name, folders[name], IMAGES, REFERENCES, PROMPTS), abs=1e-5)
    # the values of an image do not depend on the other images of the call
    assert metric(IMAGES[2:], REFERENCES[2:], PROMPTS[2:])[name] == pytest.approx(values[2:], abs=1e-5)


@pytest.mark.parametrize("name", ["clip-i", "dino-i"])
def test_an_image_scores_1_against_itself(registry, folders, name):
    metric = build(registry, name, model=str(folders[name]))
    image = PICTURES[0]
    values = metric([image, image, PICTURES[1]], [[image], [image.copy(), image.convert("L").convert("RGB").copy()], [PICTURES[1].copy()]], ["", "", ""])[name]
    assert values[0] == pytest.approx(1.0, abs=1e-6) and values[2] == pytest.approx(1.0, abs=1e-6)
    assert values[1] < 1.0 - 1e-4  # a grayscale copy is another image


def test_references_are_embedded_once_per_object(registry, clip_dir):
    metric = build(registry, "clip-i", model=str(clip_dir), batch_size=2)
    seen: list[int] = []
    handle = metric.model.vision_model.register_forward_hook(lambda module, args, output: seen.append(output.last_hidden_state.shape[0]))
    try:
        group = [PICTURES[3], PICTURES[4]]
        metric(IMAGES, [group, group, [PICTURES[4], IMAGES[0]]], PROMPTS)  # 3 generated + 2 references, all distinct objects
    finally:
        handle.remove()
    assert seen == [2, 2, 1]


def test_clip_i_and_clip_t_share_one_model(registry, clip_dir):
    clip_i, clip_t = build(registry, "clip-i", model=str(clip_dir)), build(registry, "clip-t", model=str(clip_dir) + "/")
    assert clip_i.model is clip_t.model
    assert build(registry, "clip-i", model=str(clip_dir), dtype="bfloat16").model is not clip_i.model


def test_non_rgb_images_are_read_as_refcond_reads_references(registry, clip_dir):
    metric = build(registry, "clip-i", model=str(clip_dir))
    rgba = PICTURES[0].convert("RGBA")
    rgba.putalpha(128)
    gray = PICTURES[1].convert("L")
    values = metric([rgba], [[gray]], [""])["clip-i"]
    loaded = refcond.load_references([rgba, gray])
    assert values == pytest.approx(metric([loaded[0]], [[loaded[1]]], [""])["clip-i"], abs=1e-6)


def test_the_backbone_device_is_used_when_the_config_names_none(registry, clip_dir):
    entry = registry.get("metric", "clip-t")
    context = BuildContext(backbone=SimpleNamespace(device=torch.device("cpu")))  # what a metric reads of the backbone
    metric = entry.obj(entry.config(model=str(clip_dir)), context)
    assert metric.model.device == torch.device("cpu")


# -- bad input -----------------------------------------------------------------------------------

A, B = PICTURES[0], PICTURES[1]


@pytest.mark.parametrize(
    ("name", "args", "error", "message"),
    [
        ("clip-i", ([], [], []), ConfigError, "metric 'clip-i': images is empty"),
        ("clip-i", ([A, B], [[A]], ["x", "y"]), ConfigError, "got 2 images, 1 reference groups and 2 prompts"),
        ("dino-i", ([A], [[A]], ["x", "y"]), ConfigError, "got 1 images, 1 reference groups and 2 prompts"),
        ("clip-i", (A, [[A]], ["x"]), ConfigError, "images must be a list of PIL images, one per generated image; got a PIL image"),
        ("clip-t", ([A], [[B]], "x"), ConfigError, "prompts must be a list of strings"),
        ("clip-i", ([A, B], [[A], []], ["x", "y"]), ReferenceImageError, "references[1] is empty"),
        ("clip-t", ([A, B], [[A], []], ["x", "y"]), ReferenceImageError, "references[1] is empty"),
        ("dino-i", ([A, B], [[A], B], ["x", "y"]), ReferenceImageError, "references[1] is a PIL image, not a list"),
        ("clip-i", ([A, np.zeros((8, 8, 3), np.uint8)], [[A], [B]], ["x", "y"]), ReferenceImageError, "metric 'clip-i': images[1] is a ndarray, not a PIL image"),
        ("dino-i", ([A, B], [[A], [B, None]], ["x", "y"]), ReferenceImageError, "metric 'dino-i': references[1][1]: is None, not an image"),
        ("clip-i", ([A], [["/no/such/file.png"]], ["x"]), ReferenceImageError, "references[0][0] ('/no/such/file.png'): file not found"),
        ("clip-t", ([A, B], [[A], [B]], ["x", None]), ConfigError, "metric 'clip-t': prompts[1] is None, not a string"),
        ("clip-i", ([A], [[PIL.Image.new("RGB", (4000, 2))]], ["x"]), ReferenceImageError, "references[0][0] is 4000x2 pixels, an aspect ratio of 2000:1"),
    ],
)
def test_bad_input_is_refused_naming_its_position(registry, folders, name, args, error, message):
    metric = build(registry, name, model=str(folders[name]))
    with pytest.raises(error) as caught:
        metric(*args)
    assert message in str(caught.value)


def test_a_wrong_model_is_refused_when_the_metric_is_built(registry, clip_dir, dino_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"metric 'clip-i': config model '.*' holds a 'vit' model, not a CLIP model"):
        build(registry, "clip-i", model=str(dino_dir))
    with pytest.raises(ConfigError, match=r"metric 'dino-i': config model '.*' holds a CLIPModel, which does not read images alone"):
        build(registry, "dino-i", model=str(clip_dir))
    with pytest.raises(ConfigError, match=r"metric 'dino-i': config model '.*missing' is not a folder that exists"):
        build(registry, "dino-i", model=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"metric 'clip-t': config device 'cuda:7' is not available"):
        build(registry, "clip-t", model=str(clip_dir), device="cuda:7")
    with pytest.raises(ConfigError, match="batch_size"):
        refcond.config.validate_config(registry.get("metric", "clip-i").config, {"batch_size": 0}, where="metric 'clip-i'")


# -- documentation -------------------------------------------------------------------------------


def test_the_metrics_section_of_the_evaluation_guide_runs(monkeypatch, tmp_path):
    """docs/evaluation.md's "## Metrics": its Python blocks run (those marked ``# not run`` download)."""
    text = (Path(__file__).resolve().parents[3] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    blocks = [code for code in re.findall(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL) if not code.startswith("# not run")]
    assert blocks, "docs/evaluation.md's Metrics section has no runnable example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "docs/evaluation.md", "exec"), {"__name__": "evaluation_md"})
