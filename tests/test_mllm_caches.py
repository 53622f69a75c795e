"""The ``mllm`` encoder's inference caches: vision-tower outputs per image, decoder states per prefix.

Every encoding through the caches is compared with the same encoder's computation without them (the
batched trunk, which ``test_mllm_encoder.py`` checks against the official forward), over prompts
that change and groups that grow, shrink and reorder; what runs again is counted on the vision tower
and the decoder layers. Weight changes empty the caches, the budget holds, and training bypasses them.
Tiny Qwen2-VL, CPU, float32 unless said.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from refcond_easyref.testing import tiny_easyref_overrides
from refcond_encoders.mllm import MllmEncoder, MllmEncoderConfig

import refcond
from refcond import ReferenceEncoding
from refcond.testing import reference_images, tiny_sdxl_pipeline
from refcond.testing.qwen2vl import MAX_PIXELS, MIN_PIXELS, tiny_qwen2vl, tiny_qwen2vl_processor

IMAGES = reference_images(6, seed=3)
OFF = {"vision_cache_mb": 0, "prefix_cache_mb": 0}


def make_encoder(dtype: str = "float32", **options: Any) -> MllmEncoder:
    """A tiny encoder on seed-0 weights: two of them compute the same thing."""
    image_processor, tokenizer = tiny_qwen2vl_processor()
    config = MllmEncoderConfig(model=None, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, dtype=dtype, **options)
    return MllmEncoder.from_model(tiny_qwen2vl(0), image_processor, tokenizer, config).eval()


@contextmanager
def counting(encoder: MllmEncoder) -> Iterator[dict[str, list[int]]]:
    """Images through the vision tower, and the number of tokens of each first-decoder-layer call."""
    seen: dict[str, list[int]] = {"images": [], "decoder_tokens": []}
    hooks = [
        encoder.visual.register_forward_pre_hook(lambda module, args: seen["images"].append(1)),
        encoder.layers[0].register_forward_pre_hook(lambda module, args: seen["decoder_tokens"].append(int(args[0].shape[1]))),
    ]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def assert_same_encoding(got: ReferenceEncoding, expected: ReferenceEncoding, atol: float = 1e-5) -> None:
    assert torch.equal(got.mask, expected.mask) and torch.equal(got.source, expected.source)
    torch.testing.assert_close(got.tokens, expected.tokens, atol=atol, rtol=0)


# (groups, prompts): a new prompt, a grown group, a shrunk one, a reordered one, an empty prompt, a batch of two.
CALLS = [
    ([IMAGES[:2]], ["a dog"]),
    ([IMAGES[:2]], ["a cat sitting on a mat"]),
    ([IMAGES[:3]], ["a dog"]),
    ([IMAGES[:3]], ["a dog on a beach"]),
    ([IMAGES[1:3]], [""]),
    ([IMAGES[2::-1]], ["a dog"]),
    ([IMAGES[:2], IMAGES[:4]], ["a dog", "a red car"]),
]


def test_encodings_through_the_caches_equal_a_full_recomputation() -> None:
    cached, plain = make_encoder(), make_encoder(**OFF)
    with torch.inference_mode(), counting(cached) as runs:
        for groups, prompts in CALLS:
            assert_same_encoding(cached.encode(groups, prompts=prompts), plain.encode(groups, prompts=prompts))
        encoding = cached.encode([IMAGES[:2]], prompts=["a dog"])
        assert_same_encoding(cached.encode_unconditional(encoding, [IMAGES[:2]]), plain.encode_unconditional(encoding, [IMAGES[:2]]))
    # The vision tower ran once per distinct image (4 references, then the black unconditional one).
    assert len(runs["images"]) == 5
    assert cached.prefix_cache.hits >= 4, "the calls that share references and instruction must reuse the prefix"


def test_a_new_prompt_runs_only_its_own_tokens_through_the_decoder() -> None:
    encoder = make_encoder()
    with torch.inference_mode():
        first = encoder.encode([IMAGES[:3]], prompts=["a dog"])
        with counting(encoder) as runs:
            second = encoder.encode([IMAGES[:3]], prompts=["a cat sitting on a mat"])
    length = int(second.mask.sum())
    new_tokens = len(encoder.tokenizer("a cat sitting on a mat<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
    assert runs == {"images": [], "decoder_tokens": [new_tokens]}
    assert new_tokens < length / 4 and int(first.mask.sum()) < length


def test_a_grown_group_runs_the_vision_tower_for_the_new_image_only() -> None:
    encoder, plain = make_encoder(), make_encoder(**OFF)
    with torch.inference_mode():
        encoder.encode([IMAGES[:3]], prompts=["a dog"])
        with counting(encoder) as runs:
            grown = encoder.encode([IMAGES[:4]], prompts=["a dog"])
        assert_same_encoding(grown, plain.encode([IMAGES[:4]], prompts=["a dog"]))
    assert len(runs["images"]) == 1
    # Other images before the prompt: a new prefix, computed (and kept), then the prompt's tokens after it.
    prefix, rest = runs["decoder_tokens"]
    assert prefix + rest == int(grown.mask.sum()) and rest < prefix


def test_changed_weights_empty_the_caches() -> None:
    encoder, plain = make_encoder(), make_encoder(**OFF)
    with torch.inference_mode():
        encoder.encode([IMAGES[:2]], prompts=["a dog"])
        for module in (encoder, plain):
            module.layers[0].mlp.up_proj.weight.mul_(1.5)
            module.visual.blocks[0].mlp.fc1.weight.mul_(1.5)
        with counting(encoder) as runs:
            again = encoder.encode([IMAGES[:2]], prompts=["a dog"])
        assert_same_encoding(again, plain.encode([IMAGES[:2]], prompts=["a dog"]))
    assert len(runs["images"]) == 2 and sum(runs["decoder_tokens"]) == int(again.mask.sum())


def test_the_caches_keep_within_their_budget() -> None:
    # One image of the tiny model is 16 tokens x 64 float32 = 4 KiB; the budget holds two.
    encoder, plain = make_encoder(vision_cache_mb=8.5 / 1024, prefix_cache_mb=1e-6), make_encoder(**OFF)
    with torch.inference_mode():
        for start in range(4):
            group = IMAGES[start : start + 2]
            assert_same_encoding(encoder.encode([group], prompts=["a dog"]), plain.encode([group], prompts=["a dog"]))
            assert encoder.vision_cache.nbytes <= encoder.vision_cache.max_bytes and len(encoder.vision_cache) <= 2
        with counting(encoder) as runs:
            encoder.encode([IMAGES[3:5]], prompts=["a cat"])  # the two most recent images: kept
            encoder.encode([IMAGES[:1]], prompts=["a cat"])  # the oldest: evicted
    assert len(runs["images"]) == 1
    # A prefix larger than the whole budget is not kept; every call computes it, correctly.
    assert len(encoder.prefix_cache) == 0 and encoder.prefix_cache.hits == 0


def test_training_bypasses_the_caches() -> None:
    encoder, plain = make_encoder(), make_encoder(**OFF)
    encoder.requires_grad_(False).train()  # training mode alone (a frozen encoder in a training run) bypasses them
    with counting(encoder) as runs:
        for _ in range(2):
            trained = encoder.encode([IMAGES[:2]], prompts=["a dog"])
    assert len(runs["images"]) == 4 and len(encoder.vision_cache) == len(encoder.prefix_cache) == 0
    with torch.inference_mode():
        assert_same_encoding(trained, plain.encode([IMAGES[:2]], prompts=["a dog"]))

    encoder.eval().requires_grad_(True)  # a weight that takes gradients: no cache either, and gradients flow
    encoded = encoder.encode([IMAGES[:2]], prompts=["a dog"])
    encoded.tokens.sum().backward()
    assert encoder.layers[0].mlp.up_proj.weight.grad is not None and len(encoder.prefix_cache) == 0


def test_bfloat16_through_the_caches_is_as_close_as_a_full_recomputation_under_another_batch() -> None:
    cached, plain = make_encoder("bfloat16"), make_encoder("bfloat16", **OFF)
    group, other = IMAGES[:3], IMAGES[3:6]
    with torch.inference_mode():
        cached.encode([group], prompts=["a dog"])
        got = cached.encode([group], prompts=["a cat on a mat"]).tokens[0].float()
        alone = plain.encode([group], prompts=["a cat on a mat"]).tokens[0].float()
        batched = plain.encode([group, other], prompts=["a cat on a mat", "a much longer prompt that pads the first row"])
        in_batch = batched.tokens[0][batched.mask[0]].float()
    batch_noise = float((in_batch - alone).abs().max())
    assert batch_noise > 0  # bfloat16 rounds differently in another batch: the yardstick is not zero
    assert float((got - alone).abs().max()) <= 2 * batch_noise


def test_a_pipeline_reuses_the_references_across_prompts(tiny_qwen2vl_dir: Path) -> None:
    rp = refcond.from_pipe(tiny_sdxl_pipeline(), "easyref", **tiny_easyref_overrides(tiny_qwen2vl_dir, append_prompt=True))
    references = reference_images(3)
    encoder = rp.encoder
    with counting(encoder) as runs:
        for prompt in ("a cat", "a dog", "a red car"):
            rp(prompt, references, num_inference_steps=1, output_type="latent")
    assert len(runs["images"]) == 3 + 1  # the references and the black unconditional image, once each
    assert encoder.prefix_cache.hits == 2  # the second and third prompts ran their own tokens only
    rp.detach()
