"""CPU offload: ``rp.enable_model_cpu_offload`` offloads refcond's modules along with diffusers' pipeline.

On the CPU, diffusers and accelerate accept ``device="cpu"``: the execution device is then
``cpu:0``, so every move really happens (``.to("cpu:0")`` copies the weights) and the images can be
compared bit for bit with those of a run without offload. Where the modules are is followed through
the ``.to()`` calls made on them (a tensor on ``cpu:0`` reports ``cpu``), and checked at the moments
that matter: when each of refcond's modules runs, and at every UNet step. The CUDA counterpart,
with peak memory, is in ``tests/test_device.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from refcond_easyref.testing import tiny_easyref_overrides

import refcond
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline
from refcond.weights import weights_fingerprint

EXECUTION = torch.device("cpu:0")  # what diffusers makes of device="cpu"
CPU = torch.device("cpu")


def _build(kind: str, folder: Path, **encoder_config: Any) -> refcond.RefcondPipeline:
    if kind == "ip-adapter":
        return refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    return refcond.from_pipe(tiny_sdxl_pipeline(), "easyref", seed=0, **tiny_easyref_overrides(folder, **encoder_config))


def _generate(rp: refcond.RefcondPipeline, references: list[Any], prompt: str = "a red cat") -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return rp(prompt, references, num_inference_steps=2, guidance_scale=5.0, output_type="latent", generator=generator).images


@contextmanager
def _counting_encodes(rp: refcond.RefcondPipeline) -> Iterator[list[int]]:
    calls: list[int] = []
    encode = rp.encoder.encode
    rp.encoder.encode = lambda *args, **kwargs: (calls.append(1), encode(*args, **kwargs))[1]
    try:
        yield calls
    finally:
        del rp.encoder.encode


@pytest.mark.parametrize("kind", ["ip-adapter", "easyref"])
def test_offloaded_generation_equals_generation_without_offload(kind: str, tiny_qwen2vl_dir: Path) -> None:
    """Same latents with offload on, the encoder run under it, its condition cached across offloaded calls, and undone by remove_all_hooks."""
    no_mllm_caches = {"vision_cache_mb": 0, "prefix_cache_mb": 0} if kind == "easyref" else {}  # the whole MLLM runs under offload
    rp = _build(kind, tiny_qwen2vl_dir, **no_mllm_caches)
    references = reference_images(2)
    expected = _generate(rp, references)
    homes = {id(p): p.device for p in rp.parameters()}

    rp.clear_cache()  # the offloaded call must run the encoder, not read the condition cached above
    rp.enable_model_cpu_offload(device="cpu")
    with _counting_encodes(rp) as encodes:
        assert torch.equal(_generate(rp, references), expected)
        assert torch.equal(_generate(rp, references), expected)
    assert len(encodes) == 1, "weights moved to the device and back must read as unchanged: the second call is a cache hit"

    rp.remove_all_hooks()
    assert all(p.device == homes[id(p)] for p in rp.parameters())
    assert not any(hasattr(m, "_hf_hook") for m in (rp.encoder, rp.aggregator, *rp.injectors))
    assert not hasattr(rp.pipeline.unet, "_hf_hook")
    rp.pipeline.to("cpu")
    rp.clear_cache()
    assert torch.equal(_generate(rp, references), expected)
    rp.detach()


class Placements:
    """Where each watched module was last moved to (by any ``.to()`` call on it), and what it was at chosen moments."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.names = {id(module): name for name, module in modules.items()}
        self.where = dict.fromkeys(modules, CPU)
        self.seen: list[tuple[str, dict[str, torch.device]]] = []

    def moved(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = self.names.get(id(module))
        target = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if name is not None and target is not None:
            self.where[name] = torch.device(target)

    def mark(self, moment: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self.seen.append((moment, dict(self.where)))

        return hook

    def at(self, moment: str) -> list[dict[str, torch.device]]:
        return [where for seen, where in self.seen if seen == moment]


def test_refcond_modules_run_on_the_device_and_leave_it_before_the_unet(monkeypatch: pytest.MonkeyPatch, tiny_qwen2vl_dir: Path) -> None:
    """EasyRef under offload: the MLLM, then the aggregator, then the projector run on the device, one at a time,
    and none of them is on it at any UNet step or after the call."""
    rp = _build("easyref", tiny_qwen2vl_dir)
    (cross, _lora) = rp.injectors
    placements = Placements({"encoder": rp.encoder, "aggregator": rp.aggregator, "injector": cross, "unet": rp.pipeline.unet})
    to = torch.nn.Module.to

    def recording_to(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        placements.moved(module, args, kwargs)
        return to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    # Hooks on submodules: they run after accelerate's hook on the module itself has moved it.
    rp.encoder.visual.register_forward_pre_hook(placements.mark("encoder runs"))
    rp.aggregator.layers[0].register_forward_pre_hook(placements.mark("aggregator runs"))
    cross.projector.register_forward_pre_hook(placements.mark("projector runs"))
    rp.pipeline.unet.conv_in.register_forward_pre_hook(placements.mark("unet step"))

    rp.enable_model_cpu_offload(device="cpu")
    assert set(placements.where.values()) == {CPU}
    _generate(rp, reference_images(2))

    (encoder_runs,) = {tuple(sorted(w.items())) for w in placements.at("encoder runs")}  # the same at every image
    assert dict(encoder_runs) == {"encoder": EXECUTION, "aggregator": CPU, "injector": CPU, "unet": CPU}
    for where in placements.at("aggregator runs"):
        assert where == {"encoder": CPU, "aggregator": EXECUTION, "injector": CPU, "unet": CPU}
    (projector_runs,) = placements.at("projector runs")
    assert projector_runs == {"encoder": CPU, "aggregator": CPU, "injector": EXECUTION, "unet": CPU}
    unet_steps = placements.at("unet step")
    assert len(unet_steps) == 2
    for where in unet_steps:
        assert where == {"encoder": CPU, "aggregator": CPU, "injector": CPU, "unet": EXECUTION}
    assert [moment for moment, _ in placements.seen if moment != "encoder runs"][:2] == ["aggregator runs", "aggregator runs"]
    assert placements.where["encoder"] == placements.where["aggregator"] == placements.where["injector"] == CPU
    rp.detach()


def test_offload_refuses_a_training_step_and_detach_keeps_the_pipelines_own_offload(tiny_qwen2vl_dir: Path) -> None:
    rp = _build("ip-adapter", tiny_qwen2vl_dir)
    rp.enable_model_cpu_offload(device="cpu")
    rp.train()
    with pytest.raises(refcond.ConfigError, match="CPU offload is for generation"):
        rp.encode([reference_images(1)])
    with torch.no_grad():  # generating while components train (validation images) is fine
        rp.encode([reference_images(1)])
    rp.eval()
    rp.detach()
    assert not hasattr(rp.injectors[0], "_hf_hook")
    assert hasattr(rp.pipeline.unet, "_hf_hook"), "diffusers' own offload is the user's setting: detach leaves it"
    rp.pipeline.remove_all_hooks()
    with pytest.raises(refcond.RefcondError, match="detached"):
        rp.enable_model_cpu_offload(device="cpu")


def test_weights_moved_to_a_device_and_back_read_as_unchanged() -> None:
    """What makes the condition cache survive offload: the fingerprint follows parameter objects, devices and values, not memory addresses."""
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    before = weights_fingerprint([module])
    pointer = module[0].weight.data_ptr()
    module.to(EXECUTION).to(CPU)  # copies on the CPU, as the move to an accelerator and back does
    assert module[0].weight.data_ptr() != pointer
    assert weights_fingerprint([module]) == before
    module.load_state_dict(module.state_dict(), assign=True)  # new parameter objects, same values
    assert weights_fingerprint([module]) != before
