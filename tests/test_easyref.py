"""The ``easyref`` composition end to end, on the tiny Qwen2-VL and the tiny SDXL-like / SD1.5-like pipelines.

The UNet side is checked against the official processors' math (``refcond_easyref.testing.OfficialProcessor``,
written out from the official ``LoRAIPAttnProcessor2_0`` / ``LoRAAttnProcessor2_0``): LoRA on
``to_q/to_k/to_v/to_out`` of every attention layer, the reference tokens appended to the text
context, their keys and values through ``to_k_ip``/``to_v_ip`` without LoRA, ``scale`` on the image
attention only.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from refcond_easyref import save_official, to_official
from refcond_easyref.testing import (
    TINY_LORA_RANK,
    TINY_NUM_TOKENS,
    OfficialProcessor,
    fabricate_official_checkpoint,
    official_projection,
    official_unet,
    tiny_easyref_overrides,
)
from refcond_encoders import mllm as mllm_module

import refcond
from refcond.checkpoints.io import read_checkpoint, write_safetensors
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline
from refcond.testing.qwen2vl import tiny_qwen2vl


def _easyref(pipe: Any, folder: Path, checkpoint: Any = None, **encoder_config: Any) -> refcond.RefcondPipeline:
    return refcond.from_pipe(pipe, "easyref", checkpoint=checkpoint, **tiny_easyref_overrides(folder, **encoder_config))


def _generate(rp: refcond.RefcondPipeline, references: Any, prompt: str = "a photo", **kwargs: Any) -> torch.Tensor:
    kwargs = {"num_inference_steps": 2, "output_type": "latent", "generator": torch.Generator().manual_seed(0), **kwargs}
    return rp(prompt, references, **kwargs).images


def _official_file(tmp_path: Path, pipe: Any, **kwargs: Any) -> Path:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, fabricate_official_checkpoint(pipe.unet, **kwargs))
    return path


def _sdxl_unet_inputs(unet: Any, batch: int = 1) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    cross = unet.config.cross_attention_dim
    time_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return {
        "sample": torch.randn(batch, unet.config.in_channels, size, size, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 5, cross, generator=generator),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, time_dim, generator=generator), "time_ids": torch.randn(batch, 6, generator=generator)},
    }


# -- parity with the official math --------------------------------------------------------------------


def _ours_and_official(folder: Path, scale: float, *, lora_on_reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One UNet forward of the easyref-injected UNet and of the official processors, on one fabricated file.

    ``lora_on_reference`` gives the official side the trap: the reference keys and values through
    the LoRA'd ``to_k``/``to_v`` (``to_k_ip + up @ down``) instead of plain ``to_k_ip``/``to_v_ip``.
    """
    pipe = tiny_sdxl_pipeline()
    plain = copy.deepcopy(pipe.unet)
    sd = fabricate_official_checkpoint(pipe.unet)
    rp = _easyref(pipe, folder, checkpoint=sd)
    condition, _ = rp.encode([reference_images(2)], prompts=["a photo"])
    inputs = _sdxl_unet_inputs(pipe.unet)
    cross, lora = rp.attachments
    with torch.no_grad(), cross.condition(condition, None, scale), lora.condition(condition, None, scale):
        ours = pipe.unet(**inputs).sample

    official = official_unet(plain, sd, TINY_NUM_TOKENS, scale)
    if lora_on_reference:
        official.set_attn_processor(
            {
                name: OfficialProcessor(p.lora, None if p.ip is None else tuple(w + up @ down for w, (down, up) in zip(p.ip, (p.lora["to_k"], p.lora["to_v"]))), p.num_tokens, p.scale)
                for name, p in official.attn_processors.items()
            }
        )
    context = torch.cat([inputs["encoder_hidden_states"], official_projection(sd, condition.tokens)], dim=1)
    with torch.no_grad():
        expected = official(**{**inputs, "encoder_hidden_states": context}).sample
    return ours, expected


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_injected_unet_matches_the_official_processors(tiny_qwen2vl_dir: Path, scale: float) -> None:
    ours, official = _ours_and_official(tiny_qwen2vl_dir, scale)
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-4)


def test_reference_branch_has_no_lora(tiny_qwen2vl_dir: Path) -> None:
    """The LoRA reaches to_k/to_v of the text only: had the reference keys gone through it, the outputs would differ."""
    ours, trap = _ours_and_official(tiny_qwen2vl_dir, 1.0, lora_on_reference=True)
    assert not torch.allclose(ours, trap, atol=1e-4)


def test_reference_scale_zero_keeps_the_lora(tiny_qwen2vl_dir: Path) -> None:
    """Scale 0 removes the image attention only (the official set_scale): the LoRA'd UNet still differs from the plain one."""
    pipe = tiny_sdxl_pipeline()
    plain = _generate_plain(pipe)
    rp = _easyref(pipe, tiny_qwen2vl_dir, checkpoint=fabricate_official_checkpoint(pipe.unet))
    references = reference_images(2)
    at_zero = _generate(rp, references, reference_scale=0.0)
    assert not torch.allclose(at_zero, plain, atol=1e-4)
    assert not torch.allclose(at_zero, _generate(rp, references), atol=1e-4)


# -- generation, detach, caching ---------------------------------------------------------------------


@pytest.mark.parametrize("make_pipe", [tiny_sdxl_pipeline, tiny_sd15_pipeline], ids=["sdxl", "sd15"])
def test_generation_runs_and_detach_restores_the_unet(make_pipe: Any, tiny_qwen2vl_dir: Path) -> None:
    pipe = make_pipe()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    processors = dict(pipe.unet.attn_processors)
    plain = _generate_plain(pipe)
    rp = _easyref(pipe, tiny_qwen2vl_dir)
    latents = _generate(rp, reference_images(3), guidance_scale=5.0)
    assert latents.shape == plain.shape and torch.isfinite(latents).all()
    rp.detach()
    after = pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items())
    assert torch.equal(_generate_plain(pipe), plain)


def _generate_plain(pipe: Any) -> torch.Tensor:
    return pipe("a photo", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("count", [1, 2, 5])
def test_condition_has_k_tokens_for_any_number_of_references(tiny_qwen2vl_dir: Path, count: int) -> None:
    rp = _easyref(tiny_sdxl_pipeline(), tiny_qwen2vl_dir)
    condition, unconditional = rp.encode([reference_images(count)], prompts=["a photo"])
    assert condition.tokens.shape == (1, TINY_NUM_TOKENS, 64)
    assert unconditional.tokens.shape == (1, TINY_NUM_TOKENS, 64)


def test_qwen2vl_is_read_from_disk_once(tiny_qwen2vl_dir: Path) -> None:
    loader = mllm_module.Qwen2VLForConditionalGeneration.from_pretrained
    with mock.patch.object(mllm_module.Qwen2VLForConditionalGeneration, "from_pretrained", side_effect=loader) as spy:
        _easyref(tiny_sdxl_pipeline(), tiny_qwen2vl_dir)
    assert spy.call_count == 1


def test_a_second_prompt_over_the_same_references_skips_the_mllm(tiny_qwen2vl_dir: Path) -> None:
    rp = _easyref(tiny_sdxl_pipeline(), tiny_qwen2vl_dir, append_prompt=False)  # the MLLM reads the instruction alone
    references = reference_images(2)
    with mock.patch.object(rp.encoder, "_encode", wraps=rp.encoder._encode) as mllm:
        _generate(rp, references, "a cat")
        _generate(rp, references, "a dog")
        assert mllm.call_count == 2  # the references and the black unconditional image, once each
        _generate(rp, reference_images(3), "a dog")
        assert mllm.call_count == 3  # new references; the unconditional encoding is reused


def test_with_append_prompt_the_mllm_reads_the_prompt(tiny_qwen2vl_dir: Path) -> None:
    rp = _easyref(tiny_sdxl_pipeline(), tiny_qwen2vl_dir, append_prompt=True)
    references = reference_images(2)
    seen: list[list[str]] = []
    encode = rp.encoder.encode

    def spy(groups: Any, prompts: Any = None) -> Any:
        seen.append(list(prompts))
        return encode(groups, prompts)

    with mock.patch.object(rp.encoder, "encode", side_effect=spy):
        _generate(rp, references, "a cat")
        _generate(rp, references, "a cat")  # cached by references and prompt
        _generate(rp, references, "a dog")
        rp(["a cat", "a dog"], references, num_inference_steps=1, output_type="latent")
    assert seen == [["a cat"], ["a dog"], ["a cat", "a dog"]]
    cat, _ = rp.encode([references], prompts=["a cat"])
    dog, _ = rp.encode([references], prompts=["a dog"])
    assert not torch.allclose(cat.tokens, dog.tokens)


def test_prompt_embeds_are_refused_when_the_mllm_reads_the_prompt(tiny_qwen2vl_dir: Path) -> None:
    pipe = tiny_sdxl_pipeline()
    rp = _easyref(pipe, tiny_qwen2vl_dir, append_prompt=True)
    embeds = torch.zeros(1, 5, pipe.unet.config.cross_attention_dim)
    with pytest.raises(refcond.ConfigError, match="reads the prompt"):
        rp(None, reference_images(1), prompt_embeds=embeds, num_inference_steps=1)


# -- official checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("include_mllm", [False, True], ids=["adapters-only", "with-mllm"])
def test_official_round_trip_is_bit_exact(tmp_path: Path, tiny_qwen2vl_dir: Path, include_mllm: bool) -> None:
    pipe = tiny_sdxl_pipeline()
    path = _official_file(tmp_path, pipe, include_mllm=include_mllm)
    original, _ = read_checkpoint(path)
    original = {k: v for k, v in original.items() if not k.endswith("lm_head.weight")}
    rp = _easyref(pipe, tiny_qwen2vl_dir, checkpoint=path)
    exported = to_official(rp)
    if not include_mllm:  # the encoder kept the weights of the model it loaded; they are exported too
        exported = {k: v for k, v in exported.items() if not k.startswith("multimodal_llm.")}
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    again, _ = read_checkpoint(save_official(rp, tmp_path / "again.safetensors"))
    assert all(torch.equal(again[k], exported[k]) for k in exported)


def test_fine_tuned_mllm_weights_are_loaded(tmp_path: Path, tiny_qwen2vl_dir: Path) -> None:
    pipe = tiny_sdxl_pipeline()
    with pytest.warns(UserWarning, match="lm_head"):
        rp = _easyref(pipe, tiny_qwen2vl_dir, checkpoint=_official_file(tmp_path, pipe, include_mllm=True))
    base = tiny_qwen2vl()
    assert not torch.equal(rp.encoder.norm.weight, base.model.language_model.norm.weight)
    sd = fabricate_official_checkpoint(pipe.unet, include_mllm=True)
    assert torch.equal(rp.encoder.layers[0].self_attn.q_proj.weight, sd["multimodal_llm.model.layers.0.self_attn.q_proj.weight"])


def test_a_stage_one_file_without_lora_gets_no_lora_layers(tmp_path: Path, tiny_qwen2vl_dir: Path) -> None:
    pipe = tiny_sdxl_pipeline()
    path = _official_file(tmp_path, pipe, lora_rank=None)
    # Only the encoder is overridden: the file's settings (no LoRA) rank above the recipe's, below the caller's.
    rp = refcond.from_pipe(pipe, "easyref", checkpoint=path, encoder=tiny_easyref_overrides(tiny_qwen2vl_dir)["encoder"])
    assert rp.composition.injectors[1].config["layers"] is None
    assert not any("lora" in k for k in to_official(rp))
    assert not getattr(pipe.unet, "peft_config", None)


def test_file_sizes_configure_the_composition(tmp_path: Path, tiny_qwen2vl_dir: Path) -> None:
    pipe = tiny_sdxl_pipeline()
    path = _official_file(tmp_path, pipe, num_tokens=5, lora_rank=3)
    rp = refcond.from_pipe(pipe, "easyref", checkpoint=path, encoder=tiny_easyref_overrides(tiny_qwen2vl_dir)["encoder"])
    assert rp.composition.aggregator.config["num_tokens"] == 5
    assert rp.composition.injectors[1].config["layers"]["rank"] == 3
    condition, _ = rp.encode([reference_images(2)], prompts=["a photo"])
    assert condition.tokens.shape[1] == 5


def test_a_wrong_shape_names_the_official_key_and_both_shapes(tmp_path: Path, tiny_qwen2vl_dir: Path) -> None:
    pipe = tiny_sdxl_pipeline()
    sd = fabricate_official_checkpoint(pipe.unet)
    key = next(k for k in sd if k.endswith("attn2.processor.to_v_ip.weight"))
    sd[key] = sd[key][:, :-1]
    with pytest.raises(refcond.CheckpointError) as error:
        _easyref(pipe, tiny_qwen2vl_dir, checkpoint=sd)
    assert key in str(error.value) and "expected shape" in str(error.value)


def test_a_wrong_lora_shape_is_named(tmp_path: Path, tiny_qwen2vl_dir: Path) -> None:
    pipe = tiny_sdxl_pipeline()
    sd = fabricate_official_checkpoint(pipe.unet)
    key = next(k for k in sd if k.endswith("attn1.processor.to_q_lora.up.weight"))
    sd[key] = torch.zeros(3, TINY_LORA_RANK)
    with pytest.raises(refcond.CheckpointError, match=r"to_q_lora\.up\.weight: expected shape \(\d+, 4\), got \(3, 4\)"):
        _easyref(pipe, tiny_qwen2vl_dir, checkpoint=sd)


def test_a_wrong_aggregator_shape_is_named(tmp_path: Path, tiny_qwen2vl_dir: Path) -> None:
    pipe = tiny_sdxl_pipeline()
    sd = fabricate_official_checkpoint(pipe.unet)
    sd["mllm_final_layer.norm.weight"] = torch.ones(63)
    with pytest.raises(refcond.CheckpointError, match=r"aggregator\.norm\.weight: expected shape \(64,\), got \(63,\)"):
        _easyref(pipe, tiny_qwen2vl_dir, checkpoint=sd)


def test_an_sdxl_file_on_an_sd15_pipeline_says_so(tmp_path: Path, tiny_qwen2vl_dir: Path) -> None:
    sd = fabricate_official_checkpoint(tiny_sdxl_pipeline().unet)
    with pytest.raises(refcond.IncompatibleBackboneError, match="Stable Diffusion XL|made for this backbone"):
        _easyref(tiny_sd15_pipeline(), tiny_qwen2vl_dir, checkpoint=sd)


def test_unknown_keys_are_refused(tmp_path: Path, tiny_qwen2vl_dir: Path) -> None:
    pipe = tiny_sdxl_pipeline()
    sd = fabricate_official_checkpoint(pipe.unet)
    sd["image_encoder.weight"] = torch.zeros(2)
    with pytest.raises(refcond.CheckpointError, match="unexpected key 'image_encoder.weight'"):
        _easyref(pipe, tiny_qwen2vl_dir, checkpoint=sd)


# -- refcond's own checkpoint ------------------------------------------------------------------------


def test_refcond_checkpoint_of_an_easyref_composition_loads_back(tmp_path: Path, tiny_qwen2vl_dir: Path) -> None:
    pipe = tiny_sdxl_pipeline()
    rp = _easyref(pipe, tiny_qwen2vl_dir, checkpoint=fabricate_official_checkpoint(pipe.unet))
    references = reference_images(2)
    expected = _generate(rp, references)
    saved = rp.save(tmp_path / "easyref.safetensors")
    rp.detach()
    again = refcond.load(saved, pipe)
    for role in ("encoder", "aggregator", "injectors"):
        assert getattr(again.composition, role) == getattr(rp.composition, role)
    assert torch.equal(_generate(again, references), expected)


# -- the guide ---------------------------------------------------------------------------------------


def test_the_easyref_guide_examples_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_qwen2vl_dir: Path) -> None:
    """docs/easyref.md's examples, in order, with Qwen2-VL-2B replaced by the tiny one and a fabricated official file."""
    import re

    from diffusers import StableDiffusionXLPipeline
    from refcond_encoders.mllm import MllmEncoder

    from refcond.plugins import load_plugins

    tiny = tiny_easyref_overrides(tiny_qwen2vl_dir)["encoder"]["config"]
    build_encoder = MllmEncoder.from_config.__func__

    def from_config(cls: type, config: Any, context: Any) -> Any:
        if config.model == "Qwen/Qwen2-VL-2B-Instruct":  # the download, replaced by the tiny stand-in
            config = config.model_copy(update=tiny)
        return build_encoder(cls, config, context)

    monkeypatch.setattr(MllmEncoder, "from_config", classmethod(from_config))
    monkeypatch.setattr(refcond.pipeline, "get_plugins", load_plugins)  # registers the patched factory
    denoise = StableDiffusionXLPipeline.__call__
    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", lambda self, *a, **k: denoise(self, *a, **{**k, "num_inference_steps": 2}))
    monkeypatch.chdir(tmp_path)

    pipe = tiny_sdxl_pipeline()
    processors = dict(pipe.unet.attn_processors)
    namespace = {"pipe": pipe, "references": reference_images(3), "checkpoint": str(_official_file(tmp_path, pipe))}
    guide = Path(__file__).resolve().parents[1] / "docs" / "easyref.md"
    blocks = re.findall(r"^```python\n(.*?)^```", guide.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/easyref.md python block {i}", "exec"), namespace)  # noqa: S102 - the guide's own examples
    assert (tmp_path / "easyref-official.safetensors").is_file()
    assert dict(pipe.unet.attn_processors) == processors and not getattr(pipe.unet, "peft_config", None)
