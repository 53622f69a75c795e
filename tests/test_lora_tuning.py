"""Tuning a LoRA on one reference group (``refcond_injectors.lora.tuning``), on the tiny offline pipelines.

The tuned file is an ordinary diffusers LoRA; the pipeline is left exactly as it was; runs are
deterministic, resumable, interruptible and cached by content.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from refcond import ConfigError, IncompatibleBackboneError, ReferenceImageError
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline
from refcond_injectors.lora import saving, tuning
from refcond_injectors.lora.tuning import TuningConfig, TuningStep, reference_loss, tune_lora

DOCS = Path(__file__).resolve().parents[1] / "docs" / "lora-tuning.md"
PIPELINES = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}


def config(tmp_path: Path, **options) -> TuningConfig:
    """A fast config: 3 steps at a high learning rate (so lora_B moves visibly), cache in tmp_path."""
    return TuningConfig(**{"steps": 3, "learning_rate": 1e-2, "output_dir": str(tmp_path / "cache"), **options})


def unet_state(unet) -> dict:
    return {
        "weights": {k: v.clone() for k, v in unet.state_dict().items()},
        "requires_grad": [(name, p.requires_grad) for name, p in unet.named_parameters()],
        "modules": [(name, type(m)) for name, m in unet.named_modules()],
        "processors": dict(unet.attn_processors),
        "peft_config": list(unet.peft_config) if hasattr(unet, "peft_config") else None,
        "training": unet.training,
    }


def assert_restored(unet, before: dict) -> None:
    after = unet_state(unet)
    assert after["modules"] == before["modules"], "tuning left PEFT wrappers or other modules behind"
    assert after["weights"].keys() == before["weights"].keys()
    assert all(torch.equal(after["weights"][k], v) for k, v in before["weights"].items())
    assert after["requires_grad"] == before["requires_grad"]
    assert all(after["processors"][k] is p for k, p in before["processors"].items())
    assert after["peft_config"] == before["peft_config"]
    assert after["training"] == before["training"]


def latents(pipe) -> torch.Tensor:
    return pipe("a photo of sks", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images


def lora_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def record(path: Path):
    return saving.read_record(path)


# -- tuning on both backbones ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tunes_a_lora_and_leaves_the_unet_exactly_as_it_was(kind, tmp_path):
    pipe = PIPELINES[kind]()
    before = unet_state(pipe.unet)

    result = tune_lora(pipe, reference_images(2), config=config(tmp_path, rank=2), progress=False)

    assert result.steps == 3 and len(result.losses) == 3 and not result.cached and not result.interrupted
    assert result.path.parent == tmp_path / "cache" and result.path.name.startswith(f"{kind}-")
    weights = lora_weights(result.path)
    assert weights and all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in weights)
    assert all(v.shape[0] == 2 for k, v in weights.items() if ".lora_A." in k)
    assert any(v.abs().max() > 0 for k, v in weights.items() if ".lora_B." in k), "lora_B never moved from its zero init"
    assert record(result.path).step == 3 and record(result.path).backbone == kind
    assert_restored(pipe.unet, before)
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    assert not hasattr(pipe.unet, "peft_config")


def test_the_loss_on_the_references_decreases(tmp_path):
    pipe, references = tiny_sd15_pipeline(), reference_images(3)
    cfg = config(tmp_path, steps=30)
    before = reference_loss(pipe, references, config=cfg)
    assert reference_loss(pipe, references, config=cfg) == before, "reference_loss must be deterministic"

    result = tune_lora(pipe, references, config=cfg, progress=False)
    pipe.load_lora_weights(result.path, adapter_name=result.adapter_name)
    after = reference_loss(pipe, references, config=cfg)

    assert after < 0.9 * before, f"tuning did not fit the references: loss {before:.4f} -> {after:.4f}"
    pipe.unload_lora_weights()
    assert reference_loss(pipe, references, config=cfg) == before


@pytest.mark.parametrize(("kind", "prediction"), [("sd15", "epsilon"), ("sd15", "v_prediction"), ("sdxl", "epsilon")])
def test_the_first_step_loss_is_diffusers_noise_prediction_loss(kind, prediction, tmp_path):
    """Step 1's loss, recomputed outside the tuner from the draws ``on_step`` reports.

    Independent computation: the reference encoded by the VAE by hand (its latents must be a
    sample of that distribution), diffusers' ``DDPMScheduler.add_noise`` from the pipeline's
    scheduler config, the UNet run directly (its LoRA starts at zero, so step 1 sees the base
    UNet), and ``F.mse_loss`` against the noise, or ``scheduler.get_velocity`` for v-prediction.
    """
    pipe = PIPELINES[kind]()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    reference = reference_images(1, size=resolution)[0]  # already at the tuning resolution: no resize, no crop
    steps: list[TuningStep] = []

    result = tune_lora(pipe, [reference], config=config(tmp_path, steps=1, seed=6), progress=False, on_step=steps.append)

    (first,) = steps
    assert first.step == 0 and first.loss == result.losses[0]
    assert first.timesteps.shape == (1,) and 0 <= int(first.timesteps[0]) < pipe.scheduler.config.num_train_timesteps

    # The clean latents: a sample of the reference's VAE latent distribution, scaled.
    pixels = torch.from_numpy(np.asarray(reference, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        distribution = pipe.vae.encode(pixels).latent_dist
    scale = pipe.vae.config.scaling_factor
    z = (first.latents - distribution.mean * scale) / (distribution.std * scale)
    assert z.shape == first.latents.shape and abs(float(z.mean())) < 0.2 and 0.8 < float(z.std()) < 1.2

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    noisy = scheduler.add_noise(first.latents, first.noise, first.timesteps)
    unet_inputs = {}
    if kind == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt="a photo of sks", device="cpu", do_classifier_free_guidance=False)
        # (original height, width, crop top, left, target height, width) of an uncropped reference
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        unet_inputs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    else:
        embeds, _ = pipe.encode_prompt("a photo of sks", "cpu", 1, False)
    with torch.no_grad():
        predicted = pipe.unet(noisy, first.timesteps, encoder_hidden_states=embeds, **unet_inputs).sample
    velocity = scheduler.get_velocity(first.latents, first.noise, first.timesteps)
    target = velocity if prediction == "v_prediction" else first.noise
    expected = float(F.mse_loss(predicted, target))

    assert first.loss == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # The check tells the right target from plausible wrong ones (seed 6 draws a mid-range timestep, where they all differ).
    other = first.noise if prediction == "v_prediction" else velocity
    for wrong in (first.latents, other, noisy):
        assert abs(float(F.mse_loss(predicted, wrong)) - expected) > 1e-3 * expected


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_the_file_is_what_diffusers_saves_and_loads_to_the_same_output(kind, tmp_path, monkeypatch):
    """Generate with the tuned adapter still in the UNet, then with a fresh pipeline that loaded the file."""
    pipe = PIPELINES[kind]()
    seen = {}
    restore = tuning._UNetSnapshot.restore

    def generate_then_restore(self, adapter_name):
        seen["latents"] = latents(pipe)  # the tuned adapter is the active one until restore
        type(pipe).save_lora_weights(
            tmp_path / "by-diffusers",
            unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name=adapter_name),
            unet_lora_adapter_metadata=pipe.unet.peft_config[adapter_name].to_dict(),
        )
        restore(self, adapter_name)

    monkeypatch.setattr(tuning._UNetSnapshot, "restore", generate_then_restore)
    result = tune_lora(pipe, reference_images(2), config=config(tmp_path, rank=4, alpha=8.0), progress=False)

    ours, theirs = result.path, tmp_path / "by-diffusers" / "pytorch_lora_weights.safetensors"
    assert lora_weights(ours).keys() == lora_weights(theirs).keys()
    assert all(torch.equal(v, lora_weights(theirs)[k]) for k, v in lora_weights(ours).items())
    with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
        mine, reference = a.metadata(), b.metadata()
    assert mine["format"] == reference["format"] == "pt"

    def adapter_config(metadata):  # diffusers writes sets in set order; refcond sorts them
        return {k: sorted(v) if isinstance(v, list) else v for k, v in json.loads(metadata[LORA_ADAPTER_METADATA_KEY]).items()}

    assert adapter_config(mine) == adapter_config(reference)
    assert adapter_config(mine)["unet.lora_alpha"] == 8.0 and adapter_config(mine)["unet.r"] == 4

    fresh = PIPELINES[kind]()
    base = latents(fresh)
    fresh.load_lora_weights(result.path)
    loaded = latents(fresh)
    assert (seen["latents"] - base).abs().max() > 1e-3, "the tuned LoRA should change the output"
    assert torch.allclose(loaded, seen["latents"], atol=1e-4, rtol=0), (loaded - seen["latents"]).abs().max()
    assert torch.equal(latents(pipe), base), "the tuned pipeline generates as before once tune_lora returned"


# -- determinism, resuming, interrupting --------------------------------------------------------


def test_two_runs_give_bit_identical_weights(tmp_path):
    references = reference_images(2)
    first = tune_lora(tiny_sd15_pipeline(), references, config=config(tmp_path, steps=4, batch_size=2), output=tmp_path / "a.safetensors", progress=False)
    second = tune_lora(tiny_sd15_pipeline(), references, config=config(tmp_path, steps=4, batch_size=2), output=tmp_path / "b.safetensors", progress=False)
    other_seed = tune_lora(tiny_sd15_pipeline(), references, config=config(tmp_path, steps=4, batch_size=2, seed=1), output=tmp_path / "c.safetensors", progress=False)

    a, b, c = (lora_weights(r.path) for r in (first, second, other_seed))
    assert first.losses == second.losses
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a), "another seed should give another LoRA"
    with safe_open(str(first.path), "pt") as fa, safe_open(str(second.path), "pt") as fb:
        assert fa.metadata() == fb.metadata()  # (not the bytes: safetensors orders the header's metadata at random)


def test_resuming_continues_the_step_count_data_and_noise(tmp_path):
    pipe, references = tiny_sd15_pipeline(), reference_images(3)
    through = tune_lora(pipe, references, config=config(tmp_path, steps=4), output=tmp_path / "through.safetensors", progress=False)
    half = tune_lora(pipe, references, config=config(tmp_path, steps=2), output=tmp_path / "half.safetensors", progress=False)

    resumed = tune_lora(
        pipe, references, config=config(tmp_path, steps=4), output=tmp_path / "resumed.safetensors", resume_from=half.path, progress=False
    )

    assert resumed.steps == 4 and record(resumed.path).step == 4
    assert resumed.losses[:2] == half.losses
    # Step 3's loss depends only on the weights after step 2 and on step 3's data, noise and
    # timesteps, so it matches the uninterrupted run exactly; later steps differ only through the
    # optimizer state, which restarts on resume.
    assert resumed.losses[2] == through.losses[2]


def test_saves_every_save_every_steps_and_at_the_end(tmp_path, monkeypatch):
    saved = []
    save = tuning.save_tuned_lora

    def recording_save(path, unet, adapter_name, run_record):
        saved.append(run_record.step)
        return save(path, unet, adapter_name, run_record)

    monkeypatch.setattr(tuning, "save_tuned_lora", recording_save)
    result = tune_lora(tiny_sd15_pipeline(), reference_images(1), config=config(tmp_path, steps=5, save_every=2), progress=False)
    assert saved == [2, 4, 5] and record(result.path).step == 5

    with pytest.raises(ConfigError, match="already holds 5 steps, more than config.steps=4"):
        tune_lora(tiny_sd15_pipeline(), reference_images(1), config=config(tmp_path, steps=4), resume_from=result.path, progress=False)


def test_ctrl_c_saves_the_lora_restores_the_pipeline_and_reraises(tmp_path, monkeypatch):
    pipe, references = tiny_sd15_pipeline(), reference_images(2)
    before = unet_state(pipe.unet)
    step = tuning._Trainer.step
    calls = []

    def interrupt_at_third_step(self, index):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, index)

    monkeypatch.setattr(tuning._Trainer, "step", interrupt_at_third_step)
    output = tmp_path / "dog.safetensors"
    with pytest.raises(KeyboardInterrupt, match=r"interrupted at step 2/5.*saved in .*dog\.safetensors.*resume_from") as raised:
        tune_lora(pipe, references, config=config(tmp_path, steps=5), output=output, progress=False)

    assert_restored(pipe.unet, before)
    assert record(output).step == 2 and not record(output).complete
    partial = raised.value.result
    assert partial.interrupted and partial.steps == 2 and partial.path == output and len(partial.losses) == 2

    monkeypatch.setattr(tuning._Trainer, "step", step)
    finished = tune_lora(pipe, references, config=config(tmp_path, steps=5), output=output, resume_from=output, progress=False)
    assert finished.steps == 5 and finished.losses[:2] == partial.losses and record(output).complete


def test_an_interrupted_file_is_not_mistaken_for_a_cached_one(tmp_path, monkeypatch):
    pipe, references = tiny_sd15_pipeline(), reference_images(2)
    step = tuning._Trainer.step
    monkeypatch.setattr(tuning._Trainer, "step", lambda self, i: step(self, i) if i < 1 else (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt) as raised:
        tune_lora(pipe, references, config=config(tmp_path), progress=False)
    monkeypatch.setattr(tuning._Trainer, "step", step)

    result = tune_lora(pipe, references, config=config(tmp_path), progress=False)
    assert result.path == raised.value.result.path and not result.cached and result.steps == 3


# -- caching --------------------------------------------------------------------------------------


def test_a_second_call_over_the_same_references_costs_nothing(tmp_path, monkeypatch):
    pipe = tiny_sd15_pipeline()
    first = tune_lora(pipe, reference_images(3), config=config(tmp_path), progress=False)

    monkeypatch.setattr(tuning._Trainer, "step", lambda *a: pytest.fail("a cached tuning must not train"))
    start = time.perf_counter()
    again = tune_lora(pipe, reference_images(3), config=config(tmp_path), progress=False)  # new images, same content
    assert again.cached and again.path == first.path and again.losses == first.losses and again.steps == 3
    assert again.adapter_name == first.adapter_name
    assert time.perf_counter() - start < 1.0

    monkeypatch.undo()
    changed = [
        tune_lora(pipe, reference_images(3), config=config(tmp_path), captions=["a", "b", "c"], progress=False),
        tune_lora(pipe, reference_images(3, seed=1), config=config(tmp_path), progress=False),
        tune_lora(pipe, reference_images(3), config=config(tmp_path, rank=2), progress=False),
        tune_lora(tiny_sd15_pipeline(seed=1), reference_images(3), config=config(tmp_path), progress=False),
    ]
    assert not any(r.cached for r in changed)
    assert len({first.path, *(r.path for r in changed)}) == 5, "captions, images, config and base model all key the cache"


def test_the_default_cache_folder_follows_refcond_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFCOND_CACHE", str(tmp_path / "refcond-cache"))
    result = tune_lora(tiny_sd15_pipeline(), reference_images(1), config=TuningConfig(steps=1), progress=False)
    assert result.path.parent == tmp_path / "refcond-cache" / "lora-tuning"


# -- other options ----------------------------------------------------------------------------------


def test_prior_preservation_generates_class_images_once_with_the_plain_pipeline(tmp_path, monkeypatch):
    pipe = tiny_sd15_pipeline()
    scheduler = pipe.scheduler
    generate = StableDiffusionPipeline.__call__
    prompts = []

    def two_steps(self, prompt, **kwargs):  # a tiny pipeline's 50 default steps only cost time here
        prompts.append((prompt, kwargs["num_images_per_prompt"], hasattr(self.unet, "peft_config")))
        return generate(self, prompt, **{**kwargs, "num_inference_steps": 2})

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", two_steps)
    cfg = config(tmp_path, prior_preservation=True, class_prompt="a photo of a dog", num_class_images=2, batch_size=2)
    with_prior = tune_lora(pipe, reference_images(2), config=cfg, progress=False)
    without = tune_lora(pipe, reference_images(2), config=config(tmp_path, batch_size=2), progress=False)

    assert prompts == [("a photo of a dog", 2, False)], "class images: generated once, by the un-adapted pipeline"
    assert pipe.scheduler is scheduler
    assert with_prior.losses != without.losses and with_prior.path != without.path


def test_per_reference_captions_and_v_prediction(tmp_path):
    pipe = tiny_sd15_pipeline()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    result = tune_lora(pipe, reference_images(2), config=config(tmp_path), captions=["a red sks", "a blue sks"], progress=False)
    assert result.steps == 3 and all(loss > 0 for loss in result.losses)


def test_bf16_mixed_precision_leaves_accelerate_state_as_it_was(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    Accelerator(cpu=True)  # the caller's own accelerate state (mixed_precision "no")
    result = tune_lora(tiny_sd15_pipeline(), reference_images(1), config=config(tmp_path, mixed_precision="bf16", steps=1), progress=False)
    assert result.steps == 1
    assert AcceleratorState().mixed_precision == "no"
    Accelerator(cpu=True)  # accelerate would refuse this if tuning had left its bf16 state behind


def test_progress_bar_shows_the_loss(tmp_path, capsys):
    tune_lora(tiny_sd15_pipeline(), reference_images(1), config=config(tmp_path, steps=2))
    assert re.search(r"tuning LoRA.*2/2.*loss=\d", capsys.readouterr().err)


def test_a_unet_with_its_own_lora_gets_it_back_untouched(tmp_path):
    """A LoRA already in the UNet is switched off while tuning and comes back as it was (active, weights, wrappers)."""
    from peft import LoraConfig

    pipe = tiny_sd15_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_k"], init_lora_weights="gaussian"), adapter_name="user")
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if ".lora_B.user." in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    before, styled = unet_state(pipe.unet), latents(pipe)

    plain = tune_lora(tiny_sd15_pipeline(), reference_images(2), config=config(tmp_path), output=tmp_path / "plain.safetensors", progress=False)
    result = tune_lora(pipe, reference_images(2), config=config(tmp_path), output=tmp_path / "user.safetensors", progress=False)

    assert_restored(pipe.unet, before)
    assert torch.equal(latents(pipe), styled)
    assert result.losses == plain.losses, "the LoRA is tuned on the base UNet, with the user's adapter switched off"


# -- bad input ------------------------------------------------------------------------------------


def test_bad_configs_are_config_errors_naming_the_field():
    with pytest.raises(ConfigError, match=r"rank.*greater than or equal to 1"):
        TuningConfig(rank=0)
    with pytest.raises(ConfigError, match=r"resolution: must be a multiple of 8.*got 500, use 496 or 504"):
        TuningConfig(resolution=500)
    with pytest.raises(ConfigError, match=r"prior_preservation=True needs a class_prompt"):
        TuningConfig(prior_preservation=True)
    with pytest.raises(ConfigError, match=r"unknown field 'learnig_rate'.*Did you mean 'learning_rate'"):
        TuningConfig(learnig_rate=1e-3)
    with pytest.raises(ConfigError, match=r"invalid TuningConfig:\n  - steps: Input should be greater than or equal to 1"):
        tune_lora(tiny_sd15_pipeline(), reference_images(1), config={"steps": 0})
    assert TuningConfig(rank=8).lora_alpha == 8.0 and TuningConfig(rank=8, alpha=4).lora_alpha == 4.0


def test_bad_inputs_get_clear_errors(tmp_path):
    pipe, cfg = tiny_sd15_pipeline(), config(tmp_path, steps=1)
    with pytest.raises(ReferenceImageError, match="no reference images"):
        tune_lora(pipe, [], config=cfg)
    with pytest.raises(ReferenceImageError, match="got 1 captions for 2 references"):
        tune_lora(pipe, reference_images(2), config=cfg, captions=["a dog"])
    with pytest.raises(ConfigError, match=r"must be a \.safetensors file"):
        tune_lora(pipe, reference_images(1), config=cfg, output=tmp_path / "lora.bin")
    with pytest.raises(ConfigError, match="mixed_precision='fp16' needs the pipeline on a CUDA GPU"):
        tune_lora(pipe, reference_images(1), config=config(tmp_path, mixed_precision="fp16"))
    with pytest.raises(ConfigError, match="target_modules"):
        tune_lora(pipe, reference_images(1), config=config(tmp_path, target_modules=["no_such_layer"]), progress=False)
    with pytest.raises(IncompatibleBackboneError, match="StableDiffusionPipeline or StableDiffusionXLPipeline"):
        tune_lora(object(), reference_images(1), config=cfg)


def test_resuming_from_an_unfit_file_is_refused(tmp_path):
    sd15, references = tiny_sd15_pipeline(), reference_images(1)
    before = unet_state(sd15.unet)
    xl_file = tune_lora(tiny_sdxl_pipeline(), references, config=config(tmp_path, steps=1), progress=False).path
    rank_2 = tune_lora(sd15, references, config=config(tmp_path, steps=1, rank=2), progress=False).path
    diffusers_file = tmp_path / "plain" / "pytorch_lora_weights.safetensors"
    with pytest.raises(IncompatibleBackboneError, match=r"unet\.\S+ has shape \(\d+, \d+\) in the file but .* needs \(\d+, \d+\).*sdxl.*sd15"):
        tune_lora(sd15, references, config=config(tmp_path, steps=2), resume_from=xl_file, progress=False)
    with pytest.raises(ConfigError, match="rank-2 LoRA but config.rank is 4"):
        tune_lora(sd15, references, config=config(tmp_path, steps=2), resume_from=rank_2, progress=False)

    from peft import LoraConfig

    other = tiny_sd15_pipeline()
    other.unet.add_adapter(LoraConfig(r=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]), adapter_name="default")
    StableDiffusionPipeline.save_lora_weights(diffusers_file.parent, unet_lora_layers=get_peft_model_state_dict(other.unet))
    with pytest.raises(ConfigError, match="was not written by tune_lora"):
        tune_lora(sd15, references, config=config(tmp_path, steps=2), resume_from=diffusers_file, progress=False)
    assert_restored(sd15.unet, before)


# -- the documentation ----------------------------------------------------------------------------


def test_docs_examples_run(tmp_path, monkeypatch):
    """docs/lora-tuning.md's examples, in order, on the tiny SD1.5 pipeline, with a hundredth of the steps."""
    pipe = tiny_sd15_pipeline()
    generate = StableDiffusionPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", lambda self, *a, **k: generate(self, *a, **{**k, "num_inference_steps": 2}))
    monkeypatch.setenv("REFCOND_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    namespace = {"pipe": pipe, "references": reference_images(3)}
    ran = 0
    for code in blocks:
        if code.startswith("# not run"):
            continue
        code = re.sub(r"\bsteps=(\d+)", lambda m: f"steps={max(1, int(m.group(1)) // 200)}", code)
        exec(compile(code, str(DOCS), "exec"), namespace)
        ran += 1
    assert ran >= 4
    assert not hasattr(pipe.unet, "peft_config") or not pipe.unet.peft_config, "the examples leave no adapter behind"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 2**63}, r"steps: Input should be less than or equal to 100000"),
        ({"rank": 10**6}, r"rank: Input should be less than or equal to 1024"),
        ({"resolution": 8 * 10**6}, r"resolution: Input should be less than or equal to 2048"),
        ({"batch_size": 10**9}, r"batch_size: Input should be less than or equal to 64"),
        ({"learning_rate": float("nan")}, r"learning_rate: Input should be a finite number"),
        ({"learning_rate": float("inf")}, r"learning_rate: Input should be a finite number"),
        ({"learning_rate": 1e300}, r"learning_rate: Input should be less than or equal to 1"),
        ({"alpha": float("inf")}, r"alpha: Input should be a finite number"),
        ({"prior_loss_weight": float("nan")}, r"prior_loss_weight: Input should be a finite number"),
        ({"num_class_images": 10**9}, r"num_class_images: Input should be less than or equal to 1000"),
        ({"seed": 10**5000}, r"seed: Input should be less than or equal to 18446744073709551615 \(got <an integer of about 5001 digits>\)"),
    ],
    ids=["steps", "rank", "resolution", "batch", "nan-lr", "inf-lr", "huge-lr", "alpha", "loss-weight", "class-images", "seed"],
)
def test_tuning_options_beyond_their_bounds_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        TuningConfig(**options)
