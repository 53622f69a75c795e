"""The conformance checks of refcond.testing: built-in components pass them, broken ones fail them
with a message that says what is wrong."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import save_file

import refcond
from refcond import BuildContext, Condition, ConfigError, ReferenceEncoding
from refcond.aggregators import MeanAggregator
from refcond.backbones import BackboneConfig, SD15Backbone, SDXLBackbone
from refcond.building import build
from refcond.config import validate_config
from refcond.testing import (
    check_aggregator,
    check_backbone,
    check_encoder,
    check_injector,
    make_condition,
    make_encoding,
    reference_images,
    tiny_sdxl_pipeline,
    tiny_unet,
)
from refcond.testing.conformance import PADDING_GARBAGE

# -- built-in components pass -----------------------------------------------------------------------


def _aggregator(plugins, name, **config):
    entry = plugins.registry.get("aggregator", name)
    return entry.obj(validate_config(entry.config, config, where=name), BuildContext())


@pytest.mark.parametrize(("name", "fixed_length"), [("mean", 2), ("weighted-mean", 2), ("concat", None)])
def test_builtin_aggregators_conform(plugins, name, fixed_length):
    condition = check_aggregator(_aggregator(plugins, name), fixed_length=fixed_length)
    assert condition.batch_size == 2


def test_concat_does_not_promise_a_fixed_length(plugins):
    with pytest.raises(AssertionError, match=r"promised 2 condition tokens .* 4 for 2 reference\(s\), 10 for 5"):
        check_aggregator(_aggregator(plugins, "concat"), fixed_length=2)


@pytest.mark.parametrize(("output", "tokens_per_reference"), [("image_embeds", 1), ("hidden_states", 17)])
def test_clip_encoder_conforms_and_chains_into_mean(plugins, sd15_pipe, output, tokens_per_reference):
    from refcond_encoders.clip import ClipEncoder, ClipEncoderConfig

    backbone = SD15Backbone(BackboneConfig(), BuildContext(extras={"pipeline": sd15_pipe}))
    encoder = ClipEncoder.from_config(ClipEncoderConfig(output=output), BuildContext(backbone=backbone))
    encoding = check_encoder(encoder)
    assert encoding.mask.sum(dim=1).tolist() == [2 * tokens_per_reference, tokens_per_reference]
    check_aggregator(_aggregator(plugins, "mean"), encoding, fixed_length=tokens_per_reference)


def test_mllm_encoder_that_reads_the_prompt_conforms():
    from refcond_encoders.mllm import MllmEncoder, MllmEncoderConfig

    from refcond.testing import tiny_qwen2vl, tiny_qwen2vl_processor
    from refcond.testing.qwen2vl import MAX_PIXELS, MIN_PIXELS

    image_processor, tokenizer = tiny_qwen2vl_processor()
    config = MllmEncoderConfig(model=None, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, dtype="float32", append_prompt=True)
    encoder = MllmEncoder.from_model(tiny_qwen2vl(0), image_processor, tokenizer, config)
    assert encoder.reads_prompt is True
    check_encoder(encoder)


def _cross_attention_injector(plugins, pipe, **config):
    if "cross-attention" not in plugins.registry.names("injector"):
        pytest.skip("the cross-attention injector (refcond-injectors) is not installed")
    overrides = {"injectors": [{"name": "cross-attention", "config": config}]} if config else {}
    return build("ip-adapter", plugins, pipeline=pipe, overrides=overrides).injectors[0]


@pytest.mark.parametrize("projector", ["linear", "resampler"])
def test_cross_attention_injector_conforms(plugins, sd15_pipe, projector):
    injector = _cross_attention_injector(plugins, sd15_pipe, projector=projector, num_tokens=4)
    check_injector(injector, sd15_pipe.unet, dim=injector.input_dim)  # padded default condition
    check_injector(injector, sd15_pipe.unet, make_condition(batch=1, length=3, dim=injector.input_dim))  # one group, no padding


def test_cross_attention_injector_conforms_on_sdxl(plugins):
    pipe = tiny_sdxl_pipeline()
    injector = _cross_attention_injector(plugins, pipe)
    check_injector(injector, pipe.unet, dim=injector.input_dim)


def test_lora_injector_conforms_as_an_injector_that_reads_no_condition(plugins, sd15_pipe, tmp_path):
    if "lora" not in plugins.registry.names("injector"):
        pytest.skip("the lora injector (refcond-injectors) is not installed")
    from refcond_injectors.testing import fabricate_lora_state_dict

    path = tmp_path / "style.safetensors"
    save_file(fabricate_lora_state_dict(sd15_pipe, "kohya", seed=1), str(path))
    composition = {"injectors": [{"name": "lora", "config": {"loras": [{"path": str(path)}]}}]}
    injector = build(composition, plugins, pipeline=sd15_pipe).injectors[0]
    check_injector(injector, sd15_pipe.unet, reads_condition=False)
    # It changes the UNet whatever the condition, so the checks of injectors that read one reject it.
    with pytest.raises(AssertionError, match=r"does not read the condition. An injector that reads no condition by design \(LoRA files\) is checked with reads_condition=False"):
        check_injector(injector, sd15_pipe.unet)


@pytest.mark.parametrize(("cls", "builder"), [(SD15Backbone, "sd15_pipe"), (SDXLBackbone, "sdxl_pipe")], ids=["sd15", "sdxl"])
def test_builtin_backbones_conform(request, cls, builder):
    pipe = request.getfixturevalue(builder)
    check_backbone(cls(BackboneConfig(), BuildContext(extras={"pipeline": pipe})), pipe)
    check_backbone(cls(BackboneConfig(model="org/some-model"), BuildContext(extras={"pipeline": pipe})))


def test_make_condition_pads_with_garbage():
    condition = make_condition(2, 4, 8, valid=(4, 2))
    assert condition.mask.tolist() == [[True] * 4, [True, True, False, False]]
    padding = condition.tokens[1, 2:]
    assert padding.abs().mean() > PADDING_GARBAGE / 10  # large values, not zeros: reading them shows
    assert condition.tokens[condition.mask].abs().max() < 10
    with pytest.raises(ValueError, match="valid must give 1..4 real tokens for each of the 2 rows"):
        make_condition(2, 4, 8, valid=(4,))


# -- broken encoders fail ---------------------------------------------------------------------------

class LegacyToyEncoder(torch.nn.Module):
    """Mean colour of each reference -> one token through a Linear; switches break one contract each.

    It declares no ``reads_prompt``, as an encoder written before the attribute existed.
    """

    def __init__(self, claimed_dim=8, no_grad=False, leak_padding=False, bad_unconditional=False):
        super().__init__()
        self.proj = torch.nn.Linear(3, 8)
        self.embedding_dim = claimed_dim
        self.no_grad, self.leak_padding, self.bad_unconditional = no_grad, leak_padding, bad_unconditional

    def colours(self, group):
        return torch.tensor([im.resize((1, 1)).getpixel((0, 0)) for im in group], dtype=torch.float32) / 255

    def encode(self, references):
        rows = []
        for group in references:
            with torch.set_grad_enabled(not self.no_grad):
                tokens = self.proj(self.colours(group))[None]
            rows.append(ReferenceEncoding(tokens, torch.ones(1, len(group), dtype=torch.bool), torch.arange(len(group))[None]))
        encoding = ReferenceEncoding.concat_batches(rows)
        if self.leak_padding:  # padding marked as real tokens
            encoding = ReferenceEncoding(encoding.tokens, torch.ones_like(encoding.mask), encoding.source.clamp(min=0))
        return encoding

    def encode_unconditional(self, encoding, references):
        if self.bad_unconditional:  # one token per group instead of the encoding's layout
            return ReferenceEncoding(torch.zeros(encoding.batch_size, 1, 8), torch.ones(encoding.batch_size, 1, dtype=torch.bool), torch.zeros(encoding.batch_size, 1, dtype=torch.long))
        return ReferenceEncoding(torch.zeros_like(encoding.tokens), encoding.mask, encoding.source)


class ToyEncoder(LegacyToyEncoder):
    """The toy encoder with the attribute every encoder declares."""

    reads_prompt = False


class PromptToyEncoder(ToyEncoder):
    """A ToyEncoder that reads the prompt: a feature of each group's prompt is added to its tokens."""

    reads_prompt = True

    def __init__(self, ignore_prompts=False, **kwargs):
        super().__init__(**kwargs)
        self.text = torch.nn.Linear(2, 8)
        self.ignore_prompts = ignore_prompts

    def encode(self, references, prompts=None):
        encoding = super().encode(references)
        if prompts is None:
            raise ConfigError("PromptToyEncoder reads the prompt: pass one per group")
        if self.ignore_prompts:
            return encoding
        features = torch.tensor([[len(p) / 50.0, sum(map(ord, p)) % 97 / 97.0] for p in prompts])
        tokens = encoding.tokens + self.text(features)[:, None, :] * encoding.mask[..., None]
        return ReferenceEncoding(tokens, encoding.mask, encoding.source)


class MixingToyEncoder(ToyEncoder):
    """Marks every token as mixing references (source -1), as an MLLM reading a group at once does."""

    def encode(self, references):
        encoding = super().encode(references)
        return ReferenceEncoding(encoding.tokens, encoding.mask, torch.full_like(encoding.source, -1))

    def encode_unconditional(self, encoding, references):
        return ReferenceEncoding(torch.zeros_like(encoding.tokens), encoding.mask, encoding.source)


class NoPromptArgumentEncoder(ToyEncoder):
    """Says it reads the prompt, but its encode() takes no prompts."""

    reads_prompt = True


def _with(component, **attributes):
    for name, value in attributes.items():
        setattr(component, name, value)
    return component


def test_toy_encoders_conform():
    check_encoder(ToyEncoder())
    encoding = check_encoder(PromptToyEncoder())
    assert encoding.batch_size == 2
    check_encoder(PromptToyEncoder(), prompts=["a red fox", "a blue car"])
    check_encoder(_with(MixingToyEncoder(), mixes_references=True))


@pytest.mark.parametrize(
    ("encoder", "message"),
    [
        (lambda: ToyEncoder(claimed_dim=16), r"returned tokens of size 8, but embedding_dim is 16"),
        (lambda: ToyEncoder(no_grad=True), r"without a gradient although it has 2 trainable parameter"),
        (lambda: ToyEncoder(leak_padding=True), r"group 1 gives a different result in a batch than alone"),
        (lambda: ToyEncoder(bad_unconditional=True), r"encode_unconditional\(\) must return the same structure"),
        (LegacyToyEncoder, r"declares no reads_prompt. Add the class attribute `reads_prompt = False`"),
        (lambda: _with(ToyEncoder(), reads_prompt=1), r"reads_prompt must be a bool \(True or False\), got 1 of type int"),
        (lambda: PromptToyEncoder(ignore_prompts=True), r"reads_prompt is True, but group 0 encodes the same with the prompt 'a photo of a dog"),
        (MixingToyEncoder, r"every token encode\(\) returned has source -1 .* Add the class attribute `mixes_references = True`"),
        (lambda: _with(ToyEncoder(), mixes_references=True), r"mixes_references is True, but encode\(\) returned tokens with reference indices as source"),
        (NoPromptArgumentEncoder, r"(?s)reads_prompt is True, so the pipeline calls encode\(references, prompts=.*TypeError.*Accept a `prompts` keyword"),
    ],
    ids=["wrong-dim", "no-grad", "unmasked-padding", "unconditional-layout", "no-reads-prompt", "reads-prompt-not-bool", "prompt-ignored", "undeclared-mixing", "mixing-declared-wrongly", "no-prompts-argument"],
)
def test_check_encoder_fails_on_a_broken_encoder(encoder, message):
    component = encoder()
    with pytest.raises(AssertionError, match=message) as excinfo:
        check_encoder(component)
    assert type(component).__name__ in str(excinfo.value)  # the message names the component


def test_check_encoder_gives_prompts_only_to_an_encoder_that_reads_them():
    with pytest.raises(ValueError, match="prompts are only given to an encoder with reads_prompt = True"):
        check_encoder(ToyEncoder(), prompts=["a", "b"])
    with pytest.raises(ValueError, match="one prompt per group: got 1 prompts for 2 groups"):
        check_encoder(PromptToyEncoder(), prompts=["a"])


# -- broken aggregators fail ------------------------------------------------------------------------


class WrongDimAggregator(torch.nn.Module):
    """Claims to keep the feature size but concatenates every token with itself."""

    def output_dim(self, input_dim):
        return input_dim

    def forward(self, encoding, weights=None):
        return Condition(torch.cat([encoding.tokens, encoding.tokens], dim=-1), encoding.mask, encoding.source)


class PaddingMeanAggregator(torch.nn.Module):
    """Averages over every position of the row, padding included."""

    def output_dim(self, input_dim):
        return input_dim

    def forward(self, encoding, weights=None):
        tokens = encoding.tokens.mean(dim=1, keepdim=True)
        return Condition(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool), torch.full(tokens.shape[:2], -1))


def test_check_aggregator_fails_on_wrong_dim():
    with pytest.raises(AssertionError, match=r"WrongDimAggregator: returned condition tokens of size 16, but output_dim\(8\) is 8"):
        check_aggregator(WrongDimAggregator())


def test_check_aggregator_fails_when_padding_leaks_in():
    with pytest.raises(AssertionError, match=r"group 1 gives a different result in a batch than alone"):
        check_aggregator(PaddingMeanAggregator())


class DetachingAggregator(torch.nn.Module):
    """The built-in mean, fed detached tokens: training through it would silently stop."""

    def output_dim(self, input_dim):
        return input_dim

    def forward(self, encoding, weights=None):
        return MeanAggregator()(ReferenceEncoding(encoding.tokens.detach(), encoding.mask, encoding.source))


def test_check_aggregator_fails_when_gradients_stop():
    with pytest.raises(AssertionError, match=r"carries no gradient back to the encoding"):
        check_aggregator(DetachingAggregator())


# -- broken injectors fail --------------------------------------------------------------------------


class HookInjector:
    """Adds to each row of the UNet output a number read from that row's condition (the mean of its
    real tokens, times the scale), through a forward hook on ``conv_out``.

    A working injector of another design than cross-attention (so the checks are generic): under
    guidance it binds ``[unconditional; condition]`` rows, ignores padding and does nothing at
    scale 0. Each switch breaks one part of the contract.
    """

    def __init__(
        self,
        remove_hook=True,
        unbind=True,
        use_condition=True,
        restore_processors=True,
        touch_weights=False,
        swap_rows=False,
        read_padding=False,
        scale_zero_as_one=False,
        refuse_padding=False,
        unconditional_everywhere=False,
        first_rows_without_guidance=False,
    ):
        self.remove_hook, self.unbind, self.use_condition = remove_hook, unbind, use_condition
        self.restore_processors, self.touch_weights = restore_processors, touch_weights
        self.swap_rows, self.read_padding, self.scale_zero_as_one = swap_rows, read_padding, scale_zero_as_one
        self.refuse_padding = refuse_padding
        self.unconditional_everywhere, self.first_rows_without_guidance = unconditional_everywhere, first_rows_without_guidance

    def shift(self, condition):
        """One number per row: the mean of its real tokens (of every token, with read_padding)."""
        mask = torch.ones_like(condition.mask) if self.read_padding else condition.mask
        weights = mask[..., None].to(condition.tokens)
        return (condition.tokens * weights).sum(dim=(1, 2)) / (weights.sum(dim=(1, 2)) * condition.dim)

    def attach(self, unet):
        injector, state = self, {"rows": None}

        def hook(module, args, output):
            rows = state["rows"]
            if rows is None or not injector.use_condition:
                return None
            if injector.first_rows_without_guidance:  # a batch without guidance fed the unconditional rows
                rows = rows[: output.shape[0]]
            rows = rows[-output.shape[0] :]  # a batch without guidance holds the conditional rows only
            return output + rows.to(output)[:, None, None, None]

        handle = unet.conv_out.register_forward_hook(hook)
        originals = unet.attn_processors
        backup = unet.conv_out.bias.detach().to(torch.float16)  # a backup kept in half precision
        if not self.restore_processors:
            unet.set_attn_processor(AttnProcessor2_0())

        class Attachment:
            @contextmanager
            def condition(self, condition, unconditional, scale=None):
                if injector.refuse_padding and not bool(condition.mask.all()):
                    raise ConfigError("HookInjector needs an aggregator of fixed length, such as 'mean'")
                scale = 1.0 if scale is None else float(scale)
                if injector.scale_zero_as_one:  # the classic `scale or 1.0`
                    scale = scale or 1.0
                if condition is None:  # a composition without encoder: nothing to read
                    yield
                    return
                if scale != 0:
                    parts = [condition] if unconditional is None else [unconditional, condition]
                    if injector.unconditional_everywhere and unconditional is not None:  # a typo: both halves read it
                        parts = [unconditional, unconditional]
                    if injector.swap_rows:
                        parts.reverse()
                    state["rows"] = scale * torch.cat([injector.shift(part) for part in parts])
                try:
                    yield
                finally:
                    if injector.unbind:
                        state["rows"] = None

            def detach(self):
                if injector.remove_hook:
                    handle.remove()
                if injector.restore_processors:
                    unet.set_attn_processor(originals)
                if injector.touch_weights:  # "restores" a weight from its half-precision backup
                    with torch.no_grad():
                        unet.conv_out.bias.copy_(backup)

        return Attachment()


def test_hook_injector_conforms():
    check_injector(HookInjector())
    check_injector(HookInjector(), condition=make_condition(batch=3, length=5, dim=32, valid=(5, 1, 3)))


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"remove_hook": False}, r"(?s)detach\(\) must restore the UNet exactly .*forward hooks left behind on \['conv_out'\]"),
        ({"restore_processors": False}, r"attention processors are not the original objects at \d+ layer"),
        ({"touch_weights": True}, r"(?s)detach\(\) must restore .* 1 weight\(s\) changed, e.g. \['conv_out.bias'\]"),
        ({"unbind": False}, r"after the `with attachment.condition\(...\)` block, .*[Tt]he condition must be unbound when the block ends"),
        ({"use_condition": False}, r"equals the plain output: the condition does not reach the UNet"),
        (
            {"swap_rows": True},
            r"(?s)\[unconditional rows; conditional rows\] \(diffusers' order.*rows 0..1 must read `unconditional`.*"
            r"they read `condition` instead: the two halves are swapped",
        ),
        ({"unconditional_everywhere": True}, r"The conditional rows differ from a run with `condition` bound alone on those rows"),
        (
            {"first_rows_without_guidance": True},
            r"without guidance \(guidance_scale <= 1\) the UNet batch holds the 2 conditional rows only, but with \(condition, unconditional\) bound",
        ),
        ({"read_padding": True}, r"group 1 \(2 real tokens of 4\) gives another UNet output in a padded batch than alone without padding"),
        ({"scale_zero_as_one": True}, r"at reference_scale 0 the UNet output on a guidance batch must equal the plain UNet's exactly"),
        ({"refuse_padding": True}, r"(?s)raised ConfigError: HookInjector needs an aggregator of fixed length.*pass padding=False"),
    ],
    ids=["hook-left", "processors-replaced", "weights-changed", "still-bound", "condition-ignored", "guidance-rows-swapped", "conditional-rows-read-unconditional", "unguided-rows-read-unconditional", "reads-padding", "acts-at-scale-0", "refuses-padding"],
)
def test_check_injector_fails_on_a_broken_injector(broken, message):
    with pytest.raises(AssertionError, match=message) as excinfo:
        check_injector(HookInjector(**broken), tiny_unet())
    assert "HookInjector" in str(excinfo.value)


def test_the_guidance_check_sees_a_swap_in_a_caller_condition_without_padding():
    with pytest.raises(AssertionError, match="the two halves are swapped"):
        check_injector(HookInjector(swap_rows=True), condition=make_condition(batch=1, length=2, dim=32))


def test_an_injector_that_refuses_padding_is_checked_with_padding_false():
    check_injector(HookInjector(refuse_padding=True), padding=False)
    with pytest.raises(AssertionError, match=r"with padding=False, a condition with padding \(2 groups of 4 and 2 real tokens\) was accepted"):
        check_injector(HookInjector(), padding=False)


def test_a_failed_check_leaves_the_unet_as_it_was():
    unet = tiny_unet()
    inputs = {"sample": torch.randn(1, 4, 16, 16), "timestep": torch.tensor(500), "encoder_hidden_states": torch.randn(1, 7, 32)}
    with torch.no_grad():
        plain = unet(**inputs).sample
    with pytest.raises(AssertionError, match="swapped"):
        check_injector(HookInjector(swap_rows=True), unet)
    with pytest.raises(AssertionError, match="does not read the condition"):
        check_injector(ConstantInjector(), unet)  # it changes the UNet from attach to detach
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, plain)


class ConstantInjector:
    """Adds a constant to the UNet output from attach to detach, whatever the condition: an injector
    that reads no condition (as LoRA files)."""

    def __init__(self, remove_hook=True, needs_condition=False):
        self.remove_hook, self.needs_condition = remove_hook, needs_condition

    def attach(self, unet):
        injector = self
        handle = unet.conv_out.register_forward_hook(lambda module, args, output: output + 0.5)

        class Attachment:
            @contextmanager
            def condition(self, condition, unconditional, scale=None):
                if injector.needs_condition:
                    condition.tokens.sum()  # AttributeError on None
                yield

            def detach(self):
                if injector.remove_hook:
                    handle.remove()

        return Attachment()


def test_an_injector_that_reads_no_condition_is_checked_with_reads_condition_false():
    check_injector(ConstantInjector(), reads_condition=False)
    with pytest.raises(AssertionError, match=r"checked with reads_condition=False"):
        check_injector(ConstantInjector())
    with pytest.raises(AssertionError, match=r"forward hooks left behind on \['conv_out'\]"):
        check_injector(ConstantInjector(remove_hook=False), reads_condition=False)
    with pytest.raises(AssertionError, match=r"(?s)binding condition\(None, None, 1.0\).*AttributeError.*bound with None, None when the composition has no encoder"):
        check_injector(ConstantInjector(needs_condition=True), reads_condition=False)
    with pytest.raises(AssertionError, match=r"reads_condition=False, but the UNet output on a guidance batch differs with a condition bound"):
        check_injector(HookInjector(), reads_condition=False)


# -- broken backbones fail --------------------------------------------------------------------------


class SketchBackbone:
    """A backbone written from the protocol by a third party (not derived from refcond's DiffusersBackbone),
    in a first draft that lacks ``model_id``."""

    name = "sketch"

    def __init__(self, pipeline):
        self.pipeline = pipeline

    @classmethod
    def accepts(cls, pipeline):
        return isinstance(getattr(pipeline, "unet", None), UNet2DConditionModel)

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def cross_attention_dim(self):
        return int(self.unet.config.cross_attention_dim)

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype


class CompleteSketchBackbone(SketchBackbone):
    """The draft with ``model_id``: it conforms."""

    @property
    def model_id(self):
        return None


def _broken_backbone(**members):
    return type("BrokenSketchBackbone", (CompleteSketchBackbone,), members)


def test_a_third_party_backbone_conforms(sd15_pipe):
    check_backbone(CompleteSketchBackbone(sd15_pipe), sd15_pipe)


def test_a_backbone_that_passes_check_backbone_builds_generates_and_saves(sd15_pipe, tmp_path):
    """What the conformance check promises: a backbone with the protocol's members works end to end, save() included."""

    class Backbones:
        __name__ = "sketch-backbones"

        @refcond.hookimpl
        def refcond_register_backbones(self, register):
            register("sketch", lambda config, context: CompleteSketchBackbone(context.extras["pipeline"]))

    plugins = refcond.load_plugins()
    plugins.register(Backbones())
    rp = refcond.from_pipe(sd15_pipe, "ip-adapter", plugins=plugins, backbone="sketch", seed=0)
    rp("a cat", reference_images(1), num_inference_steps=1, output_type="latent")
    with pytest.warns(UserWarning, match="built in memory"):
        path = rp.save(tmp_path / "sketch.safetensors")
    assert refcond.describe_checkpoint(path)["provenance"]["components"]["backbone"]["plugin"] == "sketch-backbones"
    rp.detach()


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (SketchBackbone, r"SketchBackbone: the Backbone member `model_id` is missing .* Add a property `model_id` returning the hub id"),
        (_broken_backbone(device=property(lambda self: torch.device("meta"))), r"`device` must be the torch.device of the UNet's parameters \(cpu\), .* got device\(type='meta'\)"),
        (_broken_backbone(device=property(lambda self: "cpu")), r"`device` must be the torch.device of the UNet's parameters \(cpu\), .* got 'cpu'"),
        (_broken_backbone(dtype=property(lambda self: torch.float16)), r"`dtype` must be the torch.dtype of the UNet's parameters \(torch.float32\)"),
        (_broken_backbone(cross_attention_dim=property(lambda self: (32,))), r"`cross_attention_dim` must be the int unet.config.cross_attention_dim \(32\)"),
        (_broken_backbone(model_id=property(lambda self: "")), r"`model_id` must be a hub id or local folder \(a non-empty str\), or None"),
        (_broken_backbone(name=None), r"`name` must be a non-empty str"),
        (_broken_backbone(unet=property(lambda self: tiny_unet())), r"`unet` is not `pipeline.unet`"),
        (_broken_backbone(accepts=lambda self, pipeline: True), r"`accepts` must be a classmethod \(or staticmethod\)"),
        (
            _broken_backbone(accepts=classmethod(lambda cls, pipeline: pipeline.unet is not None)),
            r"accepts\(<an object that is no pipeline>\) raised AttributeError.* must answer False for pipelines it cannot drive, never raise",
        ),
        (_broken_backbone(accepts=classmethod(lambda cls, pipeline: 1)), r"accepts\(backbone.pipeline\) must be True \(a bool\)"),
    ],
    ids=["no-model-id", "wrong-device", "device-as-str", "wrong-dtype", "dim-not-int", "empty-model-id", "no-name", "other-unet", "accepts-not-classmethod", "accepts-raises", "accepts-not-bool"],
)
def test_check_backbone_fails_on_a_broken_backbone(sd15_pipe, cls, message):
    with pytest.raises(AssertionError, match=message):
        check_backbone(cls(sd15_pipe))


def test_check_backbone_wants_the_pipeline_it_was_built_from(sd15_pipe):
    copy = type(sd15_pipe)(**sd15_pipe.components)
    with pytest.raises(AssertionError, match=r"`pipeline` is a StableDiffusionPipeline other than the pipeline it was built from"):
        check_backbone(CompleteSketchBackbone(copy), sd15_pipe)


# -- inputs -----------------------------------------------------------------------------------------


def test_make_encoding_pads_the_shorter_group():
    encoding = make_encoding([3, 1], tokens_per_reference=2, dim=4)
    assert encoding.tokens.shape == (2, 6, 4)
    assert encoding.mask.sum(dim=1).tolist() == [6, 2]
    assert encoding.source[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert make_encoding([2], mixed=True).source.unique().tolist() == [-1]


def test_reference_groups_can_be_given():
    groups = [reference_images(1, seed=3), reference_images(4, seed=4), reference_images(2, seed=5)]
    encoding = check_encoder(ToyEncoder(), groups)
    assert encoding.mask.sum(dim=1).tolist() == [1, 4, 2]
