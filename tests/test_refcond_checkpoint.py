"""refcond's own checkpoints: ``RefcondPipeline.save`` then ``refcond.load`` rebuilds the same composition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from refcond_injectors.testing import fabricate_ip_adapter_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

import refcond
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline

PROMPT = "a red cat"


def _generate(rp: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return rp(
        PROMPT, references=reference_images(3), num_inference_steps=2, guidance_scale=5.0, generator=generator, output_type="latent"
    ).images


@pytest.mark.parametrize("builder", [tiny_sd15_pipeline, tiny_sdxl_pipeline], ids=["sd15", "sdxl"])
def test_save_then_load_on_a_fresh_pipeline_reproduces_outputs(tmp_path: Path, builder: Any) -> None:
    pipe = builder()
    plus = tmp_path / "ip-adapter-plus.safetensors"
    save_file(fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, variant="plus", seed=4), str(plus))
    rp = refcond.from_pipe(pipe, "ip-adapter", checkpoint=plus, aggregator="concat")
    expected = _generate(rp)

    saved = rp.save(tmp_path / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ip-adapter-plus.safetensors", "x.safetensors"]  # no temp files left
    with safe_open(str(saved), framework="pt") as handle:
        assert all(key.startswith("injector.0.") for key in handle.keys())  # noqa: SIM118 - a safetensors handle, not a dict; CLIP belongs to the pipeline, not the file

    loaded = refcond.load(saved, pipe=builder())
    assert loaded.composition.model_dump(exclude={"backbone"}) == rp.composition.model_dump(exclude={"backbone"})
    assert loaded.composition.injectors[0].config["projector"] == "resampler"
    assert torch.equal(_generate(loaded), expected)


def test_load_without_a_pipeline_rebuilds_the_backbone_from_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-sd15"
    tiny_sd15_pipeline().save_pretrained(folder)
    rp = refcond.from_pipe(StableDiffusionPipeline.from_pretrained(folder), "ip-adapter")  # randomly initialised projector
    expected = _generate(rp)
    saved = rp.save(tmp_path / "x.safetensors")

    loaded = refcond.load(saved)
    assert loaded.backbone.model_id == str(folder)
    assert loaded.pipeline is not rp.pipeline
    assert torch.equal(_generate(loaded), expected)


def test_a_failed_save_leaves_the_previous_file_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter")
    path = rp.save(tmp_path / "x.safetensors")
    before = path.read_bytes()

    def broken_save(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("refcond.checkpoints.io.save_file", broken_save)
    with torch.no_grad():
        rp.injectors[0].projector.proj.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        rp.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_weights_for_a_role_without_weights_are_named_plainly(tmp_path: Path) -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    with pytest.warns(UserWarning, match="built in memory"):
        path = rp.save(tmp_path / "ip.safetensors")
    rp.detach()
    state, metadata = refcond.read_checkpoint(path)
    refcond.write_safetensors(path, {**state, "aggregator.norm_in.bias": torch.zeros(2)}, metadata)  # 'mean' has no weights
    with pytest.raises(refcond.CheckpointError, match=r"aggregator has no weights, but the checkpoint has 1 keys for it, e\.g\. 'aggregator\.norm_in\.bias'\."):
        refcond.load(path, tiny_sd15_pipeline())


def test_a_stored_setting_out_of_bounds_names_the_file(tmp_path: Path) -> None:
    import json

    from refcond.checkpoints import native

    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    with pytest.warns(UserWarning, match="built in memory"):
        path = rp.save(tmp_path / "ip.safetensors")
    rp.detach()
    state, metadata = refcond.read_checkpoint(path)
    composition = json.loads(metadata[native.COMPOSITION_KEY])
    composition["injectors"][0]["config"]["num_tokens"] = 10**6
    refcond.write_safetensors(path, state, {**metadata, native.COMPOSITION_KEY: json.dumps(composition)})
    with pytest.raises(refcond.ConfigError, match=r"(?s)ip\.safetensors \(refcond checkpoint\): invalid configuration for injectors\[0\] 'cross-attention'.*num_tokens"):
        refcond.load(path, tiny_sd15_pipeline())
