"""The ``mllm`` encoder: Qwen2-VL over all references + instruction, trunk = all decoder layers but the last.

Each of EasyRef's traps has a test that fails if the behaviour differs from the official code: the
final norm is applied, positions are plain 1-D, every image goes through the vision tower on its
own. The oracle is transformers' own Qwen2-VL forward on a copy of the model with its last decoder
layer removed, as the official code builds its trunk.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from PIL import Image
from refcond_encoders.mllm import (
    EASYREF_INSTRUCTION,
    OFFICIAL_MAX_PIXELS,
    OFFICIAL_MIN_PIXELS,
    QWEN2VL_CHAT_TEMPLATE,
    MllmEncoder,
    MllmEncoderConfig,
)

import refcond
from refcond import MIXED_SOURCE, BuildContext, ConfigError, ReferenceImageError, load_references
from refcond.plugins import load_plugins
from refcond.testing import check_encoder, reference_images, tiny_sdxl_pipeline
from refcond.testing.qwen2vl import (
    MAX_PIXELS,
    MIN_PIXELS,
    tiny_qwen2vl,
    tiny_qwen2vl_image_processor,
    tiny_qwen2vl_processor,
    tiny_qwen2vl_tokenizer,
)

TINY = {
    "model": None,
    "min_pixels": MIN_PIXELS,
    "max_pixels": MAX_PIXELS,
    "dtype": "float32",
}


def make_encoder(seed: int = 0, **options) -> tuple[MllmEncoder, torch.nn.Module]:
    """A tiny encoder and an untouched copy of its full model (the oracle's starting point)."""
    model = tiny_qwen2vl(seed)
    full = copy.deepcopy(model)
    image_processor, tokenizer = tiny_qwen2vl_processor()
    return MllmEncoder.from_model(
        model, image_processor, tokenizer, MllmEncoderConfig(**{**TINY, **options})
    ), full


@pytest.fixture(scope="module")
def encoder_and_full():
    return make_encoder()


@pytest.fixture(scope="module")
def encoder(encoder_and_full):
    return encoder_and_full[0]


def official_trunk(full: torch.nn.Module) -> torch.nn.Module:
    """The official trunk: a copy of the whole model with the last decoder layer dropped (nothing else changed)."""
    trunk = copy.deepcopy(full)
    trunk.model.language_model.layers = trunk.model.language_model.layers[:-1]
    return trunk


def mm_token_types(encoder: MllmEncoder, input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids == encoder.image_token_id).int()


# -- inputs: chat template, image placeholders, resolution ----------------------------------------


def test_tiny_tokenizer_speaks_qwen2vl():
    tokenizer = tiny_qwen2vl_tokenizer()
    model = tiny_qwen2vl()
    assert tokenizer.chat_template == QWEN2VL_CHAT_TEMPLATE
    for name, token in [
        ("image_token_id", "<|image_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        assert tokenizer.convert_tokens_to_ids(token) == getattr(model.config, name)
    text = "<|im_start|>user\nVisualize a scene<|im_end|>"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.padding_side == "left"


def test_inputs_follow_the_official_chat_layout(encoder):
    images = reference_images(2, seed=3)
    inputs = encoder.inputs([images], [EASYREF_INSTRUCTION + "a photo of a dog"])
    ids = inputs["input_ids"][0].tolist()
    text = encoder.tokenizer.decode(ids)
    # Each image is <|vision_start|> + grid/merge² image tokens + <|vision_end|>, then the instruction and prompt.
    per_image = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    collapsed = text.replace("<|image_pad|>" * per_image[0], "<|image_pad|>", 2)
    assert collapsed == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + "<|vision_start|><|image_pad|><|vision_end|>" * 2
        + EASYREF_INSTRUCTION
        + "a photo of a dog<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        ids.count(encoder.image_token_id)
        == sum(per_image)
        == inputs["pixel_values"].shape[0] // 4
    )
    assert inputs["attention_mask"].all()


def test_official_resolution_rule_is_the_default():
    config = MllmEncoderConfig()
    assert (
        (config.min_pixels, config.max_pixels)
        == (121 * 28 * 28, 145 * 28 * 28)
        == (OFFICIAL_MIN_PIXELS, OFFICIAL_MAX_PIXELS)
    )
    assert config.instruction == EASYREF_INSTRUCTION
    assert config.model == "Qwen/Qwen2-VL-2B-Instruct"
    # The tiny processor applies the same rule scaled down: a square image becomes 4x4 LLM tokens.
    grid = tiny_qwen2vl_image_processor()(
        images=[Image.new("RGB", (512, 512))], return_tensors="pt"
    )["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]


# -- the trunk and its traps ----------------------------------------------------------------------


def test_trunk_equals_the_official_trunk_with_final_norm_applied(encoder_and_full):
    """Official: ``multimodal_llm.norm = Identity()`` is a no-op, ``hidden_states[-1]`` is after the final norm."""
    encoder, full = encoder_and_full
    group = reference_images(3, seed=4)
    encoding = encoder.encode([group])
    inputs = encoder.inputs([group], [EASYREF_INSTRUCTION])
    trunk = official_trunk(full)
    # The official call: inputs_embeds (images scattered in) and the attention mask only.
    embeds = trunk.model.language_model.embed_tokens(inputs["input_ids"])
    features = torch.cat(
        trunk.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output
    )
    embeds = embeds.masked_scatter(
        (inputs["input_ids"] == encoder.image_token_id)[..., None], features
    )
    with torch.no_grad():
        expected = trunk(
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"],
            output_hidden_states=True,
        ).hidden_states[-1]
        trunk.model.language_model.norm = torch.nn.Identity()
        before_norm = trunk.model(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"]
        ).last_hidden_state
    torch.testing.assert_close(encoding.tokens, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        encoding.tokens, encoder.norm(before_norm), atol=1e-5, rtol=1e-4
    )
    assert not torch.allclose(encoding.tokens, before_norm, atol=1e-3)
    assert encoding.mask.all() and (encoding.source == MIXED_SOURCE).all()


def test_positions_are_plain_1d_not_mrope(encoder_and_full):
    """Official: no ``image_grid_thw`` reaches the decoder, so positions are 0..L-1 on all three M-RoPE axes."""
    encoder, full = encoder_and_full
    group = reference_images(2, seed=5)
    encoding = encoder.encode([group])
    inputs = encoder.inputs([group], [EASYREF_INSTRUCTION])
    trunk = official_trunk(full).model
    length = inputs["input_ids"].shape[1]
    common = {
        key: inputs[key]
        for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    }
    with torch.no_grad():
        one_d = trunk(
            **common, position_ids=torch.arange(length).expand(3, 1, length)
        ).last_hidden_state
        mrope = trunk(
            **common, mm_token_type_ids=mm_token_types(encoder, inputs["input_ids"])
        ).last_hidden_state
    torch.testing.assert_close(encoding.tokens, one_d, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(encoding.tokens, mrope, atol=1e-3)


def test_every_image_goes_through_the_vision_tower_on_its_own(encoder):
    group = reference_images(3, seed=6)
    inputs = encoder.inputs([group], [EASYREF_INSTRUCTION])
    calls = []
    handle = encoder.visual.register_forward_hook(
        lambda module, args, kwargs_or_out: calls.append(args[0].shape[0])
    )
    try:
        with torch.no_grad():
            per_image = encoder.image_features(
                inputs["pixel_values"], inputs["image_grid_thw"]
            )
    finally:
        handle.remove()
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    assert calls == patches  # one call per image, with that image's patches
    with torch.no_grad():
        alone = [
            encoder.visual(p, grid_thw=g[None]).pooler_output
            for p, g in zip(
                inputs["pixel_values"].split(patches), inputs["image_grid_thw"]
            )
        ]
        together = encoder.visual(
            inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]
        ).pooler_output
    torch.testing.assert_close(per_image, torch.cat(alone), atol=0, rtol=0)
    torch.testing.assert_close(
        per_image, together, atol=1e-5, rtol=1e-4
    )  # block-diagonal ViT attention


def test_reference_order_changes_the_encoding(encoder):
    """Causal attention with 1-D positions reads the concatenated image tokens as a sequence."""
    a, b = reference_images(2, seed=7)
    with torch.no_grad():
        forward, backward = (
            encoder.encode([[a, b]]).tokens,
            encoder.encode([[b, a]]).tokens,
        )
    assert forward.shape == backward.shape
    assert not torch.allclose(forward, backward, atol=1e-3)


# -- batches, padding, prompts --------------------------------------------------------------------


def test_groups_of_different_sizes_encode_as_if_alone(encoder):
    small, large = reference_images(1, seed=8), reference_images(3, seed=9)
    with torch.no_grad():
        batch = encoder.encode([small, large])
        alone = [encoder.encode([small]), encoder.encode([large])]
    short, long = (int(m.sum()) for m in batch.mask)
    assert long == alone[1].tokens.shape[1] and short == alone[0].tokens.shape[1] < long
    assert (
        not batch.mask[0, : long - short].any() and batch.mask[0, long - short :].all()
    )  # padded on the left
    assert (batch.tokens[0, : long - short] == 0).all()
    for row, single in enumerate(alone):
        torch.testing.assert_close(
            batch.tokens[row][batch.mask[row]], single.tokens[0], atol=1e-5, rtol=1e-4
        )


def test_prompt_follows_the_instruction(encoder):
    group = reference_images(1, seed=10)
    with torch.no_grad():
        plain = encoder.encode([group])
        prompted = encoder.encode([group], prompts=["a photo of a dog"])
    text = encoder.tokenizer.decode(
        encoder.inputs([group], [EASYREF_INSTRUCTION + "a photo of a dog"])[
            "input_ids"
        ][0]
    )
    assert EASYREF_INSTRUCTION + "a photo of a dog<|im_end|>" in text
    assert prompted.tokens.shape[1] > plain.tokens.shape[1]
    with pytest.raises(ConfigError, match="2 prompts for 1 reference groups"):
        encoder.encode([group], prompts=["a", "b"])


def test_encoder_conforms(encoder):
    check_encoder(encoder)


# -- unconditional branch -------------------------------------------------------------------------


def test_unconditional_is_a_black_image_with_the_instruction_computed_once():
    encoder, _ = make_encoder()
    calls = []
    encoder.visual.register_forward_hook(lambda *args: calls.append(1))
    groups = [reference_images(2, seed=11), reference_images(1, seed=12)]
    with torch.no_grad():
        encoding = encoder.encode(groups)
        calls.clear()
        first = encoder.encode_unconditional(encoding, groups)
        assert len(calls) == 1  # the black image
        smaller = encoder.encode(groups[1:])
        calls.clear()
        second = encoder.encode_unconditional(smaller, groups[1:])
        assert not calls  # cached
        black = encoder.encode([[Image.new("RGB", (512, 512))]])
    assert first.tokens.shape == (2, black.tokens.shape[1], encoder.embedding_dim)
    assert (
        second.tokens.shape[0] == 1
        and first.mask.all()
        and (first.source == MIXED_SOURCE).all()
    )
    for row in range(2):
        torch.testing.assert_close(first.tokens[row], black.tokens[0], atol=0, rtol=0)
    # New weights (a checkpoint loaded, an optimizer step) invalidate the cached tokens.
    with torch.no_grad():
        encoder.norm.weight.mul_(2)
        calls.clear()
        third = encoder.encode_unconditional(encoding, groups)
    assert len(calls) == 1 and not torch.allclose(third.tokens, first.tokens)


def test_unconditional_is_kept_across_optimizer_steps_while_frozen_and_trains_with_the_encoder():
    encoder, _ = make_encoder()
    encoder.requires_grad_(False)  # as a composition builds it: borrowed weights frozen
    calls = []
    encoder.visual.register_forward_hook(lambda *args: calls.append(1))
    groups = [reference_images(1, seed=14)]
    encoding = encoder.encode(groups)
    other = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([other], lr=0.1)
    calls.clear()
    frozen = encoder.encode_unconditional(encoding, groups).tokens
    other.grad = torch.ones(2)
    optimizer.step()  # something else trained: the frozen encoder's "no reference" tokens still hold
    encoder.encode_unconditional(encoding, groups)
    assert len(calls) == 1 and not frozen.requires_grad

    encoder.requires_grad_(True)  # fine-tuning the MLLM (EasyRef stages 2-3): computed with autograd at each call
    calls.clear()
    tokens = encoder.encode_unconditional(encoding, groups).tokens
    tokens.sum().backward()
    assert len(calls) == 1 and encoder.norm.weight.grad is not None and encoder.norm.weight.grad.abs().sum() > 0
    torch.testing.assert_close(tokens.detach(), frozen, atol=0, rtol=0)


def test_unconditional_from_inference_mode_is_usable_in_training():
    encoder, _ = make_encoder()
    groups = [reference_images(1, seed=13)]
    with torch.inference_mode():
        encoder.encode_unconditional(encoder.encode(groups), groups)
    encoding = encoder.encode(groups)
    tokens = encoder.encode_unconditional(encoding, groups).tokens
    assert not tokens.is_inference()
    (
        tokens * torch.ones(1, requires_grad=True)
    ).sum().backward()  # would raise on an inference tensor


# -- the last layer, handed to the aggregator ------------------------------------------------------


def test_trunk_leaves_out_the_last_layer_and_hands_it_over_once():
    model = tiny_qwen2vl(0)
    image_processor, tokenizer = tiny_qwen2vl_processor()
    encoder = MllmEncoder.from_model(model, image_processor, tokenizer, MllmEncoderConfig(**TINY))
    layers = model.model.language_model.layers
    before = copy.deepcopy(layers[-1].state_dict())
    assert len(encoder.layers) == len(layers) - 1
    keys = set(encoder.state_dict())
    assert (
        f"layers.{len(layers) - 1}.mlp.up_proj.weight" not in keys
        and "norm.weight" in keys
        and "embed_tokens.weight" in keys
    )
    assert not any(key.startswith("lm_head") for key in keys)
    layer, norm, _rotary = encoder.final_layer()
    assert layer is not layers[-1] and norm is not encoder.norm
    torch.testing.assert_close(layer.state_dict(), before, atol=0, rtol=0)
    torch.testing.assert_close(norm.weight, encoder.norm.weight, atol=0, rtol=0)
    with torch.no_grad():  # the aggregator trains its copies: the model and the encoder's norm stay as they were
        layer.mlp.up_proj.weight.add_(1)
        norm.weight.add_(1)
    torch.testing.assert_close(layers[-1].state_dict(), before, atol=0, rtol=0)
    assert not torch.equal(encoder.norm.weight, norm.weight)
    # The encoder keeps no second copy beside the aggregator's, so it hands the layer over once.
    assert encoder.__dict__["_last_layer"] is None
    with pytest.raises(ConfigError, match="handed to the aggregator"):
        encoder.final_layer()


# -- configuration, loading, errors ----------------------------------------------------------------


def test_registered_with_its_config():
    plugins = load_plugins()
    entry = plugins.registry.get("encoder", "mllm")
    assert entry.config is MllmEncoderConfig
    with pytest.raises(ConfigError, match="model is None"):
        entry.obj(MllmEncoderConfig(model=None), BuildContext())


def test_the_mllm_reads_the_prompt_by_default_as_the_official_easyref():
    assert MllmEncoderConfig().append_prompt is True
    assert MllmEncoderConfig(append_prompt=False).append_prompt is False  # the faster, instruction-only option


def test_config_validation():
    with pytest.raises(ValueError, match="min_pixels"):
        MllmEncoderConfig(min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError):
        MllmEncoderConfig(dtype="float64")


def test_loads_from_a_local_folder(tmp_path):
    """The from_pretrained path (hub id or folder), offline: a saved tiny model, tokenizer and image processor."""
    model = tiny_qwen2vl()
    image_processor, tokenizer = tiny_qwen2vl_processor()
    for part in (model, image_processor, tokenizer):
        part.save_pretrained(tmp_path)
    encoder = MllmEncoder.from_config(
        MllmEncoderConfig(**{**TINY, "model": str(tmp_path)}), BuildContext()
    )
    reference, _ = make_encoder()
    group = reference_images(1, seed=14)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.encode([group]).tokens,
            reference.encode([group]).tokens,
            atol=1e-5,
            rtol=1e-4,
        )


def test_bad_input_is_explained(encoder):
    with pytest.raises(ConfigError, match="group 1 is empty"):
        encoder.encode([reference_images(1), []])
    with pytest.raises(ConfigError, match="not a PIL image"):
        encoder.encode([[torch.zeros(3, 8, 8)]])
    model = tiny_qwen2vl()
    with pytest.raises(ConfigError, match="patch_size is 14"):
        MllmEncoder.from_model(
            model,
            type(tiny_qwen2vl_image_processor())(),
            tiny_qwen2vl_tokenizer(),
            MllmEncoderConfig(**TINY),
        )


# -- references Qwen2-VL's image processor refuses: explained before anything runs ----------------


@pytest.mark.parametrize("size", [(1, 300), (300, 1), (201, 1), (2, 2000)])
def test_a_reference_too_elongated_for_qwen2vl(encoder, size):
    width, height = size
    strip = Image.new("RGB", size)
    with pytest.raises(ReferenceImageError) as excinfo:  # was a bare ValueError from inside the image processor
        encoder.encode([reference_images(1), [reference_images(1)[0], strip]])
    message = str(excinfo.value)
    assert message.startswith(f"encoder 'mllm': reference 1 of group 1 is {width}x{height} pixels, an aspect ratio of ")
    assert "but Qwen2-VL's image processor takes at most 200:1. Crop the image, or pad it to a less elongated shape" in message


def test_the_most_elongated_and_the_smallest_references_are_read(encoder):
    for size in [(1, 200), (200, 1), (1, 1), (3, 2)]:  # the processor scales small images up to min_pixels
        encoding = encoder.encode([[Image.new("RGB", size, (200, 30, 30))]])
        assert torch.isfinite(encoding.tokens).all()


def test_an_image_without_pixels_is_refused(encoder):
    with pytest.raises(ReferenceImageError, match=r"^encoder 'mllm': reference 0 of group 0 has no pixels \(0 wide, 5 high\)"):
        encoder.encode([[Image.new("RGB", (0, 5))]])


def test_the_installed_image_processor_rule_is_checked_too(encoder, monkeypatch):
    import refcond_encoders.mllm as mllm

    monkeypatch.setattr(mllm, "MAX_ASPECT_RATIO", 10**6)  # refcond's own check lifted: the processor's rule, probed by size, still answers first
    with pytest.raises(ReferenceImageError, match=r"is 1x300 pixels, a size Qwen2-VL's image processor refuses \(absolute aspect ratio must be smaller than 200"):
        encoder.encode([[Image.new("RGB", (1, 300))]])


def test_a_refused_reference_read_from_a_file_is_named_by_its_path(encoder, tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (300, 1)).save(path)
    with pytest.raises(ReferenceImageError, match=rf"^encoder 'mllm': reference 0 of group 0 \({re.escape(repr(str(path)))}\) is 300x1 pixels"):
        encoder.encode([load_references(path)])


def test_the_easyref_pipeline_refuses_it_before_generating(tiny_qwen2vl_dir):
    from refcond_easyref.testing import tiny_easyref_overrides

    rp = refcond.from_pipe(tiny_sdxl_pipeline(), "easyref", seed=0, **tiny_easyref_overrides(tiny_qwen2vl_dir))
    processors = dict(rp.pipeline.unet.attn_processors)
    with pytest.raises(ReferenceImageError, match=r"reference 0 of group 0 is 1x300 pixels, an aspect ratio of 300:1"):
        rp("a toy", references=[Image.new("RGB", (1, 300))], num_inference_steps=1, output_type="latent")
    assert rp.pipeline.unet.attn_processors == processors  # nothing left bound
    latents = rp("a toy", references=[Image.new("RGB", (1, 200))], num_inference_steps=1, output_type="latent").images
    assert torch.isfinite(latents).all()


def test_pixel_bounds_are_bounded_so_no_reference_is_resized_beyond_memory():
    for field in ("min_pixels", "max_pixels"):
        with pytest.raises(ValueError, match=rf"{field}\n  Input should be less than or equal to 3211264"):
            MllmEncoderConfig(**{field: 10**12})
    assert MllmEncoderConfig(max_pixels=4096 * 28 * 28).max_pixels == 3211264  # 4096 MLLM tokens per reference


def test_a_missing_model_folder_is_named_before_the_hub_id_check(tmp_path):
    missing = tmp_path / "qwen2vl"
    with pytest.raises(ConfigError, match=r"encoder 'mllm': config model '.*qwen2vl' is not a folder that exists, and not a valid Hugging Face hub id"):
        MllmEncoder.from_config(MllmEncoderConfig(**{**TINY, "model": str(missing)}), BuildContext())
    missing.mkdir()  # a folder that exists, but holds no model
    with pytest.raises(ConfigError, match=r"encoder 'mllm': cannot load Qwen2VLForConditionalGeneration from config model '.*qwen2vl'"):
        MllmEncoder.from_config(MllmEncoderConfig(**{**TINY, "model": str(missing)}), BuildContext())


@pytest.mark.parametrize(("device", "message"), [("0", "'0' is not a device"), ("quantum", "'quantum' is not a device")])
def test_a_device_that_is_not_one_is_refused_by_the_config(device, message):
    with pytest.raises(ValueError, match=message):
        MllmEncoderConfig(device=device)


def test_a_device_this_machine_lacks_is_refused_before_loading(tmp_path):
    absent = f"cuda:{torch.cuda.device_count() + 3}"
    with pytest.raises(ConfigError, match=rf"encoder 'mllm': config device '{absent}' is not available on this machine"):
        MllmEncoder.from_config(MllmEncoderConfig(**{**TINY, "model": str(tmp_path), "device": absent}), BuildContext())
