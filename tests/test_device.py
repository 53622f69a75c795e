"""On a CUDA device, in half precision: refcond still matches diffusers' IP-Adapter; and CPU offload frees the GPU.

The CPU suite checks parity in float32; this checks what only an accelerator exercises: moving the
condition, the projector and the cached keys/values to the pipeline's device and dtype, and the
memory that ``enable_model_cpu_offload`` gives back while the UNet runs (the CPU suite follows the
moves in ``tests/test_offload.py``). Skipped where no CUDA device is present (as in CI).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from refcond_easyref.testing import tiny_easyref_overrides
from refcond_injectors.testing import fabricate_ip_adapter_state_dict
from safetensors.torch import save_file

import refcond
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Largest max-abs difference allowed between refcond's and diffusers' float16 latents: two runs of
#: the same math that differ only in float16 rounding (operation order, where casts happen).
MATCH_ATOL = 2e-2
#: Smallest max-abs difference the references must cause between conditioned and plain latents. Ten
#: times MATCH_ATOL, so "the references changed the output" cannot be satisfied by rounding noise
#: of the size the match tolerance allows: a conditioning path that silently did nothing (a scale
#: dropped, keys/values left on another device and skipped) fails here instead of passing by noise.
#: Still far below the real effect: in float32 on CPU the references move these latents by 3.5-5.
MIN_REFERENCE_EFFECT = 10 * MATCH_ATOL


@pytest.mark.parametrize("variant", ["base", "plus"])
@pytest.mark.parametrize("build", [tiny_sd15_pipeline, tiny_sdxl_pipeline], ids=["sd15", "sdxl"])
def test_cuda_half_precision_matches_diffusers(tmp_path: Path, build, variant: str) -> None:
    ours = build().to("cuda", torch.float16)
    theirs = build().to("cuda", torch.float16)
    checkpoint = tmp_path / "ip.safetensors"
    save_file(fabricate_ip_adapter_state_dict(ours.unet, ours.image_encoder, variant=variant, seed=1), str(checkpoint))
    refs = reference_images(3)

    def run(pipe, **kwargs):
        generator = torch.Generator("cuda").manual_seed(0)
        return pipe("a red cat", num_inference_steps=2, guidance_scale=5.0, generator=generator, output_type="latent", **kwargs).images

    rp = refcond.from_pipe(ours, "ip-adapter", checkpoint=checkpoint, aggregator="concat")
    latents = run(rp, references=refs)
    assert latents.device.type == "cuda" and latents.dtype == torch.float16

    theirs.load_ip_adapter(str(tmp_path), subfolder="", weight_name=checkpoint.name, image_encoder_folder=None)
    expected = run(theirs, ip_adapter_image=[refs])
    mismatch = (latents.float() - expected.float()).abs().max().item()
    assert mismatch <= MATCH_ATOL, f"refcond differs from diffusers by {mismatch:.4g} (> {MATCH_ATOL})"

    rp.detach()
    plain = run(ours)
    effect = (latents.float() - plain.float()).abs().max().item()
    assert effect > MIN_REFERENCE_EFFECT, f"the references changed the latents by only {effect:.4g} (<= {MIN_REFERENCE_EFFECT})"


def test_cuda_model_offload_keeps_refcond_modules_off_the_gpu_while_the_unet_runs(tiny_qwen2vl_dir: Path) -> None:
    """EasyRef with rp.enable_model_cpu_offload(): the same latents; at every UNet step and after the call, the MLLM,
    the aggregator and the projector are on the CPU; the peak while the UNet runs drops by at least their size."""
    pipe = tiny_sdxl_pipeline().to("cuda")
    # The MLLM's own caches off: both runs encode in full, and nothing but placement differs between them.
    rp = refcond.from_pipe(pipe, "easyref", seed=0, **tiny_easyref_overrides(tiny_qwen2vl_dir, vision_cache_mb=0, prefix_cache_mb=0))
    ours = [rp.encoder, rp.aggregator, rp.injectors[0]]
    our_bytes = sum(p.numel() * p.element_size() for module in ours for p in module.parameters())
    references = reference_images(2)

    def run() -> tuple[torch.Tensor, list[set[str]], int]:
        """Latents, the devices of refcond's modules at each UNet step, and the peak allocated from the first step on."""
        at_steps: list[set[str]] = []

        def step(module: torch.nn.Module, args: object) -> None:
            if not at_steps:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            at_steps.append({p.device.type for module in ours for p in module.parameters()})

        rp.clear_cache()
        handle = pipe.unet.conv_in.register_forward_pre_hook(step)  # after the offload hook has moved the UNet
        try:
            generator = torch.Generator("cuda").manual_seed(0)
            latents = rp("a red cat", references, num_inference_steps=2, guidance_scale=5.0, output_type="latent", generator=generator).images
        finally:
            handle.remove()
        torch.cuda.synchronize()
        return latents, at_steps, torch.cuda.max_memory_allocated()

    plain, steps, plain_peak = run()
    assert steps == [{"cuda"}, {"cuda"}]
    rp.enable_model_cpu_offload()
    offloaded, steps, offloaded_peak = run()
    assert steps == [{"cpu"}, {"cpu"}]
    assert {p.device.type for module in ours for p in module.parameters()} == {"cpu"}
    assert latents_close(offloaded, plain)
    condition, unconditional = rp.encode([references], prompts=["a red cat"])  # where the UNet's hooks take it from
    assert condition.tokens.device.type == unconditional.tokens.device.type == "cuda"
    assert offloaded_peak <= plain_peak - our_bytes, (
        f"peak while the UNet runs: {offloaded_peak} bytes offloaded, {plain_peak} not; refcond's modules hold {our_bytes}"
    )
    rp.remove_all_hooks()
    assert {p.device.type for module in ours for p in module.parameters()} == {"cuda"}
    rp.detach()


def latents_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """float32 on one device: the same kernels on the same inputs, up to the order of reductions."""
    return a.device == b.device and torch.allclose(a, b, atol=1e-4, rtol=1e-4)
