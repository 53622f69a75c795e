"""RefcondPipeline with compositions that have no encoder: injectors that read no condition."""

from __future__ import annotations

from contextlib import nullcontext

import pytest

import refcond
from refcond import EmptyConfig, ReferenceAdapter


class StaticAttachment:
    """Reads no condition and learns nothing (as a LoRA loaded from a file)."""

    def __init__(self, log: list) -> None:
        self.log = log

    def condition(self, condition, unconditional, scale=None):
        self.log.append(("condition", condition, unconditional))
        return nullcontext()

    def detach(self) -> None:
        self.log.append(("detach",))


class RecordingAttachment(StaticAttachment):
    """Records what a tuning-based injector is handed before generation."""

    def adapt(self, references, captions=None) -> None:
        self.log.append(("adapt", len(references), captions))


class Injectors:
    __name__ = "test-injectors"

    def __init__(self) -> None:
        self.log: list = []

    @refcond.hookimpl
    def refcond_register_injectors(self, register):
        log = self.log

        class Adapting:
            def attach(self, unet):
                return RecordingAttachment(log)

        class Static:
            def attach(self, unet):
                return StaticAttachment(log)

        class Broken:
            def attach(self, unet):
                raise refcond.IncompatibleBackboneError("this UNet has no layer I know")

        register("adapting", lambda config, context: Adapting(), config=EmptyConfig)
        register("static", lambda config, context: Static(), config=EmptyConfig)
        register("broken", lambda config, context: Broken(), config=EmptyConfig)


@pytest.fixture
def plugins_with_injectors(plugins):
    injectors = Injectors()
    plugins.register(injectors, name="test-injectors")
    return plugins, injectors.log


def test_a_reference_adapter_gets_the_group_and_captions_and_no_condition(sd15_pipe, references, plugins_with_injectors):
    plugins, log = plugins_with_injectors
    rp = refcond.from_pipe(sd15_pipe, {"injectors": ["adapting"]}, plugins=plugins)
    assert isinstance(rp._attachments[0], ReferenceAdapter)
    rp("a cat", references=references, reference_captions=["one", "two", "three"], num_inference_steps=1, output_type="latent")
    assert log == [("adapt", 3, ["one", "two", "three"]), ("condition", None, None)]
    rp("a cat", num_inference_steps=1, output_type="latent")  # no references: generates with what it learnt
    assert log[-1] == ("condition", None, None)


def test_references_without_encoder_or_adapter_are_refused(sd15_pipe, references, plugins_with_injectors):
    plugins, _ = plugins_with_injectors
    rp = refcond.from_pipe(sd15_pipe, {"injectors": ["static"]}, plugins=plugins)
    with pytest.raises(refcond.ReferenceImageError, match="no encoder and no injector that learns from references"):
        rp("a cat", references=references, num_inference_steps=1, output_type="latent")
    with pytest.raises(refcond.ConfigError, match="has no encoder"):
        rp.encode([references])


def test_an_adapter_takes_one_group_for_all_prompts(sd15_pipe, references, plugins_with_injectors):
    plugins, _ = plugins_with_injectors
    rp = refcond.from_pipe(sd15_pipe, {"injectors": ["adapting"]}, plugins=plugins)
    with pytest.raises(refcond.ReferenceImageError, match="takes one group for all prompts"):
        rp(["a", "b"], references=[references[:1], references[1:]], num_inference_steps=1, output_type="latent")


def test_a_failed_attach_undoes_the_injectors_attached_before_it(sd15_pipe, plugins_with_injectors):
    plugins, log = plugins_with_injectors
    with pytest.raises(refcond.IncompatibleBackboneError, match="no layer I know"):
        refcond.from_pipe(sd15_pipe, {"injectors": ["static", "broken"]}, plugins=plugins)
    assert log == [("detach",)]
