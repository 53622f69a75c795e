"""The conditioning path trains with public names only.

With a component in training mode, ``rp.encode`` keeps the autograd graph and ``rp.bind`` feeds
the condition to one UNet forward pass; a loss on the UNet's output then reaches every trainable
parameter of the composition (``rp.named_parameters()`` with ``requires_grad``) and no frozen one:
not the backbone's, not the encoder's borrowed pretrained weights. In eval mode, encoding runs
under ``torch.inference_mode`` and is cached; the cache notices weight changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from refcond_easyref.testing import fabricate_official_checkpoint, tiny_easyref_overrides

import refcond
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder")


def frozen(pipe: Any) -> Any:
    """The pipeline with every model frozen, as a training script freezes the backbone."""
    for name in PIPELINE_PARTS:
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
    return pipe


def unet_inputs(unet: Any, batch: int, seed: int = 0) -> dict[str, Any]:
    """One denoising step's inputs (random text tokens; SDXL's added conditions when the UNet takes them)."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    cross = config.cross_attention_dim
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 6, cross if isinstance(cross, int) else cross[0], generator=generator),
    }
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        size = config.sample_size * 8
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=generator),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32),
        }
    return inputs


def ip_adapter(build: Any, folder: Path) -> refcond.RefcondPipeline:
    return refcond.from_pipe(frozen(build()), "ip-adapter", seed=0)


def easyref(build: Any, folder: Path) -> refcond.RefcondPipeline:
    pipe = frozen(build())
    path = folder / "easyref.safetensors"  # non-zero LoRA up-weights: every LoRA parameter then gets a gradient
    refcond.write_safetensors(path, fabricate_official_checkpoint(pipe.unet, seed=3))
    return refcond.from_pipe(pipe, "easyref", checkpoint=path, **tiny_easyref_overrides(folder))


COMPOSITIONS = {
    "ip-adapter-sd15": (ip_adapter, tiny_sd15_pipeline, {"injector.0"}),
    "ip-adapter-sdxl": (ip_adapter, tiny_sdxl_pipeline, {"injector.0"}),
    "easyref-sdxl": (easyref, tiny_sdxl_pipeline, {"aggregator", "injector.0", "injector.1"}),
    "easyref-sd15": (easyref, tiny_sd15_pipeline, {"aggregator", "injector.0", "injector.1"}),
}


def loss(rp: refcond.RefcondPipeline, groups: list[Any], prompts: list[str]) -> torch.Tensor:
    condition, _ = rp.encode(groups, prompts=prompts)
    unet = rp.pipeline.unet
    with rp.bind(condition):
        prediction = unet(**unet_inputs(unet, len(groups))).sample
    return prediction.square().mean()


@pytest.mark.parametrize("name", COMPOSITIONS)
def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(name: str, tiny_qwen2vl_dir: Path, tmp_path: Path) -> None:
    make, build, trained_roles = COMPOSITIONS[name]
    rp = make(build, tiny_qwen2vl_dir if name.startswith("easyref") else tmp_path)
    rp.train()
    loss(rp, [reference_images(2), reference_images(1, seed=4)], ["a cat", "a dog"]).backward()

    trainable = {n: p for n, p in rp.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] if not n.startswith("injector.") else ".".join(n.split(".")[:2]) for n in trainable} == trained_roles
    missed = [n for n, p in trainable.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missed, f"no gradient reached {missed[:5]}"

    ours = {id(p) for p in trainable.values()}
    everything = [(f"{role}.{n}", p) for role in PIPELINE_PARTS if getattr(rp.pipeline, role, None) is not None for n, p in getattr(rp.pipeline, role).named_parameters()]
    everything += list(rp.named_parameters())
    leaked = [n for n, p in everything if id(p) not in ours and p.grad is not None]
    assert not leaked, f"frozen parameters got a gradient: {leaked[:5]}"
    rp.detach()


def test_the_borrowed_mllm_is_frozen_when_built_and_trains_once_unfrozen(tiny_qwen2vl_dir: Path) -> None:
    rp = refcond.from_pipe(frozen(tiny_sdxl_pipeline()), "easyref", seed=0, **tiny_easyref_overrides(tiny_qwen2vl_dir))
    assert not any(p.requires_grad for p in rp.encoder.parameters())  # pretrained: frozen when built
    rp.encoder.requires_grad_(True)  # a stage that fine-tunes the MLLM unfreezes it
    rp.train()
    loss(rp, [reference_images(2)], ["a cat"]).backward()
    assert all(p.grad is not None for p in rp.encoder.parameters() if p.requires_grad)
    rp.detach()


def test_eval_mode_encodes_without_autograd_and_caches(tiny_qwen2vl_dir: Path) -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    first, _ = rp.encode([reference_images(2)])
    second, _ = rp.encode([reference_images(2)])
    assert first is second and first.tokens.is_inference()
    rp.train()
    assert rp.training and rp.injectors[0].training
    a, _ = rp.encode([reference_images(2)])
    b, _ = rp.encode([reference_images(2)])
    assert a is not b and not a.tokens.is_inference()
    rp.eval()
    assert not rp.training


def test_bind_conditions_the_unet_inside_the_block_only() -> None:
    pipe = tiny_sd15_pipeline()
    rp = refcond.from_pipe(pipe, "ip-adapter", seed=0)
    inputs = unet_inputs(pipe.unet, 1)
    condition, _ = rp.encode([reference_images(2)])
    with torch.no_grad():
        plain = pipe.unet(**inputs).sample
        with rp.bind(condition):
            bound = pipe.unet(**inputs).sample
        after = pipe.unet(**inputs).sample
    assert not torch.allclose(bound, plain, atol=1e-4)
    assert torch.equal(after, plain)
    with pytest.raises(refcond.ConfigError, match="must be a finite number, got nan"):
        with rp.bind(condition, reference_scale=float("nan")):
            pass
    rp.detach()


def test_the_cache_notices_weight_changes(tiny_qwen2vl_dir: Path) -> None:
    """A cached condition is stale once the weights it came from change: in place, by load_state_dict, or borrowed ones."""
    pipe = tiny_sd15_pipeline()
    rp = refcond.from_pipe(pipe, "ip-adapter", seed=0)
    refs = [reference_images(2)]
    before, _ = rp.encode(refs)
    with torch.no_grad():  # the CLIP model the encoder borrows from the pipeline, edited in place
        pipe.image_encoder.visual_projection.weight.mul_(2.0)
    after, _ = rp.encode(refs)
    assert after is not before
    assert torch.allclose(after.tokens, 2.0 * before.tokens, atol=1e-5)
    rp.detach()

    rp = refcond.from_pipe(tiny_sdxl_pipeline(), "easyref", seed=0, **tiny_easyref_overrides(tiny_qwen2vl_dir))
    before, _ = rp.encode(refs, prompts=["a cat"])
    other = {k: v + 0.01 for k, v in rp.aggregator.state_dict().items()}
    rp.aggregator.load_state_dict(other)
    after, _ = rp.encode(refs, prompts=["a cat"])
    assert not torch.allclose(after.tokens, before.tokens)
    rp.clear_cache()
    again, _ = rp.encode(refs, prompts=["a cat"])
    assert torch.equal(again.tokens, after.tokens)  # what the cache returned was the recomputation
    rp.detach()
