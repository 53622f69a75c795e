"""Cost of one denoising step: one UNet forward on a classifier-free-guidance batch of 2.

Side by side, on the same inputs and weights:

- ``plain``: the UNet alone (text conditioning only);
- ``refcond``: the UNet with refcond's ``cross-attention`` injector and a bound condition: the
  projection and every layer's image keys/values were computed once, a step only attends;
- ``diffusers``: the same UNet with diffusers' IP-Adapter (``_load_ip_adapter_weights``, what
  ``load_ip_adapter`` calls) fed ``added_cond_kwargs={"image_embeds": ...}``: it runs the resampler
  and ``to_k_ip``/``to_v_ip`` inside every step;
- ``refcond-bind``: what refcond does once per generation instead (projection + keys/values).

Every case uses IP-Adapter Plus (perceiver resampler) with 4 references concatenated, where
diffusers' per-step recomputation costs most. ``conftest.py`` prints the ratios and writes them
to JSON. Run: ``python -m pytest benchmarks -q --benchmark-only`` (see README.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from common import DEVICE, DTYPE, sd15_unet, sd_pipeline_around, timed_rounds
from diffusers import UNet2DConditionModel
from refcond_injectors.cross_attention import CrossAttentionInjector
from refcond_injectors.testing import fabricate_ip_adapter_state_dict

import refcond
from refcond import Condition
from refcond.testing import (
    tiny_image_encoder,
    tiny_unet,
)

REFERENCES = 4

@dataclass(frozen=True)
class Setting:
    """One benchmarked model: its UNet, the CLIP feature shape the adapter reads, and how many rounds to time."""

    name: str
    build_unet: Any
    latent_size: int
    clip_hidden: int
    clip_tokens: int  # CLIP ViT-H/14 at 224 px: 257 tokens of 1280
    text_tokens: int
    rounds: int
    resampler_dim: int | None = None


SETTINGS = {
    "tiny-sd15": Setting("tiny-sd15", lambda: tiny_unet(), 16, 32, 17, 77, rounds=30),
    # SD1.5's full UNet at 256 px (32x32 latents) to keep a step within seconds on a laptop CPU.
    "sd15-256px": Setting("sd15-256px", lambda: sd15_unet(32), 32, 1280, 257, 77, rounds=5, resampler_dim=768),
    # SD1.5 at its native 512 px (64x64 latents): meant for a GPU run.
    "sd15-512px": Setting("sd15-512px", lambda: sd15_unet(64), 64, 1280, 257, 77, rounds=50, resampler_dim=768),
}
SELECTED = [s for s in os.environ.get("REFCOND_BENCH_SETTINGS", "tiny-sd15,sd15-256px").split(",") if s]


@dataclass
class Bench:
    """Everything a setting's three benchmarks share; outputs are kept to check they agree."""

    setting: Setting
    unet: UNet2DConditionModel
    injector: CrossAttentionInjector
    checkpoint: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    condition: Condition
    unconditional: Condition
    image_embeds: torch.Tensor  # diffusers' layout: [uncond; cond] x references x tokens x dim
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def _condition(features: torch.Tensor) -> Condition:
    """``[N, T, D]`` features of N references -> one concatenated group, ``source`` per reference."""
    n, t, d = features.shape
    source = torch.arange(n, device=features.device).repeat_interleave(t)[None]
    return Condition(features.reshape(1, n * t, d), torch.ones(1, n * t, dtype=torch.bool, device=features.device), source)


@pytest.fixture(scope="module", params=SELECTED)
def bench(request: pytest.FixtureRequest) -> Bench:
    return build_bench(SETTINGS[request.param])


def build_bench(setting: Setting) -> Bench:
    """The UNet, the built injector (detached), the checkpoint and the inputs of one setting."""
    unet = setting.build_unet()
    clip = tiny_image_encoder(hidden_size=setting.clip_hidden, projection_dim=setting.clip_hidden)
    pipe = sd_pipeline_around(unet, image_encoder=clip)
    checkpoint = fabricate_ip_adapter_state_dict(unet, clip, variant="plus", num_tokens=16, seed=1, resampler_dim=setting.resampler_dim)
    rp = refcond.from_pipe(pipe, "ip-adapter", checkpoint=dict(checkpoint), aggregator="concat")
    rp.detach()  # keep the built injector; each benchmark attaches it itself

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, REFERENCES, setting.clip_tokens, setting.clip_hidden, generator=gen)  # [uncond, cond]
    inputs = {
        "sample": torch.randn(2, 4, setting.latent_size, setting.latent_size, generator=gen),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, setting.text_tokens, unet.config.cross_attention_dim, generator=gen),
    }
    inputs = {k: v.to(DEVICE, DTYPE) if v.is_floating_point() else v.to(DEVICE) for k, v in inputs.items()}
    features = features.to(DEVICE, DTYPE)
    return Bench(setting, unet, rp.injectors[0], checkpoint, inputs, _condition(features[1]), _condition(features[0]), features)


def _time(benchmark: Any, bench: Bench, variant: str, step: Any) -> torch.Tensor:
    benchmark.group = bench.setting.name
    benchmark.extra_info.update(setting=bench.setting.name, variant=variant, references=REFERENCES)
    out = timed_rounds(benchmark, step, bench.setting.rounds)
    bench.outputs[variant] = out
    return out


def test_plain_unet(benchmark: Any, bench: Bench) -> None:
    with variant_step(bench, "plain") as step:
        _time(benchmark, bench, "plain", step)


def test_refcond_bind_once_per_generation(benchmark: Any, bench: Bench) -> None:
    attachment = bench.injector.attach(bench.unet)

    def bind() -> None:
        with attachment.condition(bench.condition, bench.unconditional):
            pass

    try:
        _time(benchmark, bench, "refcond-bind", bind)
    finally:
        attachment.detach()


def test_refcond_unet(benchmark: Any, bench: Bench) -> None:
    with torch.inference_mode(), variant_step(bench, "refcond") as step:
        _time(benchmark, bench, "refcond", step)


def test_diffusers_ip_adapter_unet(benchmark: Any, bench: Bench) -> None:
    with variant_step(bench, "diffusers") as step:
        out = _time(benchmark, bench, "diffusers", step)
    if "refcond" in bench.outputs:  # "at equal output": both computed the same thing
        scale = bench.outputs["refcond"].abs().max().item()
        tolerance = 1e-4 if DTYPE == torch.float32 else 2e-2  # half precision rounds differently per op order
        assert torch.allclose(out, bench.outputs["refcond"], atol=tolerance * max(1.0, scale)), "refcond and diffusers disagree"

@contextmanager
def variant_step(bench: Bench, variant: str) -> Iterator[Any]:
    """A zero-argument callable running one UNet step of ``variant`` (plain, refcond, diffusers), set up and undone around it."""
    unet = bench.unet
    if variant == "plain":
        yield lambda: unet(**bench.inputs).sample
    elif variant == "refcond":
        attachment = bench.injector.attach(unet)
        try:
            with attachment.condition(bench.condition, bench.unconditional):
                yield lambda: unet(**bench.inputs).sample
        finally:
            attachment.detach()
    elif variant == "diffusers":
        nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in bench.checkpoint.items():
            group, _, rest = key.partition(".")
            nested[group][rest] = value
        processors = dict(unet.attn_processors)
        unet._load_ip_adapter_weights([nested])  # diffusers changes the UNet in place
        added = {"image_embeds": [bench.image_embeds]}
        try:
            yield lambda: unet(**bench.inputs, added_cond_kwargs=added).sample
        finally:  # undo diffusers' changes (the resampler's own attention layers go with encoder_hid_proj)
            unet.encoder_hid_proj = None
            unet.register_to_config(encoder_hid_dim_type=None)
            unet.set_attn_processor(processors)
    else:
        raise ValueError(f"unknown variant {variant!r}: plain, refcond or diffusers")
