"""The ``lora-tuning`` composition: a LoRA tuned on the call's reference group, then generation with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from refcond_injectors.lora import TunedLoraAttachment

import refcond
from refcond.testing import reference_images


def _tuning(tmp_path: Path, **options) -> dict:
    """A fast tuning config: a few steps at a high learning rate, cached under tmp_path."""
    return {"injectors": {"lora": {"config": {"tuning": {"steps": 3, "learning_rate": 1e-2, "output_dir": str(tmp_path), **options}}}}}


def _latents(rp, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return rp("a photo of sks", num_inference_steps=2, generator=generator, output_type="latent", **kwargs).images


def test_tunes_on_the_references_then_generates_with_the_tuned_lora(sd15_pipe, tmp_path):
    plain = _latents(sd15_pipe)
    before = {k: v.clone() for k, v in sd15_pipe.unet.state_dict().items()}
    rp = refcond.from_pipe(sd15_pipe, "lora-tuning", **_tuning(tmp_path))
    attachment = rp._attachments[0]
    assert isinstance(attachment, TunedLoraAttachment) and isinstance(attachment, refcond.ReferenceAdapter)
    assert rp.encoder is None  # the baseline encodes nothing: the references are its training data

    refs = reference_images(3)
    tuned = _latents(rp, references=refs)
    assert not torch.allclose(tuned, plain, atol=1e-4)  # the tuned LoRA changes the output
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 1

    # A second prompt over the same references reuses the tuned LoRA: no new file, the same output.
    assert torch.equal(_latents(rp, references=refs), tuned)
    assert torch.equal(_latents(rp), tuned)  # no references: the last group's LoRA
    assert sorted(tmp_path.glob("*.safetensors")) == files

    # Another group gets its own LoRA, which replaces the first.
    other = _latents(rp, references=reference_images(2, seed=5))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and not torch.allclose(other, tuned, atol=1e-4)
    assert attachment.adapter_names == [attachment._tuned[1]]

    rp.detach()
    assert torch.equal(_latents(sd15_pipe), plain)
    after = sd15_pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_the_first_call_needs_the_references_to_tune_on(sd15_pipe, tmp_path):
    rp = refcond.from_pipe(sd15_pipe, "lora-tuning", **_tuning(tmp_path))
    with pytest.raises(refcond.ReferenceImageError, match="has not tuned yet: pass the group to tune on"):
        _latents(rp)
    rp.detach()


def test_captions_reach_the_tuning_and_bad_tuning_options_are_config_errors(sd15_pipe, tmp_path):
    rp = refcond.from_pipe(sd15_pipe, "lora-tuning", **_tuning(tmp_path))
    with pytest.raises(refcond.ReferenceImageError, match="caption"):
        _latents(rp, references=reference_images(2), reference_captions=["only one caption"])
    rp.detach()
    with pytest.raises(refcond.ConfigError, match="rank"):
        refcond.from_pipe(sd15_pipe, "lora-tuning", **_tuning(tmp_path, rank=0))
