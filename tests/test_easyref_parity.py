"""The ``easyref`` composition against the official EasyRef math, through classifier-free guidance and on SD1.5.

The oracle is independent of refcond's processors: ``refcond_easyref.testing.official_unet`` (the
official ``LoRAIPAttnProcessor2_0`` / ``LoRAAttnProcessor2_0`` written out from their equations) fed
the context the official pipeline builds. The official pipeline appends
``MLPProjModel(reference tokens)`` to the text embeddings of every row: the prompt's rows get the
condition's tokens, the negative prompt's rows the unconditional condition's tokens, and diffusers
then runs the guidance batch ``[negative; positive]``. Each official processor attends every row's
last ``num_tokens`` context tokens through ``to_k_ip``/``to_v_ip``: the unconditional half of the
batch reads the unconditional condition, the conditional half the condition.

``test_easyref.py`` checks one conditional row on SDXL; these tests add the guidance batch, several
reference groups at once (row order), SD1.5, and whole guided generations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from refcond_easyref.testing import TINY_NUM_TOKENS, fabricate_official_checkpoint, official_projection, official_unet, tiny_easyref_overrides

import refcond
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline

PIPELINES = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}
SCALE = 0.7


def unet_inputs(unet: Any, rows: int) -> dict[str, Any]:
    """Seeded UNet inputs of ``rows`` rows: 5 text tokens, and SDXL's added conditions when the UNet takes them."""
    generator = torch.Generator().manual_seed(1)
    config = unet.config
    inputs = {
        "sample": torch.randn(rows, config.in_channels, config.sample_size, config.sample_size, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(rows, 5, config.cross_attention_dim, generator=generator),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, pooled, generator=generator),
            "time_ids": torch.randn(rows, 6, generator=generator),
        }
    return inputs


def official_output(official: torch.nn.Module, sd: dict[str, torch.Tensor], inputs: dict[str, Any], reference_tokens: torch.Tensor) -> torch.Tensor:
    """The official UNet's output when row ``i`` of the batch reads ``reference_tokens[i]`` (after ``MLPProjModel``)."""
    context = torch.cat([inputs["encoder_hidden_states"], official_projection(sd, reference_tokens)], dim=1)
    with torch.no_grad():
        return official(**{**inputs, "encoder_hidden_states": context}).sample


@pytest.mark.parametrize(("kind", "guidance"), [("sd15", False), ("sd15", True), ("sdxl", True)], ids=["sd15", "sd15-guidance", "sdxl-guidance"])
def test_injected_unet_matches_the_official_processors(kind: str, guidance: bool, tiny_qwen2vl_dir: Path) -> None:
    """Two reference groups (two prompts); with guidance the UNet batch is [uncond 1, uncond 2, cond 1, cond 2]."""
    pipe = PIPELINES[kind]()
    sd = fabricate_official_checkpoint(pipe.unet)
    official = official_unet(pipe.unet, sd, TINY_NUM_TOKENS, SCALE)  # a copy of the plain UNet, before refcond attaches
    rp = refcond.from_pipe(pipe, "easyref", checkpoint=sd, **tiny_easyref_overrides(tiny_qwen2vl_dir))
    condition, unconditional = rp.encode([reference_images(2), reference_images(3, seed=1)], prompts=["a cat", "a dog"])
    assert not torch.allclose(condition.tokens, unconditional.tokens, atol=1e-3)

    inputs = unet_inputs(pipe.unet, rows=4 if guidance else 2)
    cross, lora = rp.attachments
    bound = unconditional if guidance else None
    with torch.no_grad(), cross.condition(condition, bound, SCALE), lora.condition(condition, bound, SCALE):
        ours = pipe.unet(**inputs).sample

    rows = torch.cat([unconditional.tokens, condition.tokens]) if guidance else condition.tokens
    torch.testing.assert_close(ours, official_output(official, sd, inputs, rows), atol=1e-5, rtol=1e-4)
    if guidance:  # had the unconditional half read the condition, or the rows been paired [u1, c1, u2, c2], it would show
        wrong_half = official_output(official, sd, inputs, torch.cat([condition.tokens, condition.tokens]))
        interleaved = official_output(official, sd, inputs, torch.stack([unconditional.tokens, condition.tokens], dim=1).flatten(0, 1))
        assert not torch.allclose(ours[:2], wrong_half[:2], atol=1e-4)
        assert not torch.allclose(ours, interleaved, atol=1e-4)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_guided_generation_matches_the_official_pipeline(kind: str, tiny_qwen2vl_dir: Path) -> None:
    """A whole guided generation: refcond's call against the plain pipeline with the official processors and the
    official prompt embeddings (``[text; MLPProjModel(tokens)]``, the negative prompt's with the unconditional tokens)."""
    pipe = PIPELINES[kind]()
    sd = fabricate_official_checkpoint(pipe.unet)
    official = type(pipe)(**{**pipe.components, "unet": official_unet(pipe.unet, sd, TINY_NUM_TOKENS, SCALE)})
    rp = refcond.from_pipe(pipe, "easyref", checkpoint=sd, **tiny_easyref_overrides(tiny_qwen2vl_dir))
    references, prompt = reference_images(2), "a photo of a cat"

    def generate(call: Any, **kwargs: Any) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return call(num_inference_steps=2, guidance_scale=5.0, generator=generator, output_type="latent", **kwargs).images

    ours = generate(rp, prompt=prompt, references=references, reference_scale=SCALE)

    condition, unconditional = rp.encode([references], prompts=[prompt])  # what the call encoded
    with torch.no_grad():
        if isinstance(pipe, StableDiffusionXLPipeline):
            text, negative, pooled, negative_pooled = official.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True)
            extra = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
        else:
            text, negative = official.encode_prompt(prompt, "cpu", 1, True)
            extra = {}
        prompt_embeds = torch.cat([text, official_projection(sd, condition.tokens)], dim=1)
        negative_embeds = torch.cat([negative, official_projection(sd, unconditional.tokens)], dim=1)
        expected = generate(official, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, **extra)

    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
