"""RefcondPipeline: compositions without an encoder, detaching, call arguments checked up front,
and compositions that cannot work refused when they are built."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from refcond_easyref.testing import tiny_easyref_overrides

import refcond
from refcond import EmptyConfig, ReferenceAdapter
from refcond.testing import reference_images


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

        class StuckAttachment(StaticAttachment):
            def detach(self) -> None:
                super().detach()
                raise refcond.RefcondError("cannot detach: someone replaced my processors")

        class Stuck:
            def attach(self, unet):
                return StuckAttachment(log)

        register("adapting", lambda config, context: Adapting(), config=EmptyConfig)
        register("static", lambda config, context: Static(), config=EmptyConfig)
        register("broken", lambda config, context: Broken(), config=EmptyConfig)
        register("stuck", lambda config, context: Stuck(), config=EmptyConfig)


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


def test_detach_detaches_every_injector_even_when_one_raises(sd15_pipe, plugins_with_injectors):
    plugins, log = plugins_with_injectors
    rp = refcond.from_pipe(sd15_pipe, {"injectors": ["static", "stuck", "static"]}, plugins=plugins)
    with pytest.raises(refcond.RefcondError, match="someone replaced my processors"):
        rp.detach()
    assert log == [("detach",), ("detach",), ("detach",)]  # the first one too, after the one that raised
    assert rp.attachments == []


# -- call arguments ------------------------------------------------------------------------------


def _latents(rp, prompt, references, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "latent", "generator": torch.Generator().manual_seed(0), **kwargs}
    return rp(prompt, references=references, **kwargs).images


def test_per_group_weights_for_groups_of_different_sizes(sd15_pipe):
    rp = refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, aggregator="weighted-mean")
    refs = reference_images(3)
    both = _latents(rp, ["a cat", "a dog"], [refs[:2], refs[2:]], reference_weights=[[3.0, 1.0], [1.0]])
    first = _latents(rp, "a cat", refs[:2], reference_weights=[3.0, 1.0])
    assert torch.allclose(both[:1], first, atol=1e-4)
    with pytest.raises(refcond.ConfigError, match="reference_weights for group 1 has 2 weights, but the group has 1 references"):
        _latents(rp, ["a cat", "a dog"], [refs[:2], refs[2:]], reference_weights=[[3.0, 1.0], [1.0, 2.0]])
    with pytest.raises(refcond.ConfigError, match="reference_weights must be a list of numbers"):
        _latents(rp, "a cat", refs[:2], reference_weights="12")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), {"up": float("-inf")}])
def test_a_non_finite_reference_scale_is_refused(sd15_pipe, scale):
    rp = refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0)
    with pytest.raises(refcond.ConfigError, match="must be a finite number"):
        _latents(rp, "a cat", reference_images(1), reference_scale=scale)


def test_a_negative_reference_scale_is_allowed(sd15_pipe):
    rp = refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0)
    assert torch.isfinite(_latents(rp, "a cat", reference_images(1), reference_scale=-0.5)).all()


# -- compositions that cannot work ---------------------------------------------------------------


def test_an_mllm_encoder_with_a_per_reference_aggregator_fails_when_built(sdxl_pipe, tiny_qwen2vl_dir: Path):
    for aggregator in ("mean", "weighted-mean"):
        with pytest.raises(refcond.ConfigError, match=f"aggregator '{aggregator}' needs tokens that each come from one reference.*MllmEncoder"):
            refcond.from_pipe(sdxl_pipe, "easyref", **{**tiny_easyref_overrides(tiny_qwen2vl_dir), "aggregator": aggregator})


def test_the_resampler_fed_tokens_that_mix_references_fails_when_built(sdxl_pipe, tiny_qwen2vl_dir: Path):
    overrides = tiny_easyref_overrides(tiny_qwen2vl_dir)
    overrides["injectors"]["cross-attention"] = {"config": {"projector": "resampler"}}
    with pytest.raises(refcond.ConfigError, match="'resampler' projector needs tokens that each come from one reference"):
        refcond.from_pipe(sdxl_pipe, "easyref", **overrides)
    assert all(isinstance(p, AttnProcessor2_0) for p in sdxl_pipe.unet.attn_processors.values())


class UserProcessor(AttnProcessor2_0):
    """A user's own attention processor (as xformers' or a custom one)."""


def test_a_users_own_attention_processor_is_not_silently_bypassed(sd15_pipe):
    sd15_pipe.unet.set_attn_processor(UserProcessor())
    with pytest.raises(refcond.ConfigError, match=r"runs attention processor UserProcessor.*set_default_attn_processor"):
        refcond.from_pipe(sd15_pipe, "ip-adapter")
    assert all(isinstance(p, UserProcessor) for p in sd15_pipe.unet.attn_processors.values())  # left as it was


# -- every call argument is checked before anything runs (issue: bad input gets a clear error) ----


@pytest.fixture
def weighted(sd15_pipe):
    rp = refcond.from_pipe(sd15_pipe, "ip-adapter", seed=0, aggregator="weighted-mean")
    yield rp
    rp.detach()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"reference_scale": {"up": None}}, r"reference_scale up\.block_0 must be a number"),
        ({"reference_scale": {None: 1.0}}, r"unknown block group\(s\) \['None'\]"),
        ({"reference_scale": {"up": {3: 1.0}}}, r"up has no block\(s\) with attention layers named \['3'\]"),
        ({"reference_scale": 1e38}, r"strengths lie within ±1000"),
        ({"reference_weights": "12"}, r"reference_weights must be a list of numbers"),
        ({"reference_weights": [1.0, None]}, r"reference_weights for group 0, reference 1 must be a number, got None"),
        ({"reference_weights": [[1.0, 2.0], 3.0]}, r"must be a number, got \[1\.0, 2\.0\]"),
        ({"reference_weights": 2.0}, r"reference_weights must be a list of numbers"),
        ({"reference_weights": torch.tensor(2.0)}, r"reference_weights is a scalar"),
        ({"reference_weights": [1e38, 1e38]}, r"weights are relative, so keep them within ±1000"),
        ({"num_images_per_prompt": -1}, r"num_images_per_prompt must be between 1 and 1024, got -1"),
        ({"num_images_per_prompt": 0}, r"num_images_per_prompt must be between 1 and 1024, got 0"),
        ({"num_images_per_prompt": 2**63}, r"num_images_per_prompt must be between 1 and 1024"),
        ({"num_images_per_prompt": "2"}, r"num_images_per_prompt must be an integer, got '2'"),
        ({"num_images_per_prompt": 2.0}, r"num_images_per_prompt must be an integer, got 2\.0"),
        ({"num_images_per_prompt": None}, r"num_images_per_prompt must be an integer, got None"),
        ({"prompt": []}, r"prompt is an empty list"),
        ({"prompt": ["a cat", 3]}, r"prompt\[1\] is a int, not a string"),
        ({"negative_prompt": ["blurry", "dark"]}, r"negative_prompt has 2 entries for 1 prompt\(s\)"),
        ({"height": 36}, r"refuses these arguments: `height` and `width` have to be divisible by 8"),
        ({"guidance_scale": float("nan")}, r"guidance_scale must be a finite number"),
        ({"num_inference_step": 2}, r"takes no argument 'num_inference_step'\. Did you mean 'num_inference_steps'\?"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_bad_call_arguments_are_config_errors(weighted, arguments, message):
    arguments = {"prompt": "a cat", **arguments}
    with pytest.raises(refcond.ConfigError, match=message):
        _latents(weighted, arguments.pop("prompt"), reference_images(2), **arguments)


def test_a_tuple_of_prompts_and_a_tensor_of_weights_are_accepted(weighted):
    refs = reference_images(2)
    as_tuple = _latents(weighted, ("a cat", "a dog"), refs, reference_weights=torch.tensor([2.0, 1.0]))
    as_list = _latents(weighted, ["a cat", "a dog"], refs, reference_weights=[2.0, 1.0])
    assert torch.equal(as_tuple, as_list)


def test_bind_refuses_what_is_no_condition(weighted):
    condition, _ = weighted.encode([reference_images(1)])
    with pytest.raises(refcond.ConfigError, match=r"the cross-attention injector reads a condition"):
        with weighted.bind(None):
            pass
    with pytest.raises(refcond.ConfigError, match=r"condition must be a refcond\.Condition .* got Tensor"):
        with weighted.bind(condition.tokens):
            pass
    with pytest.raises(refcond.ConfigError, match=r"an unconditional condition needs the condition it pairs with"):
        with weighted.bind(None, condition):
            pass
