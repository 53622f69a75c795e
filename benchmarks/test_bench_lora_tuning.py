"""Cost of tuning a LoRA on one reference group (``refcond_injectors.lora.tuning.tune_lora``).

For each setting it runs one tuning of 4 references and reports:

- the time of one optimizer step (forward, backward, clipping and AdamW on the LoRA parameters),
  median and fastest over the steps after the first, and the one-off setup (VAE and text
  encoding, adding the adapter, saving, restoring the UNet);
- the peak memory the tuning adds: on a GPU ``torch.cuda.max_memory_allocated`` minus what was
  allocated before; on a CPU the process's resident set size (RSS, ``/proc/self/statm``) sampled
  every 5 ms, peak minus before (torch's CPU allocator is invisible to ``tracemalloc``).

Run: ``python -m pytest benchmarks/test_bench_lora_tuning.py -q --benchmark-only -s`` (see
README.md); the numbers are printed and written to ``benchmarks/results/lora_tuning.json``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from common import DEVICE, DTYPE, sd15_unet
from diffusers import PNDMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from refcond.testing import (
    reference_images,
    tiny_sd15_pipeline,
    tiny_tokenizer,
    tiny_vae,
)

tuning = pytest.importorskip("refcond_injectors.lora.tuning")

MIXED_PRECISION = {torch.float32: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[DTYPE]
RESULTS = Path(os.environ.get("REFCOND_BENCH_LORA_JSON", Path(__file__).parent / "results" / "lora_tuning.json"))
REFERENCES = 4


def _sd15_pipeline(latent_size: int) -> StableDiffusionPipeline:
    """SD1.5's UNet with a 768-d text encoder (2 layers: it runs once per tuning) and the tiny VAE (factor 2)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=2,
            num_attention_heads=12,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    return StableDiffusionPipeline(
        unet=sd15_unet(latent_size),
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@dataclass(frozen=True)
class Setting:
    """A pipeline, the latent size it is tuned at, and how many steps to time."""

    name: str
    build: Callable[[], StableDiffusionPipeline]
    latent_size: int
    steps: int

    @property
    def resolution(self) -> int:
        return self.latent_size * 2  # the tiny VAE's scale factor


SETTINGS = {
    "tiny-sd15": Setting("tiny-sd15", tiny_sd15_pipeline, 16, steps=20),
    # SD1.5's UNet on 32x32 latents (what 256-px images give with SD's VAE), to keep a CPU step within seconds.
    "sd15-256px": Setting("sd15-256px", lambda: _sd15_pipeline(32), 32, steps=4),
    # SD1.5's UNet on 64x64 latents, its native 512 px: meant for a GPU run.
    "sd15-512px": Setting("sd15-512px", lambda: _sd15_pipeline(64), 64, steps=30),
}
SELECTED = [s for s in os.environ.get("REFCOND_BENCH_SETTINGS", "tiny-sd15,sd15-256px").split(",") if s in SETTINGS]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def _peak_memory() -> Iterator[dict[str, Any]]:
    """Peak memory added inside the block: CUDA allocations, or sampled RSS on a CPU."""
    out: dict[str, Any] = {}
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out.update(how="torch.cuda.max_memory_allocated - allocated before", bytes=torch.cuda.max_memory_allocated() - before)
        return
    if not Path("/proc/self/statm").exists():  # not Linux: the process-lifetime maximum is all there is
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        yield out
        out.update(how="ru_maxrss delta (a lower bound)", bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
        return
    before = _rss_bytes()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        stop.set()
        sampler.join()
    out.update(how="process RSS sampled every 5 ms, peak - before", bytes=max(peak[0], _rss_bytes()) - before)


@pytest.fixture(scope="module", params=SELECTED)
def setting(request: pytest.FixtureRequest) -> Setting:
    return SETTINGS[request.param]


def test_tuning_step_time_and_peak_memory(benchmark: Any, setting: Setting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any):
    pipe = setting.build().to(DEVICE, DTYPE)
    references = reference_images(REFERENCES, size=setting.resolution)
    config = tuning.TuningConfig(
        steps=setting.steps, resolution=setting.resolution, mixed_precision=MIXED_PRECISION, save_every=10**6, output_dir=str(tmp_path)
    )
    step_times: list[float] = []
    step = tuning._Trainer.step

    def timed_step(self: Any, index: int) -> Any:  # a tuning.TuningStep
        start = time.perf_counter()
        loss = step(self, index)  # .item() inside waits for the GPU
        step_times.append(time.perf_counter() - start)
        return loss

    monkeypatch.setattr(tuning._Trainer, "step", timed_step)
    runs = iter(range(10**6))
    memory: dict[str, Any] = {}

    def tune() -> Any:
        step_times.clear()
        with _peak_memory() as measured:
            result = tuning.tune_lora(pipe, references, config=config, output=tmp_path / f"run{next(runs)}.safetensors", progress=False)
        memory.update(measured)
        return result

    start = time.perf_counter()
    result = benchmark.pedantic(tune, rounds=1, iterations=1)
    total = time.perf_counter() - start
    assert result.steps == setting.steps and not result.cached

    timed = step_times[1:] or step_times  # the first step warms up kernels and allocators
    lora_params = sum(t.numel() for t in load_file(str(result.path)).values())
    report = {
        "setting": setting.name,
        "device": str(DEVICE),
        "dtype": str(DTYPE).removeprefix("torch."),
        "mixed_precision": MIXED_PRECISION,
        "latents": f"{setting.latent_size}x{setting.latent_size}",
        "references": REFERENCES,
        "steps": setting.steps,
        "rank": config.rank,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "lora_parameters": lora_params,
        "step_seconds_median": statistics.median(timed),
        "step_seconds_min": min(timed),
        "setup_seconds": total - sum(step_times),
        "peak_memory_mib": memory["bytes"] / 2**20,
        "memory_measure": memory["how"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    benchmark.extra_info.update(lora_tuning=report)
    _write(report)
    with capsys.disabled():
        print(
            f"\n[lora-tuning] {setting.name} ({report['latents']} latents, {DEVICE}, {report['dtype']}): "
            f"step {report['step_seconds_median'] * 1000:.1f} ms median ({report['step_seconds_min'] * 1000:.1f} min) over "
            f"{len(timed)} steps; setup {report['setup_seconds']:.2f} s; peak memory +{report['peak_memory_mib']:.0f} MiB "
            f"({report['memory_measure']})"
        )


def _write(report: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[f"{report['setting']}/{report['device']}/{report['dtype']}"] = report
    RESULTS.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n", encoding="utf-8")
