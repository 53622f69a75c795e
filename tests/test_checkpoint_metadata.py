"""A refcond checkpoint knows what it is: resolved configs, who registered each component, library
versions, the backbone's model, and the pretrained weights it borrows by source and content hash
instead of storing them — unless they were trained."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from refcond_easyref.testing import tiny_easyref_overrides
from refcond_injectors.testing import fabricate_ip_adapter_state_dict
from safetensors.torch import save_file

import refcond
from refcond.checkpoints import native
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline
from refcond.weights import describe_source
from refcond_encoders import MllmEncoderConfig


def latents(rp: refcond.RefcondPipeline) -> torch.Tensor:
    return rp("a cat", reference_images(2), num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images


def easyref(folder: Path, pipe=None) -> refcond.RefcondPipeline:
    return refcond.from_pipe(pipe or tiny_sdxl_pipeline(), "easyref", seed=0, **tiny_easyref_overrides(folder))


def test_an_untrained_mllm_is_named_not_stored(tiny_qwen2vl_dir: Path, tmp_path: Path) -> None:
    rp = easyref(tiny_qwen2vl_dir)
    with pytest.warns(UserWarning, match=r"built in memory.*refcond\.load\(path, pipe\)"):
        path = rp.save(tmp_path / "easyref.safetensors")
    keys = refcond.read_checkpoint(path)[0]
    assert not any(k.startswith("encoder.") for k in keys)
    assert any(k.startswith("aggregator.") for k in keys) and any(k.startswith("injector.1.unet.") for k in keys)

    info = refcond.describe_checkpoint(path)
    (borrowed,) = info["provenance"]["borrowed"]["encoder"]
    assert borrowed == {
        "prefix": "",
        "source": str(tiny_qwen2vl_dir),
        "revision": None,
        "stored": False,
        "sha256": refcond.content_hash(rp.encoder),
        "dtype": "float32",
    }
    expected = latents(rp)
    rp.detach()

    pipe = tiny_sdxl_pipeline()
    loaded = refcond.load(path, pipe)  # the MLLM comes from its source again
    assert torch.allclose(latents(loaded), expected, atol=1e-5)


def test_a_fine_tuned_mllm_is_stored_and_stays_stored(tiny_qwen2vl_dir: Path, tmp_path: Path) -> None:
    rp = easyref(tiny_qwen2vl_dir)
    rp.encoder.requires_grad_(True)  # a stage that trains the MLLM
    with torch.no_grad():
        rp.encoder.norm.weight.add_(0.5)
    with pytest.warns(UserWarning, match="built in memory"):
        path = rp.save(tmp_path / "tuned.safetensors")
    assert "encoder.norm.weight" in refcond.read_checkpoint(path)[0]
    (borrowed,) = refcond.describe_checkpoint(path)["provenance"]["borrowed"]["encoder"]
    assert borrowed["stored"] is True and "sha256" not in borrowed
    expected = latents(rp)
    rp.detach()

    loaded = refcond.load(path, tiny_sdxl_pipeline())
    assert not any(p.requires_grad for p in loaded.encoder.parameters())  # frozen again when built...
    assert "encoder.norm.weight" in loaded.state_dict()  # ...but it is a fine-tuned copy now: still saved
    assert torch.allclose(latents(loaded), expected, atol=1e-5)


def test_the_checkpoint_records_resolved_configs_provenance_and_versions(tiny_qwen2vl_dir: Path, tmp_path: Path) -> None:
    rp = easyref(tiny_qwen2vl_dir)
    with pytest.warns(UserWarning):
        info = refcond.describe_checkpoint(rp.save(tmp_path / "e.safetensors"))
    composition = info["composition"]
    assert info["format_version"] == native.FORMAT_VERSION
    # every field of every config, defaults included
    assert set(composition["encoder"]["config"]) == set(MllmEncoderConfig.model_fields)
    assert composition["encoder"]["config"]["instruction"] == MllmEncoderConfig().instruction
    assert composition["injectors"][1]["config"]["layers"]["targets"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert composition["backbone"] == {"name": "sdxl", "config": {"model": None, "dtype": None, "variant": None, "device": None}}

    provenance = info["provenance"]
    assert provenance["components"]["encoder"] == {
        "name": "mllm",
        "plugin": "refcond-encoders",
        "distribution": "refcond-encoders",
        "version": importlib.metadata.version("refcond-encoders"),
    }
    assert provenance["components"]["aggregator"]["distribution"] == "refcond-easyref"
    assert provenance["components"]["backbone"]["distribution"] == "refcond"
    assert provenance["libraries"]["torch"] == importlib.metadata.version("torch")
    assert provenance["libraries"]["diffusers"] == importlib.metadata.version("diffusers")
    assert provenance["libraries"]["transformers"] == importlib.metadata.version("transformers")
    assert provenance["backbone"] == {"name": "sdxl", "model": None, "revision": None, "built_in_memory": True}
    rp.detach()


def test_a_clip_encoder_borrowed_from_the_pipeline_is_named_by_content_hash(tmp_path: Path) -> None:
    pipe = tiny_sd15_pipeline()
    rp = refcond.from_pipe(pipe, "ip-adapter", seed=0)
    with pytest.warns(UserWarning):
        info = refcond.describe_checkpoint(rp.save(tmp_path / "ip.safetensors"))
    (borrowed,) = info["provenance"]["borrowed"]["encoder"]
    assert borrowed["prefix"] is None and borrowed["stored"] is False
    assert borrowed["sha256"] == refcond.content_hash(pipe.image_encoder)


def test_a_checkpoint_without_a_model_needs_the_pipeline(tmp_path: Path) -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    with pytest.warns(UserWarning):
        path = rp.save(tmp_path / "ip.safetensors")
    with pytest.raises(refcond.ConfigError, match=r"refcond\.load\(path, pipe\)"):
        refcond.load(path)


def test_a_hub_cache_folder_is_recorded_as_its_hub_id_and_revision() -> None:
    cache = "/home/me/.cache/huggingface/hub/models--Qwen--Qwen2-VL-2B-Instruct/snapshots/895c3a49bc3fa70a340399125c650a463535e71c"
    assert describe_source(cache) == {"source": "Qwen/Qwen2-VL-2B-Instruct", "revision": "895c3a49bc3fa70a340399125c650a463535e71c"}
    assert describe_source("Qwen/Qwen2-VL-2B-Instruct") == {"source": "Qwen/Qwen2-VL-2B-Instruct", "revision": None}
    assert describe_source("") == {"source": None, "revision": None}


def test_a_version_1_checkpoint_still_loads(tmp_path: Path) -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    state, composition = rp.state_dict(), rp.composition.model_dump(mode="json")
    rp.detach()
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={native.COMPOSITION_KEY: json.dumps(composition), native.VERSION_KEY: "1"})
    loaded = refcond.load(path, tiny_sd15_pipeline())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    assert refcond.describe_checkpoint(path)["provenance"] is None


def test_load_builds_the_recipe_a_foreign_file_names(tmp_path: Path) -> None:
    pipe = tiny_sd15_pipeline()
    path = tmp_path / "ip-adapter_sd15.safetensors"
    save_file(fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, variant="plus"), str(path))
    rp = refcond.load(path, pipe)
    assert rp.composition.name == "ip-adapter"
    assert rp.composition.injectors[0].config["projector"] == "resampler"  # what the file implies
    rp.detach()
    with pytest.raises(refcond.ConfigError, match=r"not a refcond checkpoint.*refcond\.load\(path, pipe\)"):
        refcond.load(path)
