"""The ``cross-attention`` injector: reversible attachment, exact no-op at scale 0, work done once
per generation, per-block scales, and clear errors for checkpoints that do not fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel
from refcond_injectors.cross_attention import (
    DecoupledCrossAttnProcessor,
    ResamplerProjector,
    project_condition,
)
from refcond_injectors.testing import fabricate_ip_adapter_state_dict
from safetensors.torch import save_file

import refcond
from refcond import (
    CheckpointError,
    Condition,
    ConfigError,
    IncompatibleBackboneError,
    RefcondError,
    cross_attention_layers,
    layer_scales,
)
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline

PROMPT = "a red cat"


def _generate(pipe: Any, steps: int = 2, **kwargs: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, generator=generator, output_type="latent", **kwargs).images


def _write(tmp_path: Path, state_dict: dict[str, torch.Tensor], name: str = "ip.safetensors") -> Path:
    path = tmp_path / name
    save_file(state_dict, str(path))
    return path


def _checkpoint(tmp_path: Path, pipe: Any, variant: str = "plus") -> Path:
    return _write(tmp_path, fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, variant=variant, seed=1))


def _unet_inputs(unet: UNet2DConditionModel, batch: int = 2) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    size = unet.config.sample_size
    return {
        "sample": torch.randn(batch, 4, size, size, generator=gen),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen),
    }


# -- attaching and detaching -------------------------------------------------------------------


def test_a_second_cross_attention_injector_on_one_unet_is_refused() -> None:
    pipe = tiny_sd15_pipeline()
    first = refcond.from_pipe(pipe, "ip-adapter")
    with pytest.raises(ConfigError, match="already attached to this UNet; one UNet takes one"):
        refcond.from_pipe(pipe, "ip-adapter")
    first.detach()
    refcond.from_pipe(pipe, "ip-adapter").detach()  # free again once the first is detached


def test_detach_restores_the_unet_exactly(tmp_path: Path) -> None:
    pipe = tiny_sd15_pipeline()
    unet = pipe.unet
    processors = dict(unet.attn_processors)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    config = dict(unet.config)
    inputs = _unet_inputs(unet)
    with torch.no_grad():
        before = unet(**inputs).sample

    rp = refcond.from_pipe(pipe, "ip-adapter", checkpoint=_checkpoint(tmp_path, pipe))
    # Attached: only the attn2 processors changed; diffusers issue #6088 state is untouched.
    assert dict(unet.config) == config and unet.encoder_hid_proj is None
    assert unet.state_dict().keys() == state.keys()
    swapped = {name for name, p in unet.attn_processors.items() if isinstance(p, DecoupledCrossAttnProcessor)}
    assert swapped == {name for name in processors if name.endswith("attn2.processor")}
    _generate(rp, references=reference_images(2))
    rp.detach()

    assert all(unet.attn_processors[name] is original for name, original in processors.items())
    after_state = unet.state_dict()
    assert after_state.keys() == state.keys() and all(torch.equal(after_state[k], v) for k, v in state.items())
    assert dict(unet.config) == config and unet.encoder_hid_proj is None
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, before)
    with pytest.raises(RefcondError, match="detached"):
        rp(PROMPT, references=reference_images(1))


def test_attached_without_a_bound_condition_the_unet_is_plain() -> None:
    pipe = tiny_sd15_pipeline()
    plain = _generate(pipe)
    refcond.from_pipe(pipe, "ip-adapter")
    assert torch.equal(_generate(pipe), plain)  # the diffusers pipeline called directly


@pytest.mark.parametrize("scale", [0.0, {"down": 0.0, "mid": 0.0, "up": 0.0}, {}], ids=["float", "every-block", "no-block"])
def test_scale_zero_gives_exactly_the_plain_unet(scale: Any) -> None:
    pipe = tiny_sdxl_pipeline()
    plain = _generate(pipe)
    rp = refcond.from_pipe(pipe, "ip-adapter")
    assert torch.equal(_generate(rp, references=reference_images(2), reference_scale=scale), plain)
    assert not torch.equal(_generate(rp, references=reference_images(2)), plain)


# -- one generation ----------------------------------------------------------------------------


def test_projection_and_keys_values_are_computed_once_per_generation(tmp_path: Path) -> None:
    pipe = tiny_sd15_pipeline()
    rp = refcond.from_pipe(pipe, "ip-adapter", checkpoint=_checkpoint(tmp_path, pipe, "plus"), aggregator="concat")
    injector = rp.injectors[0]
    calls = {"projector": 0, "to_k_ip": 0, "to_v_ip": 0, "unet": 0}

    def counter(name: str) -> Any:
        def hook(*_: Any) -> None:
            calls[name] += 1

        return hook

    handles = [
        injector.projector.register_forward_hook(counter("projector")),
        injector.layers[-1].to_k_ip.register_forward_hook(counter("to_k_ip")),
        injector.layers[-1].to_v_ip.register_forward_hook(counter("to_v_ip")),
        pipe.unet.register_forward_hook(counter("unet")),
    ]
    _generate(rp, steps=3, references=reference_images(3))
    for handle in handles:
        handle.remove()
    # Three denoising steps (PNDM adds a warm-up UNet call), each a guidance batch of 2, but the
    # condition was projected, and its keys and values computed, once.
    assert calls["unet"] >= 3
    assert calls == {"projector": 1, "to_k_ip": 1, "to_v_ip": 1, "unet": calls["unet"]}


def test_the_condition_is_released_after_each_call(tmp_path: Path) -> None:
    pipe = tiny_sd15_pipeline()
    rp = refcond.from_pipe(pipe, "ip-adapter")
    processors = [p for p in pipe.unet.attn_processors.values() if isinstance(p, DecoupledCrossAttnProcessor)]
    _generate(rp, references=reference_images(2))
    assert processors and all(p.bound is None for p in processors)

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a generation stopped half way
        _generate(rp, references=reference_images(2), callback_on_step_end=interrupt)
    assert all(p.bound is None for p in processors)


def test_without_unconditional_only_the_conditional_half_reads_the_reference() -> None:
    pipe = tiny_sd15_pipeline()
    rp = refcond.from_pipe(pipe, "ip-adapter")
    condition, _ = rp.encode([reference_images(2)])
    rp.detach()
    attachment = rp.injectors[0].attach(pipe.unet)
    inputs = _unet_inputs(pipe.unet)
    inputs = {k: v[:1].repeat_interleave(2, 0) if k != "timestep" else v for k, v in inputs.items()}  # two equal rows
    with torch.no_grad():
        plain = pipe.unet(**inputs).sample
        with attachment.condition(condition, None):
            out = pipe.unet(**inputs).sample
            with pytest.raises(RefcondError, match="batch of 3"):
                pipe.unet(**{k: v[:1].repeat_interleave(3, 0) if k != "timestep" else v for k, v in inputs.items()})
    attachment.detach()
    assert torch.equal(out[0], plain[0])
    assert not torch.allclose(out[1], plain[1], atol=1e-3)


def test_groups_of_different_sizes_are_padded_and_masked(tmp_path: Path) -> None:
    """Two prompts, one with one reference and one with two: the short group's padding is never attended."""
    pipe = tiny_sd15_pipeline()
    rp = refcond.from_pipe(pipe, "ip-adapter", checkpoint=_checkpoint(tmp_path, pipe, "plus"), aggregator="concat")
    refs = reference_images(2)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    both = rp(["a cat", "a dog"], references=[[refs[0]], refs], latents=latents, num_inference_steps=2, output_type="latent").images
    alone = rp("a cat", references=[refs[0]], latents=latents[:1], num_inference_steps=2, output_type="latent").images
    assert (both[0] - alone[0]).abs().max() < 1e-4


# -- scales ------------------------------------------------------------------------------------


def test_per_block_scale_selects_layers_like_instantstyle() -> None:
    unet = tiny_sdxl_pipeline().unet
    layers = cross_attention_layers(unet)
    names = [la.name for la in layers]
    scales = dict(zip(names, layer_scales(unet, names, {"up": {"block_0": [0.0, 1.0]}, "mid": 0.5}, base=2.0)))
    for name, value in scales.items():
        if name.startswith("up_blocks.0.attentions.1"):
            assert value == 2.0
        elif name.startswith("mid_block"):
            assert value == 1.0
        else:
            assert value == 0.0
    with pytest.raises(ConfigError, match=r"no block\(s\) with attention layers named \['block_9'\]"):
        layer_scales(unet, names, {"up": {"block_9": 1.0}})
    with pytest.raises(ConfigError, match="unknown block group"):
        layer_scales(unet, names, {"left": 1.0})


def test_per_block_scale_changes_only_the_chosen_blocks() -> None:
    pipe = tiny_sd15_pipeline()
    plain = _generate(pipe)
    rp = refcond.from_pipe(pipe, "ip-adapter")
    refs = reference_images(2)
    everywhere = _generate(rp, references=refs, reference_scale=1.0)
    assert torch.equal(_generate(rp, references=refs, reference_scale={"down": 1.0, "mid": 1.0, "up": 1.0}), everywhere)
    style_only = _generate(rp, references=refs, reference_scale={"up": {"block_0": [0.0, 1.0]}})
    assert not torch.equal(style_only, plain) and not torch.equal(style_only, everywhere)


# -- checkpoints -------------------------------------------------------------------------------


def test_a_plus_file_configures_encoder_and_resampler(tmp_path: Path) -> None:
    pipe = tiny_sd15_pipeline()
    rp = refcond.from_pipe(pipe, "ip-adapter", checkpoint=_checkpoint(tmp_path, pipe, "plus"))
    assert rp.composition.encoder.config["output"] == "hidden_states"
    config = rp.composition.injectors[0].config
    assert config["projector"] == "resampler" and config["num_tokens"] == 16 and config["resampler_depth"] == 4
    assert isinstance(rp.injectors[0].projector, ResamplerProjector)
    tokens, mask = rp.injectors[0].project(rp.encode([reference_images(3)])[0])
    assert tokens.shape == (1, 16, 32) and bool(mask.all())  # mean: one set of CLIP tokens -> 16 tokens


def test_a_base_file_configures_pooled_embeddings(tmp_path: Path) -> None:
    pipe = tiny_sdxl_pipeline()
    rp = refcond.from_pipe(pipe, "ip-adapter", checkpoint=_checkpoint(tmp_path, pipe, "base"))
    assert rp.composition.encoder.config["output"] == "image_embeds"
    assert rp.composition.injectors[0].config["projector"] == "linear"
    tokens, _ = rp.injectors[0].project(rp.encode([reference_images(3)])[0])
    assert tokens.shape == (1, 4, 64)


@pytest.mark.parametrize("variant", ["base", "plus", "full"])
def test_projector_matches_diffusers_image_projection(tmp_path: Path, variant: str) -> None:
    ours, theirs = tiny_sd15_pipeline(), tiny_sd15_pipeline()
    path = _checkpoint(tmp_path, ours, variant)
    rp = refcond.from_pipe(ours, "ip-adapter", checkpoint=path, aggregator="concat")
    theirs.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    reference = theirs.unet.encoder_hid_proj.image_projection_layers[0]
    features = torch.randn(3, 1 if variant == "base" else 17, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(features[:, 0] if variant == "base" else features)
        got = rp.injectors[0].projector(features)
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_resampler_runs_once_per_reference() -> None:
    projector = ResamplerProjector(8, 16, num_tokens=3, dim=16, depth=2, heads=2, dim_head=8, ff_mult=2).eval()
    x = torch.randn(1, 10, 8)
    source = torch.tensor([[0] * 5 + [1] * 5])
    cond = Condition(x, torch.ones(1, 10, dtype=torch.bool), source)
    tokens, mask = project_condition(projector, cond)
    expected = torch.cat([projector(x[:, :5]), projector(x[:, 5:])], dim=1)
    assert tokens.shape == (1, 6, 16) and bool(mask.all())
    assert torch.allclose(tokens, expected, atol=1e-6)
    mixed = Condition(x, torch.ones(1, 10, dtype=torch.bool), torch.full((1, 10), -1))
    assert torch.allclose(project_condition(projector, mixed)[0], projector(x), atol=1e-6)


def _sd15_file(tmp_path: Path, edit: Any) -> Path:
    pipe = tiny_sd15_pipeline()
    state = fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, variant="base")
    edit(state)
    return _write(tmp_path, state, "edited.safetensors")


def test_missing_key_is_named(tmp_path: Path) -> None:
    path = _sd15_file(tmp_path, lambda sd: sd.pop("ip_adapter.1.to_v_ip.weight"))
    with pytest.raises(CheckpointError, match=r"missing key ip_adapter\.1\.to_v_ip\.weight \(expected shape \(32, 32\)\)"):
        refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", checkpoint=path)


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    path = _sd15_file(tmp_path, lambda sd: sd.update({"ip_adapter.99.to_k_ip.weight": torch.zeros(32, 32)}))
    with pytest.raises(CheckpointError, match=r"unexpected key ip_adapter\.99\.to_k_ip\.weight"):
        refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", checkpoint=path)


def test_wrong_shape_names_key_and_both_shapes(tmp_path: Path) -> None:
    path = _sd15_file(tmp_path, lambda sd: sd.update({"ip_adapter.1.to_k_ip.weight": torch.zeros(33, 32)}))
    with pytest.raises(CheckpointError, match=r"ip_adapter\.1\.to_k_ip\.weight: expected shape \(32, 32\), got \(33, 32\)") as info:
        refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", checkpoint=path)
    assert str(path) in str(info.value)


def test_wrong_projector_shape_is_named_in_the_files_terms(tmp_path: Path) -> None:
    pipe = tiny_sd15_pipeline()
    state = fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, variant="plus")
    state["image_proj.layers.1.0.to_kv.weight"] = state["image_proj.layers.1.0.to_kv.weight"][:, :16].contiguous()
    with pytest.raises(CheckpointError, match=r"image_proj\.layers\.1\.0\.to_kv\.weight.*expected shape \(64, 32\), got \(64, 16\)"):
        refcond.from_pipe(pipe, "ip-adapter", checkpoint=_write(tmp_path, state))


def test_a_file_for_another_image_encoder_says_so(tmp_path: Path) -> None:
    path = _sd15_file(tmp_path, lambda sd: sd.update({"image_proj.proj.weight": torch.zeros(128, 1024)}))
    with pytest.raises(IncompatibleBackboneError, match=r"1024-d reference features.*yields 32-d"):
        refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", checkpoint=path)


def test_sdxl_file_on_sd15_pipeline_and_back(tmp_path: Path) -> None:
    sd15, sdxl = tiny_sd15_pipeline(), tiny_sdxl_pipeline()
    xl_file = _write(tmp_path, fabricate_ip_adapter_state_dict(sdxl.unet, sdxl.image_encoder), "xl.safetensors")
    sd_file = _write(tmp_path, fabricate_ip_adapter_state_dict(sd15.unet, sd15.image_encoder), "sd.safetensors")
    with pytest.raises(
        IncompatibleBackboneError, match=r"cross-attention dim 64, 11 cross-attention layers\), but the pipeline is sd15"
    ) as info:
        refcond.from_pipe(sd15, "ip-adapter", checkpoint=xl_file)
    assert "cross-attention dim 32, 7 cross-attention layers" in str(info.value)
    with pytest.raises(IncompatibleBackboneError, match=r"cross-attention dim 32, 7 cross-attention layers\), but the pipeline is sdxl"):
        refcond.from_pipe(sdxl, "ip-adapter", checkpoint=sd_file)


def test_faceid_files_are_refused_clearly(tmp_path: Path) -> None:
    path = _sd15_file(tmp_path, lambda sd: sd.update({"ip_adapter.1.to_q_lora.down.weight": torch.zeros(4, 32)}))
    with pytest.raises(CheckpointError, match="FaceID"):
        refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", checkpoint=path)


def test_pickle_files_need_an_explicit_opt_in(tmp_path: Path) -> None:
    pipe = tiny_sd15_pipeline()
    state = fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, variant="plus", seed=1)
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():  # the original .bin layout: two nested dicts
        group, _, rest = key.partition(".")
        nested[group][rest] = value
    path = tmp_path / "ip-adapter-plus_sd15.bin"
    torch.save(nested, path)

    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        refcond.from_pipe(pipe, "ip-adapter", checkpoint=path)
    from_bin = refcond.from_pipe(pipe, "ip-adapter", checkpoint=path, allow_pickle=True)
    latents = _generate(from_bin, references=reference_images(2))
    from_bin.detach()
    from_safetensors = refcond.from_pipe(pipe, "ip-adapter", checkpoint=_write(tmp_path, state))
    assert torch.equal(_generate(from_safetensors, references=reference_images(2)), latents)


# -- sizes are bounded before anything is allocated --------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num_tokens": 10**11}, r"num_tokens: Input should be less than or equal to 4096"),
        ({"projector": "mlp", "mlp_hidden_dim": 2**31}, r"mlp_hidden_dim: Input should be less than or equal to 65536"),
        ({"projector": "resampler", "resampler_depth": 2**63 - 1}, r"resampler_depth: Input should be less than or equal to 64"),
        ({"projector": "resampler", "resampler_dim": 65536, "resampler_depth": 64}, r"the resampler projector would have about 3\.3e\+03 billion parameters"),
        ({"projector": "linear", "num_tokens": 4096}, r"the linear projector would have about 17\.2 billion parameters \(sizes left None counted at 2048\)"),
        ({"scale": float("inf")}, r"scale is inf; configurations take finite numbers only"),
        ({"scale": 1e6}, r"scale: Input should be less than or equal to 100"),
    ],
    ids=["tokens", "mlp-hidden", "depth", "resampler-product", "linear-product", "inf-scale", "huge-scale"],
)
def test_sizes_beyond_the_bounds_are_refused_before_anything_is_allocated(config: dict[str, Any], message: str) -> None:
    pipe = tiny_sd15_pipeline()
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(ConfigError, match=message):
        refcond.from_pipe(pipe, "ip-adapter", seed=0, injectors={0: {"config": config}})
    assert dict(pipe.unet.attn_processors) == processors


@pytest.mark.parametrize(
    "config",
    [
        {"projector": "linear", "num_tokens": 7},
        {"projector": "mlp", "mlp_hidden_dim": 40},
        {"projector": "mlp"},
        {"projector": "resampler", "num_tokens": 3, "resampler_depth": 2, "resampler_dim": 24, "resampler_heads": 3, "resampler_dim_head": 5},
        {"projector": "resampler", "resampler_ff_mult": 2},
    ],
    ids=["linear", "mlp", "mlp-default", "resampler", "resampler-default"],
)
def test_the_parameter_count_checked_before_building_is_the_built_projectors(config: dict[str, Any]) -> None:
    from refcond_injectors.cross_attention.config import CrossAttentionConfig

    pipe = tiny_sd15_pipeline()
    encoder = "hidden_states" if config["projector"] == "resampler" else "image_embeds"
    rp = refcond.from_pipe(pipe, "ip-adapter", seed=0, encoder={"config": {"output": encoder}}, injectors={0: {"config": config}})
    try:
        projector = rp.injectors[0].projector
        built = sum(p.numel() for p in projector.parameters())
        counted = CrossAttentionConfig(**config).projector_parameters(rp.injectors[0].input_dim, pipe.unet.config.cross_attention_dim)
        assert counted == built
    finally:
        rp.detach()


def test_the_published_adapters_fit_the_bounds_with_room_to_spare() -> None:
    from refcond_injectors.cross_attention.config import MAX_PROJECTOR_PARAMETERS, CrossAttentionConfig

    published = {  # (config, input dim, output dim): IP-Adapter SD1.5 / SDXL, Plus SDXL, Full-face, EasyRef's MLP
        "ip-adapter_sd15": ({"num_tokens": 4, "input_dim": 1024}, 1024, 768),
        "ip-adapter_sdxl": ({"num_tokens": 4, "input_dim": 1280}, 1280, 2048),
        "ip-adapter-plus_sdxl_vit-h": (
            {"projector": "resampler", "num_tokens": 16, "input_dim": 1280, "resampler_dim": 1280, "resampler_heads": 20}, 1280, 2048
        ),
        "ip-adapter-full-face_sd15": ({"projector": "mlp", "input_dim": 1280, "mlp_hidden_dim": 1280}, 1280, 768),
        "easyref": ({"projector": "mlp", "input_dim": 1536, "mlp_hidden_dim": 2048}, 1536, 2048),
    }
    for name, (config, input_dim, output_dim) in published.items():
        count = CrossAttentionConfig(**config).projector_parameters(input_dim, output_dim)
        assert count * 5 < MAX_PROJECTOR_PARAMETERS, name
    assert CrossAttentionConfig(projector="resampler").projector_parameters() < MAX_PROJECTOR_PARAMETERS  # a fresh SDXL-sized resampler


def test_the_projector_size_is_checked_with_the_real_feature_sizes_before_it_is_built(monkeypatch) -> None:
    """The config counts sizes it does not know yet at 2048; the factory counts again with the encoder's and UNet's."""
    from refcond_injectors.cross_attention import injector as injector_module

    pipe = tiny_sd15_pipeline()
    config = {"projector": "mlp", "mlp_hidden_dim": 4096}
    built = refcond.from_pipe(pipe, "ip-adapter", injectors={"cross-attention": {"config": config}})
    built.detach()
    limit = config["mlp_hidden_dim"] * 20  # the tiny encoder's features and UNet are narrow: lower the limit to reach it
    monkeypatch.setattr(injector_module, "MAX_PROJECTOR_PARAMETERS", limit)
    with pytest.raises(ConfigError, match=r"the mlp projector would have .* billion parameters, more than the .* allowed"):
        refcond.from_pipe(pipe, "ip-adapter", injectors={"cross-attention": {"config": config}})
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())
