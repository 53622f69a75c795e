"""Cost of a LoRA per denoising step: one UNet forward on a classifier-free-guidance batch of 2.

Side by side, on the same inputs and weights:

- ``plain``: the UNet alone;
- ``lora``: the UNet with refcond's ``lora`` injector attached, unfused: PEFT runs every LoRA
  (``B(A(x)) * scale``) beside its layer at every step;
- ``lora-fused``: the same LoRA fused into the base weights (``fuse = true``): a step runs the
  base layers only, through PEFT's wrappers.

The LoRA (rank 16, fabricated) targets every transformer block's ``to_q``/``to_k``/``to_v``/
``to_out.0``, ``ff.net.2`` and its ``proj_in``, as a typical Kohya LoRA does. Before timing the
fused variant, the run checks that it computes what the unfused one does. ``conftest.py`` prints
the ratios (suite ``lora``) and writes them to ``benchmarks/results/lora_ratios.json``.
Run: ``python -m pytest benchmarks/test_bench_lora.py -q --benchmark-only`` (see README.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from common import DEVICE, DTYPE, sd15_unet, sd_pipeline_around, timed_rounds
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from refcond_injectors.testing import fabricate_lora_state_dict
from safetensors.torch import save_file

import refcond
from refcond.testing import tiny_unet

RANK = 16


@dataclass(frozen=True)
class Setting:
    """One benchmarked UNet, its latent size, and how many rounds to time."""

    name: str
    build_unet: Any
    latent_size: int
    text_tokens: int
    rounds: int


SETTINGS = {
    "tiny-sd15": Setting("tiny-sd15", lambda: tiny_unet(), 16, 77, rounds=200),
    # SD1.5's full UNet at 256 px (32x32 latents), as in test_bench_unet_step.py.
    "sd15-256px": Setting("sd15-256px", lambda: sd15_unet(32), 32, 77, rounds=8),
    "sd15-512px": Setting("sd15-512px", lambda: sd15_unet(64), 64, 77, rounds=50),
}
SELECTED = [s for s in os.environ.get("REFCOND_BENCH_SETTINGS", "tiny-sd15,sd15-256px").split(",") if s]


@dataclass
class Bench:
    """A setting's pipeline, its LoRA file and inputs; outputs are kept to check variants agree."""

    setting: Setting
    pipe: StableDiffusionPipeline
    lora_file: Path
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipe.unet


@pytest.fixture(scope="module", params=SELECTED)
def bench(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return build_bench(SETTINGS[request.param], tmp_path_factory.mktemp("lora"))


def build_bench(setting: Setting, folder: Path) -> Bench:
    """The pipeline around the setting's UNet, a LoRA file for it, and one step's inputs."""
    unet = setting.build_unet()
    pipe = sd_pipeline_around(unet)
    lora_file = folder / f"{setting.name}.safetensors"
    save_file(fabricate_lora_state_dict(pipe, "diffusers", rank=RANK, seed=1, text_encoders=False), str(lora_file))
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 4, setting.latent_size, setting.latent_size, generator=gen),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, setting.text_tokens, unet.config.cross_attention_dim, generator=gen),
    }
    inputs = {k: v.to(DEVICE, DTYPE) if v.is_floating_point() else v.to(DEVICE) for k, v in inputs.items()}
    return Bench(setting, pipe, lora_file, inputs)


def _time(benchmark: Any, bench: Bench, variant: str, step: Any) -> torch.Tensor:
    benchmark.group = f"lora/{bench.setting.name}"
    benchmark.extra_info.update(suite="lora", setting=bench.setting.name, variant=variant, rank=RANK)

    out = timed_rounds(benchmark, step, bench.setting.rounds)
    bench.outputs[variant] = out
    return out


@contextmanager
def variant_step(bench: Bench, variant: str) -> Iterator[Any]:
    """A zero-argument callable running one UNet step of ``variant`` (plain, lora, lora-fused), set up and undone around it."""
    if variant == "plain":
        yield lambda: bench.unet(**bench.inputs).sample
        return
    if variant not in ("lora", "lora-fused"):
        raise ValueError(f"unknown variant {variant!r}: plain, lora or lora-fused")
    config = {"loras": [{"path": str(bench.lora_file), "scale": 0.8}], "fuse": variant == "lora-fused"}
    rp = refcond.from_pipe(bench.pipe, {"injectors": [{"name": "lora", "config": config}]})
    try:
        yield lambda: bench.unet(**bench.inputs).sample
    finally:
        rp.detach()


def test_plain_unet(benchmark: Any, bench: Bench) -> None:
    with variant_step(bench, "plain") as step:
        _time(benchmark, bench, "plain", step)


def test_unfused_lora_unet(benchmark: Any, bench: Bench) -> None:
    with variant_step(bench, "lora") as step:
        _time(benchmark, bench, "lora", step)


def test_fused_lora_unet(benchmark: Any, bench: Bench) -> None:
    with variant_step(bench, "lora-fused") as step:
        if "lora" in bench.outputs:  # "at equal output": fused and unfused compute the same step, up to rounding
            with torch.inference_mode():
                fused, unfused = step(), bench.outputs["lora"]
            tolerance = (1e-4 if DTYPE == torch.float32 else 2e-2) * max(1.0, unfused.abs().max().item())
            assert torch.allclose(fused, unfused, atol=tolerance), "the fused LoRA computes another step than the unfused one"
        _time(benchmark, bench, "lora-fused", step)
