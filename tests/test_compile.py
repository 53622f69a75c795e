"""A UNet with refcond's injectors attached stays friendly to ``torch.compile``.

What this guards, on CPU with the tiny SD1.5 and SDXL UNets:

- **No graph breaks caused by refcond.** ``torch._dynamo.explain`` traces the UNet inside
  ``rp.bind(...)`` with every shipped injector attached — ``cross-attention`` (the ``ip-adapter``
  composition), a LoRA file through the ``lora`` injector, and EasyRef's ``cross-attention`` +
  ``lora`` own layers together — and no break may have refcond code (``refcond``,
  ``refcond_injectors``, ``refcond_encoders``, ``refcond_easyref``) on its stack. Breaks that are
  diffusers' or torch's alone are not refcond's to fix and are left out; at the tested versions
  (torch 2.13, diffusers 0.42.1, peft 0.21.2) there are none: each UNet is one graph.
- **A new binding does not recompile.** A UNet compiled once reuses its graph when another
  condition of the same shape is bound, and when ``reference_scale`` changes: the compiled graph
  reads both as tensor inputs, and its output equals eager mode's for the new binding. With
  nothing bound the original processors run, a different program: that is one more graph,
  compiled once, after which switching between bound and unbound reuses both.
- **Compiling in place** (``pipe.unet.compile()``, as docs/index.md says) generates the images eager
  mode generates, a new reference group on the next call does not recompile, and ``detach`` works.
- **lora-tuning** shows a compiled UNet the same adapters for every reference group, so the
  graphs of its tuning steps and of generation are reused from group to group.

``backend="eager"`` keeps it cheap: dynamo traces and guards exactly as with inductor, but runs the
captured graphs with plain PyTorch, so outputs are comparable bit for bit on CPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import refcond_easyref
import refcond_encoders
import refcond_injectors
import torch
import torch._dynamo
from refcond_easyref.testing import fabricate_official_checkpoint, tiny_easyref_overrides
from refcond_injectors import IP_ADAPTER_COMPOSITION
from refcond_injectors.testing import fabricate_lora_state_dict
from safetensors.torch import save_file
from torch._dynamo.utils import counters

import refcond
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline

#: Where refcond's code lives, wherever the distributions are installed.
REFCOND_PACKAGES = tuple(str(Path(m.__file__).resolve().parent) for m in (refcond, refcond_injectors, refcond_encoders, refcond_easyref))


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test starts and ends with dynamo's caches empty (compiled graphs hold the UNets alive)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- the compositions -----------------------------------------------------------------------------


def ip_adapter_with_lora_file(build: Any, folder: Path, qwen2vl_dir: Path) -> tuple[refcond.RefcondPipeline, list[str] | None]:
    """The ``ip-adapter`` composition plus a LoRA file through the ``lora`` injector."""
    pipe = build()
    lora = folder / "style.safetensors"
    save_file(fabricate_lora_state_dict(pipe, text_encoders=False), str(lora))
    composition = {
        **IP_ADAPTER_COMPOSITION,
        "injectors": [*IP_ADAPTER_COMPOSITION["injectors"], {"name": "lora", "config": {"loras": [{"path": str(lora)}]}}],
    }
    return refcond.from_pipe(pipe, composition, seed=0), None


def easyref(build: Any, folder: Path, qwen2vl_dir: Path) -> tuple[refcond.RefcondPipeline, list[str] | None]:
    """EasyRef on the tiny Qwen2-VL: cross-attention and the lora injector's own layers (and the prompts to encode with)."""
    pipe = build()
    checkpoint = folder / "easyref.safetensors"  # non-zero LoRA weights, so the LoRA layers are live
    refcond.write_safetensors(checkpoint, fabricate_official_checkpoint(pipe.unet, seed=3))
    return refcond.from_pipe(pipe, "easyref", checkpoint=checkpoint, **tiny_easyref_overrides(qwen2vl_dir)), ["a dog"]


#: Every shipped injector on both UNets, in as few traces as that takes (each costs seconds).
COMPOSITIONS = {
    "sdxl-ip-adapter-lora-file": (ip_adapter_with_lora_file, tiny_sdxl_pipeline),
    "sd15-easyref": (easyref, tiny_sd15_pipeline),
}


def unet_inputs(unet: Any, batch: int = 2) -> dict[str, Any]:
    """One denoising step's inputs: ``[unconditional; conditional]`` rows, SDXL's added conditions when the UNet takes them."""
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    size = config.sample_size
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, config.in_channels, size, size, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 6, config.cross_attention_dim, generator=generator),
    }
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=generator),
            "time_ids": torch.tensor([[8 * size, 8 * size, 0, 0, 8 * size, 8 * size]] * batch, dtype=torch.float32),
        }
    return inputs


def refcond_breaks(explanation: Any) -> list[str]:
    """The graph breaks with refcond code on their stack: each reason's first line and innermost refcond frame, with a count."""
    found: Counter[str] = Counter()
    for graph_break in explanation.break_reasons:
        ours = [f for f in graph_break.user_stack if str(Path(f.filename).resolve()).startswith(REFCOND_PACKAGES)]
        if ours:
            reason = graph_break.reason.strip().splitlines()[0]
            found[f"{reason} (at {ours[-1].filename}:{ours[-1].lineno} in {ours[-1].name})"] += 1
    return [f"{count} x {where}" for where, count in found.items()]


# -- graph breaks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make, build", COMPOSITIONS.values(), ids=COMPOSITIONS.keys())
def test_the_unet_with_injectors_attached_has_no_graph_break_caused_by_refcond(make, build, tiny_qwen2vl_dir, tmp_path):
    rp, prompts = make(build, tmp_path, tiny_qwen2vl_dir)
    unet = rp.pipeline.unet
    refs = reference_images(2)
    condition, unconditional = rp.encode([refs], prompts=prompts)
    with torch.no_grad(), rp.bind(condition, unconditional, reference_scale=0.7):
        explanation = torch._dynamo.explain(unet)(**unet_inputs(unet))
    breaks = refcond_breaks(explanation)
    assert not breaks, "graph breaks caused by refcond (count x reason):\n" + "\n".join(breaks)
    assert explanation.graph_count >= 1


# -- recompiles -----------------------------------------------------------------------------------


def compiles() -> int:
    """How many graphs dynamo has compiled since the counters were last cleared."""
    return counters["stats"]["unique_graphs"]


def test_a_new_condition_or_scale_reuses_the_compiled_unet():
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    unet = rp.pipeline.unet
    compiled = torch.compile(unet, backend="eager")
    inputs = unet_inputs(unet)
    refs = reference_images(4)
    cond_a, uncond_a = rp.encode([refs[:2]])
    cond_b, uncond_b = rp.encode([refs[2:]])  # other references, the same shape
    counters.clear()

    with torch.no_grad():
        with rp.bind(cond_a, uncond_a):
            compiled(**inputs)
        assert compiles() == 1, "the bound UNet should compile to one graph"
        with torch._dynamo.config.patch(error_on_recompile=True):  # a guard failure is now an error
            for condition, unconditional, scale in ((cond_b, uncond_b, 1.0), (cond_b, uncond_b, 0.4), (cond_a, uncond_a, -0.5)):
                with rp.bind(condition, unconditional, scale):
                    got = compiled(**inputs).sample
                    expected = unet(**inputs).sample  # eager, with the same binding
                assert torch.equal(got, expected), f"the compiled UNet ignored the new binding (scale {scale})"

        # Unbound, the original processors run: a different program, so one more graph (once).
        got = compiled(**inputs).sample
        assert compiles() == 2
        assert torch.equal(got, unet(**inputs).sample)
        with torch._dynamo.config.patch(error_on_recompile=True):  # both graphs are cached now
            with rp.bind(cond_b, uncond_b, 0.7):
                compiled(**inputs)
            compiled(**inputs)


def test_the_unet_compiled_in_place_generates_as_eager_and_a_new_group_does_not_recompile():
    def generate(rp: refcond.RefcondPipeline, references: list[Any]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return rp("a cat", references=references, num_inference_steps=2, guidance_scale=5.0, output_type="pt", generator=generator).images

    refs = reference_images(4)
    expected = generate(refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0), refs[:2])

    pipe = tiny_sd15_pipeline()
    rp = refcond.from_pipe(pipe, "ip-adapter", seed=0)
    pipe.unet.compile(backend="eager")  # in place: pipe.unet stays a UNet2DConditionModel, as refcond expects
    assert torch.equal(generate(rp, refs[:2]), expected)
    with torch._dynamo.config.patch(error_on_recompile=True):
        generate(rp, refs[2:])
    rp.detach()
    assert not any(type(p).__name__ == "DecoupledCrossAttnProcessor" for p in pipe.unet.attn_processors.values())


def test_lora_tuning_shows_the_unet_the_same_adapters_for_every_group(tmp_path):
    """lora-tuning adds a LoRA per reference group: named by its group, each would be new modules to
    a compiled UNet's guards and one more compile per group (tuning and generating), until dynamo's
    recompile limit sends the UNet back to eager. Under fixed names the layouts repeat. Compiling the
    tuning steps costs tens of seconds here, so this checks what the guards read: the adapters
    present at every UNet call (with grad mode, which tells tuning's graph from generation's)."""
    pipe = tiny_sd15_pipeline()
    tuning = {"steps": 1, "learning_rate": 1e-2, "output_dir": str(tmp_path)}
    rp = refcond.from_pipe(pipe, "lora-tuning", injectors={"lora": {"config": {"tuning": tuning}}})
    layouts: list[set[tuple[bool, tuple[str, ...]]]] = []
    pipe.unet.register_forward_pre_hook(lambda unet, args: layouts[-1].add((torch.is_grad_enabled(), tuple(sorted(unet.peft_config)))))
    refs = reference_images(4)
    for group in (refs[:2], refs[2:], refs[1:3]):
        layouts.append(set())
        rp("a photo of sks", references=group, num_inference_steps=1, output_type="latent")
    assert layouts[2] <= layouts[0] | layouts[1], f"a third group still meets new adapters: {layouts}"
