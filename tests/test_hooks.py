"""One test per hook (datasette's convention): register through the hook from an inline plugin,
read the entry back from the registry, and use it as refcond would."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import PIL.Image
import pytest
import torch
from pydantic import Field

import refcond
from refcond import (
    MIXED_SOURCE,
    BuildContext,
    ComponentConfig,
    Composition,
    Condition,
    EmptyConfig,
    ImportedCheckpoint,
    ReferenceEncoding,
    hookspecs,
)
from refcond.building import resolve_composition
from refcond.checkpoints import import_checkpoint, native, write_safetensors
from refcond.config import validate_config
from refcond.registry import HOOK_KINDS

RED = PIL.Image.new("RGB", (4, 4), (255, 0, 0))
BLUE = PIL.Image.new("RGB", (4, 4), (0, 0, 255))


def built(registry, kind, name, **config):
    """Build a registered component the way refcond.building does."""
    entry = registry.get(kind, name)
    return entry.obj(validate_config(entry.config, config, where=f"{kind} {name!r}"), BuildContext())


# -- backbones -----------------------------------------------------------------------------------


class ToyBackboneConfig(ComponentConfig):
    cross_attention_dim: int = Field(default=8, description="Token size the UNet's cross-attention reads.")


class ToyBackbone:
    name = "toy"

    def __init__(self, config: ToyBackboneConfig, context: BuildContext):
        self.pipeline = context.extras.get("pipeline")
        self._dim = config.cross_attention_dim

    @property
    def unet(self):
        return None

    @property
    def cross_attention_dim(self) -> int:
        return self._dim

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def model_id(self) -> str | None:
        return None

    @classmethod
    def accepts(cls, pipeline) -> bool:
        return False


def test_hook_refcond_register_backbones():
    class Plugin:
        __name__ = "toy-backbones"

        @refcond.hookimpl
        def refcond_register_backbones(self, register):
            register("toy", ToyBackbone, config=ToyBackboneConfig, description="A backbone without a model.")

    registry = refcond.from_modules(Plugin()).registry
    entry = registry.get("backbone", "toy")
    assert (entry.config, entry.description, entry.provenance.plugin) == (ToyBackboneConfig, "A backbone without a model.", "toy-backbones")
    backbone = built(registry, "backbone", "toy", cross_attention_dim=16)
    assert isinstance(backbone, refcond.Backbone)
    assert backbone.cross_attention_dim == 16


# -- encoders ------------------------------------------------------------------------------------


class MeanColourEncoder:
    """One token per reference: its mean colour in [0, 1]."""

    embedding_dim = 3
    reads_prompt = False
    mixes_references = False

    def encode(self, references: Sequence[Sequence[PIL.Image.Image]]) -> ReferenceEncoding:
        groups = [
            ReferenceEncoding(
                torch.tensor(np.array([np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) / 255 for im in group]))[None],
                torch.ones(1, len(group), dtype=torch.bool),
                torch.arange(len(group))[None],
            )
            for group in references
        ]
        return ReferenceEncoding.concat_batches(groups)

    def encode_unconditional(self, encoding: ReferenceEncoding, references) -> ReferenceEncoding:
        return ReferenceEncoding(torch.zeros_like(encoding.tokens), encoding.mask, encoding.source)


def test_hook_refcond_register_encoders():
    class Plugin:
        __name__ = "toy-encoders"

        @refcond.hookimpl
        def refcond_register_encoders(self, register):
            register("mean-colour", lambda config, context: MeanColourEncoder(), config=EmptyConfig)

    registry = refcond.from_modules(Plugin()).registry
    encoder = built(registry, "encoder", "mean-colour")
    assert isinstance(encoder, refcond.Encoder)
    encoding = encoder.encode([[RED, BLUE], [BLUE]])
    assert encoding.tokens.tolist() == [[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]
    assert encoding.mask.tolist() == [[True, True], [True, False]]
    assert encoder.encode_unconditional(encoding, [[RED, BLUE], [BLUE]]).tokens.abs().sum() == 0


# -- aggregators ---------------------------------------------------------------------------------


class FirstReference:
    """Keep only the tokens of each group's first reference."""

    def output_dim(self, input_dim: int) -> int:
        return input_dim

    def __call__(self, encoding: ReferenceEncoding, weights=None) -> Condition:
        keep = encoding.mask & (encoding.source == 0)
        rows = [Condition(encoding.tokens[b][keep[b]][None], keep[b][keep[b]][None], encoding.source[b][keep[b]][None]) for b in range(encoding.batch_size)]
        return Condition.concat_batches(rows)


def test_hook_refcond_register_aggregators():
    class Plugin:
        __name__ = "toy-aggregators"

        @refcond.hookimpl
        def refcond_register_aggregators(self, register):
            register("first", lambda config, context: FirstReference())

    registry = refcond.from_modules(Plugin()).registry
    aggregator = built(registry, "aggregator", "first")
    assert isinstance(aggregator, refcond.Aggregator)
    condition = aggregator(MeanColourEncoder().encode([[RED, BLUE], [BLUE, RED]]))
    assert condition.tokens.tolist() == [[[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]]


# -- injectors -----------------------------------------------------------------------------------


class ScaleInjectorConfig(ComponentConfig):
    scale: float = 1.0


class RecordingAttachment:
    """Sets ``unet.refcond_condition`` while conditioning; detach removes every trace."""

    def __init__(self, unet: torch.nn.Module, scale: float):
        self.unet, self.scale = unet, scale

    @contextlib.contextmanager
    def condition(self, condition: Condition, unconditional: Condition | None, scale=None) -> Iterator[None]:
        self.unet.refcond_condition = condition.tokens * (self.scale if scale is None else scale)
        try:
            yield
        finally:
            del self.unet.refcond_condition

    def detach(self) -> None:
        self.unet = None


class RecordingInjector:
    def __init__(self, config: ScaleInjectorConfig, context: BuildContext):
        self.scale = config.scale

    def attach(self, unet: torch.nn.Module) -> RecordingAttachment:
        return RecordingAttachment(unet, self.scale)


def test_hook_refcond_register_injectors():
    class Plugin:
        __name__ = "toy-injectors"

        @refcond.hookimpl
        def refcond_register_injectors(self, register):
            register("recording", RecordingInjector, config=ScaleInjectorConfig)

    registry = refcond.from_modules(Plugin()).registry
    injector = built(registry, "injector", "recording", scale=2.0)
    assert isinstance(injector, refcond.Injector)
    unet = torch.nn.Module()
    attachment = injector.attach(unet)
    assert isinstance(attachment, refcond.Attachment)
    condition = Condition(torch.ones(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), torch.full((1, 1), MIXED_SOURCE))
    with attachment.condition(condition, None):
        assert unet.refcond_condition.tolist() == [[[2.0, 2.0]]]
    assert not hasattr(unet, "refcond_condition")


# -- compositions --------------------------------------------------------------------------------


def test_hook_refcond_register_compositions():
    class Plugin:
        __name__ = "toy-recipes"

        @refcond.hookimpl
        def refcond_register_compositions(self, register):
            register("colour-dict", {"encoder": "mean-colour", "aggregator": "first", "injectors": ["recording"]})
            register("colour-model", Composition(encoder="mean-colour", aggregator="mean", injectors=["recording"]))

    registry = refcond.from_modules(Plugin()).registry
    assert registry.names("composition") == ["colour-dict", "colour-model"]
    from_dict = resolve_composition("colour-dict", registry)
    assert (from_dict.name, from_dict.aggregator.name, [s.name for s in from_dict.injectors]) == ("colour-dict", "first", ["recording"])
    assert resolve_composition("colour-model", registry).name == "colour-model"


# -- checkpoint formats --------------------------------------------------------------------------


class ToyFormat:
    """Files whose keys start with ``toy_proj.``: the aggregator's weights, plus its implied size."""

    def detect(self, state_dict, metadata) -> bool:
        return any(key.startswith("toy_proj.") for key in state_dict)

    def convert(self, state_dict, metadata, backbone) -> ImportedCheckpoint:
        weights = {f"aggregator.{key.removeprefix('toy_proj.')}": value for key, value in state_dict.items()}
        size = state_dict["toy_proj.weight"].shape[0]
        return ImportedCheckpoint(composition={"aggregator": {"config": {"size": size}}}, state_dict=weights)


def test_hook_refcond_register_checkpoint_formats(tmp_path):
    class Plugin:
        __name__ = "toy-formats"

        @refcond.hookimpl
        def refcond_register_checkpoint_formats(self, register):
            register("toy", ToyFormat(), description="Toy projector files.")

    registry = refcond.from_modules(native, Plugin()).registry
    assert registry.names("checkpoint_format") == ["refcond", "toy"]
    path = write_safetensors(tmp_path / "toy.safetensors", {"toy_proj.weight": torch.ones(4, 2), "toy_proj.bias": torch.zeros(4)})
    imported = import_checkpoint(path, registry)
    assert imported.source == "toy"
    assert imported.composition == {"aggregator": {"config": {"size": 4}}}
    assert sorted(imported.state_dict) == ["aggregator.bias", "aggregator.weight"]


# -- metrics -------------------------------------------------------------------------------------


class BrightnessConfig(ComponentConfig):
    scale: float = 1.0


def brightness(config: BrightnessConfig, context: BuildContext):
    """Mean brightness of each generated image, in [0, scale]."""

    def metric(images, references, prompts) -> dict[str, list[float]]:
        return {"brightness": [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255 * config.scale) for im in images]}

    return metric


def test_hook_refcond_register_metrics():
    class Plugin:
        __name__ = "toy-metrics"

        @refcond.hookimpl
        def refcond_register_metrics(self, register):
            register("brightness", brightness, config=BrightnessConfig)

    registry = refcond.from_modules(Plugin()).registry
    entry = registry.get("metric", "brightness")
    assert entry.description == "Mean brightness of each generated image, in [0, scale]."
    metric = built(registry, "metric", "brightness", scale=10.0)
    assert isinstance(metric, refcond.Metric)
    white, black = PIL.Image.new("RGB", (2, 2), "white"), PIL.Image.new("RGB", (2, 2), "black")
    # One value per generated image; images[i] was generated from references[i] and prompts[i].
    assert metric([white, black, white], [[RED], [RED, BLUE], [BLUE]], ["a", "b", "c"]) == {"brightness": [10.0, 0.0, 10.0]}


# -- recipes -------------------------------------------------------------------------------------


def test_hook_refcond_register_recipes(tmp_path):
    class Plugin:
        __name__ = "toy-recipes"

        @refcond.hookimpl
        def refcond_register_recipes(self, register):
            register("toy-projector", {"composition": "ip-adapter", "stages": [{"name": "toy", "train": ["injector.0.projector"], "steps": 10}]},
                     description="Trains the projector only.")

    registry = refcond.from_modules(Plugin()).registry
    entry = registry.get("recipe", "toy-projector")
    assert entry.description == "Trains the projector only."
    # What `refcond train --recipe toy-projector --data FILE` validates: the recipe plus the user's data.
    from refcond.training import load_train_config

    (tmp_path / "train.jsonl").write_text('{"references": ["a.png"], "image": "b.png", "caption": "x"}\n')
    config = load_train_config(entry.obj, {"data": {"path": str(tmp_path / "train.jsonl")}})
    assert config.stages[0].train == ["injector.0.projector"] and config.stages[0].steps == 10

    class Broken:
        __name__ = "broken-recipes"

        @refcond.hookimpl
        def refcond_register_recipes(self, register):
            register("list", ["not", "a", "table"])

    plugins = refcond.from_modules(Broken())
    with pytest.warns(RuntimeWarning, match="recipe 'list' must be a dict of training-config fields"):
        assert plugins.registry.names("recipe") == []
    assert [failure.plugin for failure in plugins.failures] == ["broken-recipes"]


# -- the convention itself -----------------------------------------------------------------------

HOOK_NAMES = sorted(name for name, value in vars(hookspecs).items() if hasattr(value, "refcond_spec"))


def test_every_hook_has_a_test():
    missing = [name for name in HOOK_NAMES if f"test_hook_{name}" not in globals()]
    assert not missing, f"hooks without a test_hook_<name> test in tests/test_hooks.py: {missing}"


def test_every_hook_is_known_to_the_registry():
    assert HOOK_NAMES == sorted(HOOK_KINDS), "add the new hook to refcond.registry.HOOK_KINDS"


@pytest.mark.parametrize("hook_name", HOOK_NAMES)
def test_every_hook_documents_its_register_callback(hook_name):
    doc = getattr(hookspecs, hook_name).__doc__
    assert "register(" in doc and ":param register:" in doc
