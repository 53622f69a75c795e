"""On a CUDA device, in half precision: refcond still matches diffusers' IP-Adapter.

The CPU suite checks parity in float32; this checks what only an accelerator exercises: moving the
condition, the projector and the cached keys/values to the pipeline's device and dtype. Skipped
where no CUDA device is present (as in CI).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
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
