"""The conformance checks of refcond.testing: built-in components pass them, broken ones fail them
with a message that says what is wrong."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from refcond import BuildContext, Condition, ReferenceEncoding
from refcond.aggregators import MeanAggregator
from refcond.backbones import BackboneConfig, SD15Backbone
from refcond.building import build
from refcond.config import validate_config
from refcond.testing import (
    check_aggregator,
    check_encoder,
    check_injector,
    make_condition,
    make_encoding,
    reference_images,
    tiny_unet,
)

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


def test_cross_attention_injector_conforms(plugins, sd15_pipe):
    if "cross-attention" not in plugins.registry.names("injector"):
        pytest.skip("the cross-attention injector (refcond-injectors) is not installed")
    injector = build("ip-adapter", plugins, pipeline=sd15_pipe).injectors[0]
    check_injector(injector, sd15_pipe.unet, make_condition(batch=2, length=3, dim=injector.input_dim))


# -- broken encoders fail ---------------------------------------------------------------------------


class ToyEncoder(torch.nn.Module):
    """Mean colour of each reference -> one token through a Linear; switches break one contract each."""

    def __init__(self, claimed_dim=8, no_grad=False, leak_padding=False, bad_unconditional=False):
        super().__init__()
        self.proj = torch.nn.Linear(3, 8)
        self.embedding_dim = claimed_dim
        self.no_grad, self.leak_padding, self.bad_unconditional = no_grad, leak_padding, bad_unconditional

    def encode(self, references):
        rows = []
        for group in references:
            colours = torch.tensor([im.resize((1, 1)).getpixel((0, 0)) for im in group], dtype=torch.float32) / 255
            with torch.set_grad_enabled(not self.no_grad):
                tokens = self.proj(colours)[None]
            rows.append(ReferenceEncoding(tokens, torch.ones(1, len(group), dtype=torch.bool), torch.arange(len(group))[None]))
        encoding = ReferenceEncoding.concat_batches(rows)
        if self.leak_padding:  # padding marked as real tokens
            encoding = ReferenceEncoding(encoding.tokens, torch.ones_like(encoding.mask), encoding.source.clamp(min=0))
        return encoding

    def encode_unconditional(self, encoding, references):
        if self.bad_unconditional:  # one token per group instead of the encoding's layout
            return ReferenceEncoding(torch.zeros(encoding.batch_size, 1, 8), torch.ones(encoding.batch_size, 1, dtype=torch.bool), torch.zeros(encoding.batch_size, 1, dtype=torch.long))
        return ReferenceEncoding(torch.zeros_like(encoding.tokens), encoding.mask, encoding.source)


def test_toy_encoder_conforms():
    check_encoder(ToyEncoder())


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"claimed_dim": 16}, r"returned tokens of size 8, but embedding_dim is 16"),
        ({"no_grad": True}, r"without a gradient although it has 2 trainable parameter"),
        ({"leak_padding": True}, r"group 1 gives a different result in a batch than alone"),
        ({"bad_unconditional": True}, r"encode_unconditional\(\) must return the same structure"),
    ],
    ids=["wrong-dim", "no-grad", "unmasked-padding", "unconditional-layout"],
)
def test_check_encoder_fails_on_a_broken_encoder(broken, message):
    with pytest.raises(AssertionError, match=message) as excinfo:
        check_encoder(ToyEncoder(**broken))
    assert "ToyEncoder" in str(excinfo.value)  # the message names the component


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
    """Adds the bound condition's mean to the UNet output through a forward hook.

    A working injector of another design than cross-attention (so the check is generic); each
    switch breaks one part of the contract.
    """

    def __init__(self, remove_hook=True, unbind=True, use_condition=True, restore_processors=True, touch_weights=False):
        self.remove_hook, self.unbind, self.use_condition = remove_hook, unbind, use_condition
        self.restore_processors, self.touch_weights = restore_processors, touch_weights

    def attach(self, unet):
        injector, state = self, {"bound": None}

        def hook(module, args, output):
            if state["bound"] is not None and injector.use_condition:
                return output + state["bound"]
            return None

        handle = unet.conv_out.register_forward_hook(hook)
        originals = unet.attn_processors
        if not self.restore_processors:
            unet.set_attn_processor(AttnProcessor2_0())

        class Attachment:
            @contextmanager
            def condition(self, condition, unconditional, scale=None):
                state["bound"] = float(scale or 1.0) * condition.tokens.mean()
                if injector.touch_weights:  # "fuse" a shift into the weights, and "unfuse" it inexactly
                    with torch.no_grad():
                        unet.conv_out.bias.add_(10.0)
                try:
                    yield
                finally:
                    if injector.unbind:
                        state["bound"] = None
                    if injector.touch_weights:
                        with torch.no_grad():
                            unet.conv_out.bias.sub_(10.0)

            def detach(self):
                if injector.remove_hook:
                    handle.remove()
                if injector.restore_processors:
                    unet.set_attn_processor(originals)

        return Attachment()


def test_hook_injector_conforms():
    check_injector(HookInjector())


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"remove_hook": False}, r"(?s)detach\(\) must restore the UNet exactly .*forward hooks left behind on \['conv_out'\]"),
        ({"restore_processors": False}, r"attention processors are not the original objects at \d+ layer"),
        ({"touch_weights": True}, r"(?s)detach\(\) must restore .* 1 weight\(s\) changed, e.g. \['conv_out.bias'\]"),
        ({"unbind": False}, r"after the `with attachment.condition\(...\)` block, the UNet output still differs"),
        ({"use_condition": False}, r"equals the plain output: the condition does not reach the UNet"),
    ],
    ids=["hook-left", "processors-replaced", "weights-changed", "still-bound", "condition-ignored"],
)
def test_check_injector_fails_on_a_broken_injector(broken, message):
    with pytest.raises(AssertionError, match=message):
        check_injector(HookInjector(**broken), tiny_unet())


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
