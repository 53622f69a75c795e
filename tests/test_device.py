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
    assert torch.allclose(latents.float(), expected.float(), atol=2e-2), (latents.float() - expected.float()).abs().max()

    rp.detach()
    plain = run(ours)
    assert not torch.allclose(plain.float(), latents.float(), atol=2e-2)  # the references did change the output
