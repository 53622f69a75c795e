"""Cost of one denoising step with the injectors attached, eager and compiled with ``torch.compile``.

Side by side, on the same UNet, weights, inputs and bound condition (classifier-free-guidance batch
of 2): refcond's ``cross-attention`` injector (the ``ip-adapter`` composition) and a LoRA file through
the ``lora`` injector, both attached.

- ``eager``: the UNet as it is;
- ``compiled``: ``torch.compile(unet)`` (inductor; ``REFCOND_BENCH_COMPILE_MODE`` picks a mode,
  e.g. ``max-autotune``), compiled before timing, its output checked against eager mode's.

The one-time compile, and a check that binding a second condition reuses the graph, are recorded
in ``extra_info``. ``conftest.py`` prints ``compiled/eager`` (suite ``compile``) and writes it to
``benchmarks/results/compile_ratios.json``. Compiling needs a C++ compiler on CPU and takes about a
minute for the tiny UNet on two cores.
Run: ``python -m pytest benchmarks/test_bench_compile.py -q --benchmark-only`` (see README.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from common import DEVICE, DTYPE, sd15_unet, sd_pipeline_around, timed_rounds
from refcond_injectors import IP_ADAPTER_COMPOSITION
from refcond_injectors.testing import fabricate_lora_state_dict
from safetensors.torch import save_file

import refcond
from refcond.testing import reference_images, tiny_image_encoder, tiny_unet

MODE = os.environ.get("REFCOND_BENCH_COMPILE_MODE") or None


@dataclass(frozen=True)
class Setting:
    """One benchmarked UNet, its latent size, and how many rounds to time."""

    name: str
    build_unet: Any
    latent_size: int
    rounds: int


SETTINGS = {
    "tiny-sd15": Setting("tiny-sd15", lambda: tiny_unet(), 16, rounds=100),
    "sd15-256px": Setting("sd15-256px", lambda: sd15_unet(32), 32, rounds=5),
    "sd15-512px": Setting("sd15-512px", lambda: sd15_unet(64), 64, rounds=50),  # meant for a GPU run
}
SELECTED = [s for s in os.environ.get("REFCOND_BENCH_SETTINGS", "tiny-sd15").split(",") if s]


@dataclass
class Bench:
    """A setting's composition (attached), its conditions and one step's inputs; outputs kept to compare."""

    setting: Setting
    rp: refcond.RefcondPipeline
    conditions: list[tuple[refcond.Condition, refcond.Condition]]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@pytest.fixture(scope="module", params=SELECTED)
def bench(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return build_bench(SETTINGS[request.param], tmp_path_factory.mktemp("compile"))


def build_bench(setting: Setting, folder: Path) -> Bench:
    """ip-adapter plus a LoRA file around the setting's UNet, two conditions of the same shape, one step's inputs."""
    unet = setting.build_unet()
    pipe = sd_pipeline_around(unet, image_encoder=tiny_image_encoder())
    lora = folder / "lora.safetensors"
    save_file(fabricate_lora_state_dict(pipe, rank=16, seed=1, text_encoders=False), str(lora))
    composition = {
        **IP_ADAPTER_COMPOSITION,
        "injectors": [*IP_ADAPTER_COMPOSITION["injectors"], {"name": "lora", "config": {"loras": [{"path": str(lora)}]}}],
    }
    rp = refcond.from_pipe(pipe, composition, seed=0)
    refs = reference_images(4)
    conditions = [rp.encode([refs[:2]]), rp.encode([refs[2:]])]
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 4, setting.latent_size, setting.latent_size, generator=gen),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen),
    }
    inputs = {k: v.to(DEVICE, DTYPE) if v.is_floating_point() else v.to(DEVICE) for k, v in inputs.items()}
    return Bench(setting, rp, conditions, inputs)


def _time(benchmark: Any, bench: Bench, variant: str, step: Any) -> torch.Tensor:
    benchmark.group = f"compile/{bench.setting.name}"
    benchmark.extra_info.update(suite="compile", setting=bench.setting.name, variant=variant, mode=MODE or "default")
    out = timed_rounds(benchmark, step, bench.setting.rounds)
    bench.outputs[variant] = out
    return out


def test_eager_unet(benchmark: Any, bench: Bench) -> None:
    unet = bench.rp.pipeline.unet
    with torch.inference_mode(), bench.rp.bind(*bench.conditions[0]):
        _time(benchmark, bench, "eager", lambda: unet(**bench.inputs).sample)


def test_compiled_unet(benchmark: Any, bench: Bench) -> None:
    torch._dynamo.reset()
    unet = bench.rp.pipeline.unet
    compiled = torch.compile(unet, mode=MODE)
    # Bound under inference mode every time: tensors made inside and outside it differ to dynamo's guards.
    with torch.inference_mode():
        with bench.rp.bind(*bench.conditions[1]):  # compile on one condition...
            start = time.perf_counter()
            compiled(**bench.inputs)
            benchmark.extra_info["compile_seconds"] = time.perf_counter() - start
        with bench.rp.bind(*bench.conditions[0]), torch._dynamo.config.patch(error_on_recompile=True):  # ...run on another
            got, expected = compiled(**bench.inputs).sample, unet(**bench.inputs).sample
            tolerance = (1e-4 if DTYPE == torch.float32 else 2e-2) * max(1.0, expected.abs().max().item())
            assert torch.allclose(got, expected, atol=tolerance), "the compiled UNet computes another step than the eager one"
            _time(benchmark, bench, "compiled", lambda: compiled(**bench.inputs).sample)
