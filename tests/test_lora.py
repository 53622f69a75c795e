"""The ``lora`` injector: configuration, checks before loading, attach/detach, load/unload, and
composition with the ``cross-attention`` injector. Parity with diffusers is in test_lora_parity.py.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from pydantic import ValidationError
from refcond_injectors.lora import LoraInjectorConfig, LoraSource
from refcond_injectors.testing import (
    fabricate_ip_adapter_state_dict,
    fabricate_lora_state_dict,
)
from safetensors.torch import save_file

import refcond
from refcond import ReferenceAdapter
from refcond.checkpoints.io import read_checkpoint, write_safetensors
from refcond.testing import (
    reference_images,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
    tiny_unet,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


# -- helpers --------------------------------------------------------------------------------------


def write_lora(folder: Path, pipe: Any, layout: str = "diffusers", *, seed: int = 0, name: str | None = None, **kwargs: Any) -> Path:
    """A fabricated LoRA file for ``pipe`` in ``layout``, written to ``folder``."""
    path = folder / f"{name or f'{layout}-{seed}'}.safetensors"
    save_file(fabricate_lora_state_dict(pipe, layout, seed=seed, **kwargs), str(path))
    return path


def lora_only(*loras: dict[str, Any], **config: Any) -> dict[str, Any]:
    """A composition holding only the lora injector."""
    return {"injectors": [{"name": "lora", "config": {"loras": list(loras), **config}}]}


def generate(pipe: Any, **kwargs: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red cat", num_inference_steps=2, generator=generator, output_type="latent", **kwargs).images


def pipeline_state(pipe: Any) -> dict[str, Any]:
    """Everything a detach must restore: weights, module classes, attributes, grads, PEFT layer states."""
    state: dict[str, Any] = {"pipeline": {k: v for k, v in vars(pipe).items() if k == "_merged_adapters"}}
    for name in COMPONENTS:
        model = getattr(pipe, name, None)
        if model is None:
            continue
        state[name] = {
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "classes": {path: type(module) for path, module in model.named_modules()},
            "attributes": dict(vars(model)),
            "requires_grad": {path: p.requires_grad for path, p in model.named_parameters()},
            "peft": {
                path: (list(m.active_adapters), dict(m.scaling), list(m.merged_adapters), bool(m.disable_adapters))
                for path, m in model.named_modules()
                if isinstance(m, BaseTunerLayer)
            },
        }
        if name == "unet":
            state[name]["processors"] = dict(model.attn_processors)
    return state


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two :func:`pipeline_state` snapshots (empty: restored exactly)."""
    problems = []
    if before["pipeline"] != after["pipeline"]:
        problems.append(f"pipeline attributes {before['pipeline']} -> {after['pipeline']}")
    for name in COMPONENTS:
        if name not in before:
            continue
        b, a = before[name], after[name]
        if set(b["weights"]) != set(a["weights"]):
            problems.append(f"{name}: state_dict keys differ, e.g. {sorted(set(a['weights']) ^ set(b['weights']))[:3]}")
        changed = [k for k in set(b["weights"]) & set(a["weights"]) if not torch.equal(b["weights"][k], a["weights"][k])]
        if changed:
            problems.append(f"{name}: {len(changed)} weights changed, e.g. {sorted(changed)[:3]}")
        if b["classes"] != a["classes"]:
            problems.append(f"{name}: module classes differ, e.g. {sorted(set(b['classes'].items()) ^ set(a['classes'].items()), key=str)[:2]}")
        attributes = set(b["attributes"]) | set(a["attributes"])
        altered = [k for k in attributes if k not in b["attributes"] or k not in a["attributes"] or b["attributes"][k] is not a["attributes"][k]]
        if altered:
            problems.append(f"{name}: instance attributes differ: {sorted(altered)}")
        if b["requires_grad"] != a["requires_grad"]:
            problems.append(f"{name}: requires_grad differs")
        if b["peft"] != a["peft"]:
            problems.append(f"{name}: PEFT layer states differ (active adapters, scalings, merges)")
        if "processors" in b and any(a["processors"].get(k) is not p for k, p in b["processors"].items()):
            problems.append(f"{name}: attention processors differ")
    return problems


@pytest.fixture
def sd15_lora(tmp_path, sd15_pipe) -> Path:
    return write_lora(tmp_path, sd15_pipe, "kohya", seed=1, name="pixel-art.v2")


# -- configuration --------------------------------------------------------------------------------


def test_config_fields_are_described_and_defaults_are_safe():
    config = LoraInjectorConfig()
    assert (config.loras, config.fuse, config.allow_pickle) == ([], False, False)
    for model in (LoraInjectorConfig, LoraSource):
        undocumented = [name for name, field in model.model_fields.items() if not field.description]
        assert not undocumented, f"{model.__name__} fields without description: {undocumented}"


def test_text_encoder_scale_follows_a_numeric_scale_else_one():
    assert LoraSource(path="a.safetensors", scale=0.6).text_scale == 0.6
    assert LoraSource(path="a.safetensors", scale={"up": 0.5}).text_scale == 1.0
    assert LoraSource(path="a.safetensors", scale={"up": 0.5}, text_encoder_scale=0.2).text_scale == 0.2


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"path": "a.safetensors", "adapter_name": "my.lora"}, "letters, digits"),
        ({"path": "a.safetensors", "scale": {"down": 1.0, "text_encoder": 0.5}}, "text_encoder_scale"),
        ({"path": "a.safetensors", "scale": {"middle": 1.0}}, "per-block scale keys"),
        ({"path": "a.safetensors", "wieght_name": "x"}, "wieght_name"),
    ],
)
def test_invalid_sources_are_refused_by_the_config(source, message):
    with pytest.raises(ValidationError, match=message):
        LoraInjectorConfig(loras=[source])


def test_adapter_names_must_be_distinct():
    with pytest.raises(ValidationError, match="distinct"):
        LoraInjectorConfig(loras=[{"path": "a.safetensors", "adapter_name": "x"}, {"path": "b.safetensors", "adapter_name": "x"}])


def test_the_injector_is_registered_with_its_config(plugins):
    entry = plugins.registry.get("injector", "lora")
    assert entry.config is LoraInjectorConfig
    assert entry.provenance.distribution == "refcond-injectors"


# -- checks before loading ------------------------------------------------------------------------


def test_missing_file_is_refused_at_build(sd15_pipe, tmp_path):
    with pytest.raises(refcond.CheckpointError, match=r"LoRA file .*missing\.safetensors.* not found"):
        refcond.from_pipe(sd15_pipe, lora_only({"path": str(tmp_path / "missing.safetensors")}))


def test_pickle_files_need_allow_pickle(sd15_pipe, tmp_path):
    path = tmp_path / "old.bin"
    torch.save(fabricate_lora_state_dict(sd15_pipe, "kohya"), path)
    before = pipeline_state(sd15_pipe)
    with pytest.raises(refcond.CheckpointError, match="pickle file.*allow_pickle"):
        refcond.from_pipe(sd15_pipe, lora_only({"path": str(path)}))
    assert not differences(before, pipeline_state(sd15_pipe))

    rp = refcond.from_pipe(sd15_pipe, lora_only({"path": str(path)}, allow_pickle=True))
    assert sd15_pipe.get_active_adapters() == ["old"]
    rp.detach()


def test_a_folder_with_weight_name_loads_and_a_wrong_weight_name_says_what_is_there(sd15_pipe, sd15_lora):
    rp = refcond.from_pipe(sd15_pipe, lora_only({"path": str(sd15_lora.parent), "weight_name": sd15_lora.name}))
    assert sd15_pipe.get_active_adapters() == ["pixel-art_v2"]  # derived from the file name, PEFT-safe
    rp.detach()
    with pytest.raises(refcond.CheckpointError, match=r"has no file 'nope\.safetensors'.*pixel-art\.v2\.safetensors"):
        refcond.from_pipe(sd15_pipe, lora_only({"path": str(sd15_lora.parent), "weight_name": "nope.safetensors"}))


def test_a_hub_id_that_cannot_be_read_is_a_checkpoint_error(sd15_pipe):  # offline in tests: no weight_name, no guess
    with pytest.raises(refcond.CheckpointError, match="cannot read LoRA 'someone/some-lora'"):
        refcond.from_pipe(sd15_pipe, lora_only({"path": "someone/some-lora"}))


def test_a_non_lora_file_is_named_as_such(sd15_pipe, tmp_path):
    path = tmp_path / "ip-adapter.safetensors"
    save_file(fabricate_ip_adapter_state_dict(sd15_pipe.unet, sd15_pipe.image_encoder), str(path))
    with pytest.raises(refcond.CheckpointError, match=r"is not a LoRA file: key 'i.*lora_A\.weight"):
        refcond.from_pipe(sd15_pipe, lora_only({"path": str(path)}))


def test_keys_that_match_no_module_are_listed(sd15_pipe, tmp_path):
    state = fabricate_lora_state_dict(sd15_pipe, "diffusers")
    state["unet.down_blocks.7.attentions.0.proj_in.lora_A.weight"] = torch.zeros(4, 32)
    state["unet.down_blocks.7.attentions.0.proj_in.lora_B.weight"] = torch.zeros(32, 4)
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    before = pipeline_state(sd15_pipe)
    with pytest.raises(refcond.CheckpointError, match=r"unet\.down_blocks\.7\.attentions\.0\.proj_in\.lora_A\.weight: the unet has no module"):
        refcond.from_pipe(sd15_pipe, lora_only({"path": str(path)}))
    assert not differences(before, pipeline_state(sd15_pipe)), "a refused file must leave the pipeline untouched"


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
@pytest.mark.parametrize(("made_for", "used_on"), [("sdxl", "sd15"), ("sd15", "sdxl")])
def test_a_lora_for_the_other_backbone_says_which_it_looks_made_for(tmp_path, made_for, used_on, layout):
    builders = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}
    path = write_lora(tmp_path, builders[made_for](), layout)
    pipe = builders[used_on]()
    with pytest.raises(refcond.IncompatibleBackboneError) as error:
        refcond.from_pipe(pipe, lora_only({"path": str(path)}))
    message = str(error.value)
    assert f"looks made for {made_for}" in message and f"the pipeline is {used_on}" in message
    if layout == "diffusers":  # Kohya's SDXL block names mean nothing to an SD1.5 UNet: no module to compare with
        file_dim, pipe_dim = (64, 32) if made_for == "sdxl" else (32, 64)
        shape = rf"key unet\.\S+\.attn2\.to_k\.lora_A\.weight: expected shape \(4, {pipe_dim}\), got \(4, {file_dim}\)"
        assert re.search(shape, message), message


# -- attach and detach ----------------------------------------------------------------------------


@pytest.mark.parametrize("builder", [tiny_sd15_pipeline, tiny_sdxl_pipeline], ids=["sd15", "sdxl"])
def test_detach_restores_a_pipeline_without_adapters_exactly(tmp_path, builder):
    pipe = builder()
    path = write_lora(tmp_path, pipe, "kohya")
    plain = generate(pipe)
    before = pipeline_state(pipe)  # after a first run, which sets transformers' lazy attributes
    rp = refcond.from_pipe(pipe, lora_only({"path": str(path), "scale": 0.8}))
    assert not torch.allclose(generate(rp), plain, atol=1e-3)
    assert any(isinstance(m, BaseTunerLayer) for m in pipe.text_encoder.modules()), "the text encoder gets its LoRA too"
    rp.detach()
    assert not differences(before, pipeline_state(pipe))
    assert torch.equal(generate(pipe), plain)


def test_the_users_own_lora_stays_active_with_its_weight_and_is_restored_exactly(tmp_path, sd15_pipe):
    mine = write_lora(tmp_path, sd15_pipe, "attn-procs", seed=5, text_encoders=False, name="mine")  # attention layers only
    ours = write_lora(tmp_path, sd15_pipe, "diffusers", seed=6, name="ours")  # also proj_in, ff and the text encoder
    sd15_pipe.load_lora_weights(str(mine), adapter_name="mine")
    sd15_pipe.set_adapters(["mine"], adapter_weights=[{"unet": {"down": 0.6, "up": 0.3}}])
    with_mine = generate(sd15_pipe)
    before = pipeline_state(sd15_pipe)  # after a first run, which sets transformers' lazy attributes

    rp = refcond.from_pipe(sd15_pipe, lora_only({"path": str(ours), "scale": 0.7}))
    layer = sd15_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.active_adapters == ["mine", "ours"]
    assert layer.scaling["mine"] == before["unet"]["peft"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"][1]["mine"]
    both = generate(rp)

    reference = tiny_sd15_pipeline()  # diffusers with both adapters and the same weights
    reference.load_lora_weights(str(mine), adapter_name="mine")
    reference.load_lora_weights(str(ours), adapter_name="ours")
    reference.set_adapters(["mine", "ours"], adapter_weights=[{"unet": {"down": 0.6, "up": 0.3}}, 0.7])
    assert (both - generate(reference)).abs().max() <= 1e-4

    rp.detach()
    assert not differences(before, pipeline_state(sd15_pipe))
    assert torch.equal(generate(sd15_pipe), with_mine)


def test_fused_loras_detach_with_the_original_weights(tmp_path, sd15_pipe):
    first, second = write_lora(tmp_path, sd15_pipe, "kohya", seed=1), write_lora(tmp_path, sd15_pipe, "diffusers", seed=2)
    loras = [{"path": str(first), "scale": 0.9}, {"path": str(second), "scale": 0.5}]
    rp = refcond.from_pipe(sd15_pipe, lora_only(*loras))
    unfused = generate(rp)
    rp.detach()

    plain = generate(sd15_pipe)
    before = pipeline_state(sd15_pipe)
    rp = refcond.from_pipe(sd15_pipe, lora_only(*loras, fuse=True))
    assert sd15_pipe.fused_loras == {"kohya-1", "diffusers-2"}
    assert (generate(rp) - unfused).abs().max() <= 1e-4
    rp.detach()
    assert not differences(before, pipeline_state(sd15_pipe))
    assert torch.equal(generate(sd15_pipe), plain)


def test_fusing_over_the_users_unfused_lora_is_refused(tmp_path, sd15_pipe):
    mine = write_lora(tmp_path, sd15_pipe, "diffusers", seed=5, name="mine")
    sd15_pipe.load_lora_weights(str(mine), adapter_name="mine")
    before = pipeline_state(sd15_pipe)
    with pytest.raises(refcond.ConfigError, match="fuse=true would silence your active LoRA 'mine'"):
        refcond.from_pipe(sd15_pipe, lora_only({"path": str(write_lora(tmp_path, sd15_pipe, "kohya"))}, fuse=True))
    assert not differences(before, pipeline_state(sd15_pipe))


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        ({"up": {"block_7": 1.0}}, r"up has no block\(s\) with attention layers named \['block_7'\].*are \['block_0', 'block_1'\]"),
        ({"up": {"block_1": [1.0, 0.5, 0.2]}}, r"up\.block_1: the block has 2 transformer\(s\), so give 1 or 2 values, got 3"),
        ({"mid": float("nan")}, r"loras\.0\.scale\.mid is nan; configurations take finite numbers only"),
    ],
)
def test_a_bad_per_block_weight_is_a_config_error_and_leaves_the_pipeline_untouched(sd15_pipe, sd15_lora, scale, message):
    before = pipeline_state(sd15_pipe)
    with pytest.raises(refcond.ConfigError, match=message):
        refcond.from_pipe(sd15_pipe, lora_only({"path": str(sd15_lora), "scale": scale}))
    assert not differences(before, pipeline_state(sd15_pipe))


def test_condition_is_a_no_op_and_reference_scale_does_not_weigh_the_loras(sd15_pipe, sd15_lora):
    rp = refcond.from_pipe(sd15_pipe, lora_only({"path": str(sd15_lora)}))
    attachment = rp._attachments[0]
    assert not isinstance(attachment, ReferenceAdapter) and not hasattr(attachment, "adapt")
    outside = generate(sd15_pipe)
    with attachment.condition(None, None, 0.0):
        inside = generate(sd15_pipe)
    assert torch.equal(inside, outside)
    assert torch.equal(generate(rp, reference_scale=0.0), generate(rp, reference_scale=1.0))
    rp.detach()
    with pytest.raises(refcond.RefcondError, match="detached"), attachment.condition(None, None):
        pass


def test_attaching_to_another_unet_is_refused(sd15_pipe, sd15_lora):
    rp = refcond.from_pipe(sd15_pipe, lora_only({"path": str(sd15_lora)}))
    with pytest.raises(refcond.IncompatibleBackboneError, match="attaches only to that pipeline's UNet"):
        rp.injectors[0].attach(tiny_unet())
    rp.detach()


def test_load_and_unload_add_and_remove_one_lora(tmp_path, sd15_pipe, sd15_lora):
    second = write_lora(tmp_path, sd15_pipe, "diffusers", seed=2)
    both = refcond.from_pipe(sd15_pipe, lora_only({"path": str(sd15_lora)}, {"path": str(second), "scale": 0.5}))
    expected_both = generate(both)
    both.detach()

    rp = refcond.from_pipe(sd15_pipe, lora_only({"path": str(sd15_lora)}))
    first_only = generate(rp)
    attachment = rp._attachments[0]
    name = attachment.load(second, scale=0.5)
    assert name == "diffusers-2" and attachment.adapter_names == ["pixel-art_v2", "diffusers-2"]
    assert torch.equal(generate(rp), expected_both), "load() activates the new LoRA alongside the configured one"
    assert attachment.load(second, scale=0.0) == "diffusers-2_2", "the same file again gets a free name"
    attachment.unload("diffusers-2_2")
    attachment.unload("diffusers-2")
    assert torch.equal(generate(rp), first_only)
    with pytest.raises(refcond.ConfigError, match=r"loaded no adapter 'nope'; it loaded \['pixel-art_v2'\]"):
        attachment.unload("nope")
    with pytest.raises(refcond.ConfigError, match="letters, digits"):
        attachment.load(second, adapter_name="a.b")
    with pytest.raises(refcond.ConfigError, match="already loaded in the pipeline"):
        attachment.load(second, adapter_name="pixel-art_v2")
    rp.detach()


def test_load_with_fuse_refuses_exactly_and_unload_unfuses(tmp_path, sd15_pipe, sd15_lora):
    second = write_lora(tmp_path, sd15_pipe, "attn-procs", seed=2)
    plain = generate(sd15_pipe)
    before = pipeline_state(sd15_pipe)  # after a first run, which sets transformers' lazy attributes
    rp = refcond.from_pipe(sd15_pipe, lora_only({"path": str(sd15_lora)}, fuse=True))
    first_only = generate(rp)
    attachment = rp._attachments[0]
    attachment.load(second, scale=0.6)
    assert sd15_pipe.fused_loras == {"pixel-art_v2", "attn-procs-2"}
    attachment.unload("attn-procs-2")
    assert torch.equal(generate(rp), first_only), "unfusing copies the weights back: bit-identical"
    rp.detach()
    assert not differences(before, pipeline_state(sd15_pipe))
    assert torch.equal(generate(sd15_pipe), plain)


# -- compositions ---------------------------------------------------------------------------------


def test_lora_only_composition_generates_without_references(sd15_pipe, sd15_lora):
    rp = refcond.from_pipe(sd15_pipe, lora_only({"path": str(sd15_lora), "scale": 0.8}))
    assert repr(rp) == "RefcondPipeline(sd15, injectors=['lora'])"
    assert generate(rp).shape == (1, 4, 16, 16)
    with pytest.raises(refcond.ReferenceImageError, match="without references"):
        generate(rp, references=reference_images(1))
    rp.detach()


def test_composes_with_ip_adapter_and_a_users_lora(tmp_path, sd15_pipe):
    ip_file = tmp_path / "ip-adapter.safetensors"
    save_file(fabricate_ip_adapter_state_dict(sd15_pipe.unet, sd15_pipe.image_encoder, seed=3), str(ip_file))
    mine = write_lora(tmp_path, sd15_pipe, "attn-procs", seed=5, name="mine")
    lora_file = write_lora(tmp_path, sd15_pipe, "kohya", seed=6, name="style")
    sd15_pipe.load_lora_weights(str(mine), adapter_name="mine")
    sd15_pipe.set_adapters(["mine"], adapter_weights=[0.6])
    before, refs = pipeline_state(sd15_pipe), reference_images(2)

    ip_weights = fabricate_ip_adapter_state_dict(sd15_pipe.unet, sd15_pipe.image_encoder, seed=3)
    rp = refcond.from_pipe(
        sd15_pipe,
        "ip-adapter",
        checkpoint=ip_file,
        injectors=[{"name": "cross-attention"}, {"name": "lora", "config": {"loras": [{"path": str(lora_file), "scale": 0.8}]}}],
    )
    ip_injector = rp.injectors[0]
    assert torch.equal(ip_injector.layers[0].to_k_ip.weight, ip_weights["ip_adapter.1.to_k_ip.weight"]), "the IP-Adapter file loaded"
    wrapped = [path for path, m in sd15_pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)]
    assert wrapped and not any("_ip" in path for path in wrapped), "PEFT must not target the IP-Adapter's own projections"
    assert not any(isinstance(m, BaseTunerLayer) for m in ip_injector.modules())
    layer = sd15_pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k
    assert layer.active_adapters == ["mine", "style"]
    assert layer.scaling["mine"] == before["unet"]["peft"]["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"][1]["mine"]

    with_ip = generate(rp, references=refs)
    rp.detach()
    assert not differences(before, pipeline_state(sd15_pipe))
    rp_ip_only = refcond.from_pipe(sd15_pipe, "ip-adapter", checkpoint=ip_file)
    assert not torch.allclose(generate(rp_ip_only, references=refs), with_ip, atol=1e-3), "the LoRA changed the IP-Adapter output"
    rp_ip_only.detach()
    assert not differences(before, pipeline_state(sd15_pipe))


# -- documentation --------------------------------------------------------------------------------


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


def test_the_lora_guide_examples_run(tmp_path, monkeypatch):
    """docs/lora.md's Python examples, in order, on the tiny SD1.5 pipeline with fabricated files;
    what they print is what their ``print(...)  # ...`` comments say."""
    from diffusers import StableDiffusionPipeline

    pipe = tiny_sd15_pipeline()
    for name, seed in (("pixel-art.safetensors", 1), ("watercolor.safetensors", 2)):
        save_file(fabricate_lora_state_dict(pipe, "kohya", seed=seed), str(tmp_path / name))
    save_file(fabricate_lora_state_dict(pipe, "diffusers", seed=3), str(tmp_path / "my-face.safetensors"))
    save_file(fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder), str(tmp_path / "ip-adapter_sd15.safetensors"))
    for seed, name in enumerate(["a.jpg", "b.jpg"]):
        reference_images(1, seed=seed)[0].save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    denoise = StableDiffusionPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", lambda self, *a, **k: denoise(self, *a, **{**k, "num_inference_steps": 2}))

    processors = dict(pipe.unet.attn_processors)
    namespace = {"pipe": pipe, "ip_checkpoint": "ip-adapter_sd15.safetensors"}
    blocks = _blocks(ROOT / "docs" / "lora.md", "python")
    assert len(blocks) >= 5
    for i, block in enumerate(blocks):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(block, f"docs/lora.md python block {i}", "exec"), namespace)  # noqa: S102 - the guide's own examples
        promised = [line.split("  # ", 1)[1] for line in block.splitlines() if line.startswith("print(") and "  # " in line]
        assert printed.getvalue().splitlines() == promised, f"block {i} printed something else than its comments say"
    # What is left is the user's own LoRA from the guide's "Your own LoRAs" section, active as before.
    assert pipe.get_list_adapters() == {"unet": ["me"], "text_encoder": ["me"]} and pipe.get_active_adapters() == ["me"]
    assert dict(pipe.unet.attn_processors) == processors


def test_the_lora_guide_compositions_and_cli_overrides_validate(plugins):
    from refcond.cli.generate import parse_overrides

    guide = ROOT / "docs" / "lora.md"
    tomls = _blocks(guide, "toml")
    assert tomls
    for block in tomls:
        composition = refcond.Composition.parse(tomllib.loads(block), where="docs/lora.md")
        composition.validate_components(plugins.registry)
    sets = re.findall(r"--set '([^']+)'", guide.read_text(encoding="utf-8"))
    assert sets
    composition = refcond.Composition.parse(tomllib.loads(tomls[0]))
    composition.with_overrides(parse_overrides(sets)).validate_components(plugins.registry)


# -- LoRA layers of the composition's own (config layers) -----------------------------------------


def test_fresh_lora_layers_change_nothing_and_save_with_the_composition(tmp_path: Path) -> None:
    pipe = tiny_sd15_pipeline()
    plain = generate(pipe)
    before = pipeline_state(pipe)  # after a first run, which sets transformers' lazy attributes
    rp = refcond.from_pipe(pipe, lora_only(layers={"rank": 2}))
    weights = rp.injectors[0].state_dict()
    attention_layers = len(pipe.unet.attn_processors)
    assert len(weights) == attention_layers * 4 * 2  # to_q, to_k, to_v, to_out.0; lora_A and lora_B
    assert all(not v.any() for k, v in weights.items() if k.endswith("lora_B.weight"))  # lora_B starts at zero
    assert torch.equal(generate(pipe), plain)

    for key, value in weights.items():  # the live PEFT weights: what a training step would change
        if key.endswith("lora_B.weight"):
            value.normal_(std=0.1)
    changed = generate(pipe)
    assert not torch.allclose(changed, plain, atol=1e-4)
    path = rp.save(tmp_path / "layers.safetensors")
    rp.detach()
    assert not differences(before, pipeline_state(pipe))
    again = refcond.load(path, pipe)
    assert torch.equal(generate(pipe), changed)
    again.detach()
    assert torch.equal(generate(pipe), plain)


def test_lora_layer_targets_and_weights_are_checked(tmp_path: Path) -> None:
    pipe = tiny_sd15_pipeline()
    with pytest.raises(refcond.ConfigError, match="has no such module"):
        refcond.from_pipe(pipe, lora_only(layers={"rank": 2, "targets": ["to_x"]}))
    with pytest.raises(refcond.ConfigError, match="rank"):
        refcond.from_pipe(pipe, lora_only(layers={"rank": 0}))
    rp = refcond.from_pipe(pipe, lora_only(layers={"rank": 2, "targets": ["to_q"]}))
    tensors, metadata = read_checkpoint(rp.save(tmp_path / "good.safetensors"))
    rp.detach()
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(3, tensors[key].shape[1])
    path = write_safetensors(tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(refcond.CheckpointError, match=rf"{re.escape(key)}: expected shape \(2, \d+\), got \(3, \d+\)"):
        refcond.load(path, pipe)
    assert not getattr(pipe.unet, "peft_config", None)


# -- sizes and weights are bounded and finite before anything is allocated ------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"layers": {"rank": 2**40}}, r"layers\.rank: Input should be less than or equal to 1024"),
        ({"layers": {"rank": 2, "scale": float("nan")}}, r"layers\.scale is nan; configurations take finite numbers only"),
        ({"layers": {"rank": 2, "scale": 1e9}}, r"layers\.scale: Input should be less than or equal to 100"),
        ({"layers": {"rank": 2, "targets": ["to_q"] * 100}}, r"layers\.targets: List should have at most 64 items"),
        ({"loras": [{"path": "x.safetensors", "scale": 1e300}]}, r"loras\.0\.scale: scale is 1e\+300; LoRA weights are finite numbers from -100 to 100"),
        ({"loras": [{"path": "x.safetensors", "scale": {"up": {"block_0": [1.0, 1e6]}}}]}, r"scale\.up\.block_0\.1 is 1000000\.0; LoRA weights are finite"),
        ({"loras": [{"path": "x.safetensors", "scale": {"up": {"block_0": [[1.0]]}}}]}, r"scale\.up\.block_0\.0 must be a number, or per block as"),
        ({"loras": [{"path": "x.safetensors", "text_encoder_scale": -1e4}]}, r"text_encoder_scale: Input should be greater than or equal to -100"),
        ({"tuning": {"steps": 10**12}}, r"tuning: invalid TuningConfig:\n  - steps: Input should be less than or equal to 100000"),
    ],
    ids=["rank", "nan-scale", "huge-scale", "targets", "file-scale", "block-scale", "block-depth", "text-scale", "tuning-steps"],
)
def test_lora_sizes_and_weights_beyond_the_bounds_are_config_errors(config: dict[str, Any], message: str) -> None:
    pipe = tiny_sd15_pipeline()
    before = pipeline_state(pipe)
    with pytest.raises(refcond.ConfigError, match=message):
        refcond.from_pipe(pipe, lora_only(**config))
    assert not differences(before, pipeline_state(pipe))


@pytest.mark.parametrize(
    "source",
    [{"path": "x" * 300}, {"path": str(Path("/tmp") / ("y" * 256) / "lora.safetensors")}, {"path": "/tmp", "weight_name": "z" * 300}, {"path": "a\x00b"}],
    ids=["long-file", "long-folder", "long-weight-name", "nul"],
)
def test_a_path_no_file_system_holds_is_a_config_error(source: dict[str, Any]) -> None:
    pipe = tiny_sd15_pipeline()
    with pytest.raises(refcond.ConfigError, match=r"loras\.0\.(path|weight_name): (the name '.*'\.\.\. is \d+ bytes long; file systems take names of at most 255|a path cannot hold a NUL)"):
        refcond.from_pipe(pipe, lora_only(source))
    with pytest.raises(refcond.ConfigError, match=r"output_dir: the name '.*'\.\.\. is 300 bytes long"):
        refcond.from_pipe(pipe, lora_only(tuning={"output_dir": "w" * 300}))


def test_a_file_named_like_a_module_attribute_gets_an_adapter_name_that_does_not_shadow_it(tmp_path, sd15_pipe):
    path = write_lora(tmp_path, sd15_pipe, "kohya", seed=1, name="half")  # PEFT would set layer.half = ModuleDict
    rp = refcond.from_pipe(sd15_pipe, lora_only({"path": str(path)}))
    assert rp.attachments[0].adapter_names == ["half_lora"]
    rp.detach()
    with pytest.raises(refcond.ConfigError, match=r"adapter name 'float' is the name of a torch module attribute"):
        refcond.from_pipe(sd15_pipe, lora_only({"path": str(path), "adapter_name": "float"}))
