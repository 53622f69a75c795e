"""Fuzzing a generation call's arguments: every one is accepted and gives finite output, or refused with a RefcondError.

The composition is ``ip-adapter`` with the ``weighted-mean`` aggregator (so ``reference_weights``
is read) on the tiny SD1.5 pipeline; the references themselves are another surface's.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fuzzing import guard, same_state, unet_state
from hypothesis import given
from hypothesis import strategies as st

import refcond
from refcond.testing import reference_images, tiny_sd15_pipeline

SURFACE = "call-arguments"

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2.0, max_value=2.0),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 1e38, -1e38, 3.4e38, 1e-45, 1000.0, 1000.5]),
)
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.binary(max_size=4), st.just(torch.tensor(1.0)), st.just(object()))
block_values = st.one_of(numbers, junk, st.lists(st.one_of(numbers, junk), max_size=4))
per_block = st.dictionaries(
    st.one_of(st.sampled_from(["down", "mid", "up", "left", ""]), st.none(), st.integers(-1, 3)),
    st.one_of(block_values, st.dictionaries(st.one_of(st.sampled_from(["block_0", "block_1", "block_2", "block_9"]), st.none(), st.integers()), block_values, max_size=3)),
    max_size=3,
)
scales = st.one_of(numbers, junk, per_block)
prompts = st.one_of(
    st.text(max_size=12),
    st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none()), max_size=3),
    st.tuples(st.text(max_size=8), st.text(max_size=8)),
    st.none(),
    st.integers(),
)
negatives = st.one_of(st.none(), st.text(max_size=8), st.lists(st.one_of(st.text(max_size=8), st.integers()), max_size=3))
weights = st.one_of(
    st.none(),
    st.text(max_size=3),
    st.lists(st.one_of(numbers, st.none()), max_size=4),
    st.lists(st.lists(st.one_of(numbers, st.none()), max_size=3), max_size=3),
    numbers,
    st.just(torch.tensor(2.0)),
    st.just(torch.tensor([1.0, 2.0])),
    st.just([1e38, 1e38]),
)
counts = st.one_of(st.integers(-2, 2), st.sampled_from([2**63, 10**6, 2.0, "2", None, True]))
steps = st.one_of(st.none(), st.integers(-1, 2), st.sampled_from([2.0, "1", 10**9, True]))
sizes = st.one_of(st.none(), st.integers(-8, 40), st.sampled_from([16.0, "32", 1 << 40]))


class Bench:
    """The composition, built once: every generated call runs on it."""

    def __init__(self) -> None:
        self.pipe = tiny_sd15_pipeline()
        self.pipe.set_progress_bar_config(disable=True)
        self.rp = refcond.from_pipe(self.pipe, "ip-adapter", aggregator="weighted-mean", seed=0)
        self.references = reference_images(2)


@pytest.fixture(scope="module")
def bench():
    built = Bench()
    yield built
    built.rp.detach()


def call(bench: Bench, **arguments: Any) -> Any:
    return guard(
        SURFACE,
        lambda: bench.rp(references=bench.references, generator=torch.Generator().manual_seed(0), **arguments),
        state=lambda: unet_state(bench.pipe.unet),
        same=same_state,
    )


@given(prompt=prompts, negative_prompt=negatives, num_images_per_prompt=counts, guidance_scale=st.one_of(st.none(), numbers))
def test_prompts_and_counts(bench, prompt, negative_prompt, num_images_per_prompt, guidance_scale):
    call(
        bench,
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_images_per_prompt=num_images_per_prompt,
        guidance_scale=guidance_scale,
        num_inference_steps=1,
        output_type="latent",
    )


@given(reference_scale=scales, reference_weights=weights)
def test_strengths_and_weights(bench, reference_scale, reference_weights):
    call(bench, prompt="a cat", reference_scale=reference_scale, reference_weights=reference_weights, num_inference_steps=1, output_type="latent")


@given(num_inference_steps=steps, height=sizes, width=sizes, output_type=st.one_of(st.none(), st.sampled_from(["latent", "np", "pt", "bogus", 3])))
def test_steps_sizes_and_outputs(bench, num_inference_steps, height, width, output_type):
    extra = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    call(bench, prompt="a cat", num_inference_steps=num_inference_steps, output_type=output_type, **extra)


@given(
    condition=st.one_of(st.none(), st.integers(1, 3), junk),
    unconditional=st.one_of(st.none(), st.integers(1, 3), junk),
    dim=st.sampled_from([1, 7, 16]),
    reference_scale=scales,
)
def test_bind(bench, condition, unconditional, dim, reference_scale):
    """rp.bind with conditions of any batch and width, or things that are no condition."""
    expected = bench.rp.aggregator.output_dim(bench.rp.encoder.embedding_dim)

    def make(value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return refcond.testing.make_condition(batch=value, dim=expected if dim == 16 else dim)
        return value

    unet = bench.pipe.unet

    def action() -> Any:
        bound_condition = make(condition)
        with bench.rp.bind(bound_condition, make(unconditional), reference_scale):
            rows = bound_condition.batch_size if isinstance(bound_condition, refcond.Condition) else 1
            sample = torch.zeros(rows, unet.config.in_channels, 8, 8)
            return unet(sample, torch.tensor(10), encoder_hidden_states=torch.zeros(rows, 3, unet.config.cross_attention_dim)).sample

    with torch.no_grad():
        guard(SURFACE, action, state=lambda: unet_state(unet), same=same_state)


valid_scales = st.one_of(
    st.floats(min_value=-1000.0, max_value=1000.0),
    st.fixed_dictionaries(
        {},
        optional={
            "down": st.one_of(st.floats(-1000.0, 1000.0), st.fixed_dictionaries({}, optional={"block_0": st.floats(-10.0, 10.0)})),
            "mid": st.floats(-1000.0, 1000.0),
            "up": st.one_of(st.floats(-10.0, 10.0), st.fixed_dictionaries({}, optional={"block_1": st.lists(st.floats(-10.0, 10.0), min_size=1, max_size=2)})),
        },
    ),
)


@given(
    prompt=st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), min_size=1, max_size=2)),
    reference_scale=valid_scales,
    reference_weights=st.one_of(st.none(), st.lists(st.floats(min_value=0.0, max_value=1000.0), min_size=2, max_size=2)),
    num_images_per_prompt=st.integers(1, 2),
    guidance_scale=st.one_of(st.none(), st.floats(min_value=-20.0, max_value=20.0)),
)
def test_calls_within_the_documented_ranges(bench, prompt, reference_scale, reference_weights, num_images_per_prompt, guidance_scale):
    """Inputs that look right: each gives finite latents, or a clear refusal (e.g. weights that sum to zero)."""
    call(
        bench,
        prompt=prompt,
        reference_scale=reference_scale,
        reference_weights=reference_weights,
        num_images_per_prompt=num_images_per_prompt,
        guidance_scale=guidance_scale,
        num_inference_steps=1,
        output_type="latent",
    )
