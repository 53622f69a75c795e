"""EasyRef in refcond against EasyRef's official code path: the cost of a step and of a generation.

1. **One denoising step**: one UNet forward on a classifier-free-guidance batch of 2, same weights
   and inputs, for

   - ``plain``: the UNet alone (text context only);
   - ``refcond``: the UNet with the ``easyref`` composition attached (``cross-attention`` with the
     MLP projector + ``lora`` with its own rank-R layers on ``to_q/to_k/to_v/to_out.0`` of every
     attention layer) and a bound condition: the reference keys/values were computed once per
     generation, PEFT runs the LoRA beside every targeted layer;
   - ``refcond-fused``: the same with the lora injector's ``fuse = true`` (LoRA in the base weights);
   - ``official``: the official processors' math (``LoRAIPAttnProcessor2_0`` / ``LoRAAttnProcessor2_0``,
     :func:`refcond_easyref.testing.official_unet`): the context is ``cat(text, MLPProjModel(tokens))``
     and every step recomputes ``to_k_ip``/``to_v_ip`` of the K reference tokens and runs the LoRA as
     separate down/up linears.

   Before timing ``official`` and ``refcond-fused`` the run checks that they compute what ``refcond``
   does, so the variants are compared at equal output.

2. **One generation** (tiny models, 4 steps, guidance 5, 3 references, latents out):

   - ``refcond-cold``: ``rp(prompt, references)`` with every cache empty: the MLLM reads the
     references and the black unconditional image, then the denoising loop;
   - ``refcond-warm``: a new prompt over the same references: both encodings come from the cache;
   - ``encode-cold``: ``rp.encode`` alone with empty caches, what the cache saves a warm call;
   - ``official``: :func:`official_generate`, an emulation of the official ``EasyRef.generate``: the
     MLLM trunk and the reference-token layer run for both branches at every call, ``MLPProjModel``,
     the tokens appended to ``pipe.encode_prompt``'s embeddings, the SDXL pipeline on the official
     UNet processors. Its latents are checked against refcond's (same seed) before timing.

Each part also has an ``interleaved`` test that times its variants round by round (no
pytest-benchmark): the load of a shared machine drifts between consecutive tests, not within a
round, so its ratios are the ones to read there. Besides time, every variant's work is counted once (:func:`count_work`): GFLOPs (matmul, conv,
attention) and ATen operator calls, which do not depend on what else the machine runs. The UNet
weights are the fabricated official-layout ones at trained-like sizes (:func:`trained_scale`).

A module fixture prints the ratios at the end (time: fastest round, median in brackets; GFLOPs;
operators) and writes them, with all figures, to ``benchmarks/results/easyref_pipeline.json``
(``REFCOND_BENCH_EASYREF_PIPELINE_JSON``); it reports on its own, not through ``conftest.py``.
Settings of part 1: ``REFCOND_BENCH_EASYREF_PIPELINE_SETTINGS=tiny-sdxl,sd15-256px``. CPU, float32.
Run: ``OMP_NUM_THREADS=1 python -m pytest benchmarks/test_bench_easyref_pipeline.py -q --benchmark-only``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import pytest
import torch
from common import sd15_unet, sd_pipeline_around, timed_rounds
from refcond_easyref.testing import (
    fabricate_official_checkpoint,
    official_projection,
    official_unet,
    tiny_easyref_overrides,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import refcond
from refcond import MIXED_SOURCE, Condition, ReferenceEncoding
from refcond.testing import reference_images, save_tiny_qwen2vl, tiny_sdxl_pipeline

SUITE = "easyref-pipeline"
JSON_PATH = Path(os.environ.get("REFCOND_BENCH_EASYREF_PIPELINE_JSON", Path(__file__).parent / "results" / "easyref_pipeline.json"))
#: EasyRef.generate's defaults; the same negative prompt goes to both paths.
NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
#: The official unconditional branch: a black 512x512 image (with the instruction).
BLACK_SIZE = 512
STEP_RATIOS = {
    "refcond/plain": ("refcond", "plain"),
    "official/plain": ("official", "plain"),
    "refcond/official": ("refcond", "official"),
    "fused/plain": ("refcond-fused", "plain"),
    "fused/official": ("refcond-fused", "official"),
}
GENERATION_RATIOS = {
    "cold/official": ("refcond-cold", "official"),
    "encode/official": ("encode-cold", "official"),
    "warm/official": ("refcond-warm", "official"),
    "warm/cold": ("refcond-warm", "refcond-cold"),
}

#: ``{part: {setting: {variant: {"min", "median", "mean", "rounds"[, "gflops", "ops"]}}}}``, filled by the tests;
#: parts ``step``, ``generation`` (pytest-benchmark, with work counts) and their ``-interleaved`` twins.
RESULTS: dict[str, dict[str, dict[str, dict[str, float]]]] = {"step": {}, "step-interleaved": {}, "generation": {}, "generation-interleaved": {}}
#: A variant for :func:`interleaved`: entering it prepares the variant (untimed) and yields one run.
Variant = Callable[[], AbstractContextManager[Callable[[], Any]]]


# -- part 1: one denoising step ------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSetting:
    """One benchmarked backbone: its pipeline, the EasyRef sizes, and how many rounds to time."""

    name: str
    build_pipe: Callable[[], Any]
    num_tokens: int
    lora_rank: int
    text_tokens: int
    rounds: int
    interleaved_rounds: int


STEP_SETTINGS = {
    # The tiny SDXL-like test pipeline (block channels 32/64, cross-attention 64); 8 tokens, rank 4.
    "tiny-sdxl": StepSetting("tiny-sdxl", tiny_sdxl_pipeline, num_tokens=8, lora_rank=4, text_tokens=77, rounds=100, interleaved_rounds=40),
    # SD1.5's full UNet (860M parameters, random weights) on 32x32 latents, EasyRef's 64 tokens and
    # rank-128 LoRA (on every attn1/attn2: 128 LoRA pairs). SDXL's UNet (2.6B) needs ~10 GB per
    # copy and two copies (official + refcond), too much for the shared CPU machine. The condition
    # comes from the tiny Qwen2-VL (64-d, not Qwen2-VL-2B's 1536-d): the projector runs once per
    # generation, outside the step, so the step does not depend on it.
    "sd15-256px": StepSetting("sd15-256px", lambda: sd_pipeline_around(sd15_unet(32)), num_tokens=64, lora_rank=128, text_tokens=77, rounds=4, interleaved_rounds=3),
}
STEP_SELECTED = [s for s in os.environ.get("REFCOND_BENCH_EASYREF_PIPELINE_SETTINGS", "tiny-sdxl,sd15-256px").split(",") if s]


@dataclass
class StepBench:
    """A setting's pipeline (plain UNet while no variant is attached), official UNet copy, inputs and condition."""

    setting: StepSetting
    pipe: Any
    checkpoint: dict[str, torch.Tensor]
    overrides: dict[str, Any]
    official: torch.nn.Module
    inputs: dict[str, Any]
    official_context: torch.Tensor  # cat(text, MLPProjModel([uncond; cond] tokens))
    condition: Condition
    unconditional: Condition
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@pytest.fixture(scope="module")
def qwen2vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl"))


@pytest.fixture(scope="module", params=STEP_SELECTED)
def step_bench(request: pytest.FixtureRequest, qwen2vl_dir: Path) -> StepBench:
    if request.param not in STEP_SETTINGS:
        pytest.skip(f"unknown setting {request.param!r}: {', '.join(STEP_SETTINGS)}")
    return build_step_bench(STEP_SETTINGS[request.param], qwen2vl_dir)


def build_step_bench(setting: StepSetting, qwen2vl_dir: Path) -> StepBench:
    """Pipeline, official-layout checkpoint, official UNet copy, one step's inputs and the condition of 3 references."""
    pipe = setting.build_pipe()
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    checkpoint = trained_scale(fabricate_official_checkpoint(unet, num_tokens=setting.num_tokens, lora_rank=setting.lora_rank), unet)
    official = official_unet(unet, checkpoint, setting.num_tokens, 1.0)  # a copy, made while the UNet is plain
    # Only the encoder is overridden: the checkpoint sets the token count and the LoRA rank.
    overrides = {"encoder": tiny_easyref_overrides(qwen2vl_dir, append_prompt=False)["encoder"]}
    rp = refcond.from_pipe(pipe, "easyref", checkpoint=dict(checkpoint), **overrides)
    try:
        condition, unconditional = rp.encode([reference_images(3)])
    finally:
        rp.detach()

    gen = torch.Generator().manual_seed(0)
    size, cross = unet.config.sample_size, unet.config.cross_attention_dim
    inputs: dict[str, Any] = {
        "sample": torch.randn(2, unet.config.in_channels, size, size, generator=gen),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, setting.text_tokens, cross, generator=gen),
    }
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size conditioning
        time_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, time_dim, generator=gen), "time_ids": torch.randn(2, 6, generator=gen)}
    with torch.inference_mode():  # CFG batch order [uncond; cond], as diffusers and refcond's binding
        tokens = official_projection(checkpoint, torch.cat([unconditional.tokens, condition.tokens]))
    context = torch.cat([inputs["encoder_hidden_states"], tokens], dim=1)
    return StepBench(setting, pipe, checkpoint, overrides, official, inputs, context, condition, unconditional)


def trained_scale(checkpoint: dict[str, torch.Tensor], unet: torch.nn.Module, lora_share: float = 0.1) -> dict[str, torch.Tensor]:
    """The fabricated UNet weights brought to trained-like sizes: each LoRA adds ``lora_share`` of its layer's weight
    (by standard deviation), ``to_k_ip``/``to_v_ip`` are the layer's ``to_k``/``to_v`` (the official initialisation).

    ``fabricate_official_checkpoint``'s weights are several times the base layers': on SD1.5's full
    UNet the attention logits then saturate the softmax, and float32 rounding (fusing the LoRA, or
    another operation order) flips whole outputs, so no two implementations could be compared.
    """
    out = dict(checkpoint)
    for key, up in checkpoint.items():
        if key.endswith("_lora.up.weight"):
            processor, _, target = key.removeprefix("unet.").removesuffix("_lora.up.weight").rpartition(".")
            base = unet.get_submodule(processor.removesuffix(".processor") + (".to_out.0" if target == "to_out" else f".{target}")).weight
            delta = up @ checkpoint[key.replace(".up.", ".down.")]
            out[key] = up * (lora_share * base.std() / delta.std()).item()
        elif key.endswith(("to_k_ip.weight", "to_v_ip.weight")):
            processor, _, name = key.removeprefix("unet.").removesuffix(".weight").rpartition(".")
            out[key] = unet.get_submodule(processor.removesuffix(".processor") + "." + name.removesuffix("_ip")).weight.detach().clone()
    return out


def _tolerance(reference: torch.Tensor) -> float:
    """1e-4, relative to the output's size once it exceeds 1."""
    return 1e-4 * max(1.0, reference.abs().max().item())


class _CountOps(TorchDispatchMode):
    """Counts the ATen operators run: the Python and dispatch overhead that FLOPs do not show."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _sdpa_cpu_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def count_work(run: Callable[..., Any], *args: Any) -> dict[str, float]:
    """``{"gflops", "ops"}`` of one ``run(*args)``: matmul/conv/attention GFLOPs and ATen operator calls.

    Machine-independent, so they compare the variants where two shared cores cannot time them apart.
    torch's counter leaves the CPU attention kernel out; it is added here.
    """
    flops = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops})
    ops = _CountOps()
    with torch.inference_mode(), flops, ops:
        run(*args)
    return {"gflops": flops.get_total_flops() / 1e9, "ops": float(ops.calls)}


def _record(benchmark: Any, part: str, setting: str, variant: str, work: dict[str, float]) -> None:
    benchmark.extra_info.update(work)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None or not stats.rounds:  # --benchmark-disable: nothing was timed
        return
    timing = {"min": stats.min, "median": stats.median, "mean": stats.mean, "rounds": stats.rounds}
    RESULTS[part].setdefault(setting, {})[variant] = {**timing, **work}


def interleaved(variants: dict[str, Variant], rounds: int) -> dict[str, dict[str, float]]:
    """Wall-clock seconds of each variant, one run per round in rotating order, after one warm-up round.

    Every run is preceded by an untimed one in the same state. The load of a shared machine drifts
    over minutes; consecutive pytest-benchmark tests each see another load, interleaved rounds the same.
    """
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds + 1):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            with variants[name]() as run, torch.inference_mode():
                run()
                start = time.perf_counter()
                run()
                elapsed = time.perf_counter() - start
            if r:
                times[name].append(elapsed)
    return {n: {"min": min(t), "median": statistics.median(t), "mean": statistics.fmean(t), "rounds": len(t)} for n, t in times.items()}


def _time_step(benchmark: Any, bench: StepBench, variant: str, step: Callable[[], torch.Tensor]) -> torch.Tensor:
    name = bench.setting.name
    benchmark.group = f"easyref-step/{name}"
    benchmark.extra_info.update(suite=SUITE, part="step", setting=name, variant=variant)
    work = count_work(step)
    out = timed_rounds(benchmark, step, bench.setting.rounds)
    _record(benchmark, "step", name, variant, work)
    bench.outputs[variant] = out
    return out


class _Refcond(AbstractContextManager[Callable[[], torch.Tensor]]):
    """The ``easyref`` composition attached to the bench's pipeline, the condition bound, for one variant."""

    def __init__(self, bench: StepBench, fuse: bool = False):
        overrides = dict(bench.overrides)
        if fuse:
            overrides["injectors"] = {"lora": {"config": {"fuse": True}}}
        self.bench = bench
        self.rp = refcond.from_pipe(bench.pipe, "easyref", checkpoint=dict(bench.checkpoint), **overrides)

    def __enter__(self) -> Callable[[], torch.Tensor]:
        cross, lora = self.rp.attachments
        b = self.bench
        self._bound = [cross.condition(b.condition, b.unconditional, 1.0), lora.condition(b.condition, b.unconditional, 1.0)]
        with torch.no_grad():  # binding projects and computes every layer's keys/values: no graph
            for context in self._bound:
                context.__enter__()
        return lambda: b.pipe.unet(**b.inputs).sample

    def __exit__(self, *exc: object) -> None:
        for context in reversed(self._bound):
            context.__exit__(None, None, None)
        self.rp.detach()


def _refcond_output(bench: StepBench) -> torch.Tensor:
    """refcond's step output, from its timed run or computed now (when only some variants are selected)."""
    if "refcond" not in bench.outputs:
        with _Refcond(bench) as step, torch.inference_mode():
            bench.outputs["refcond"] = step()
    return bench.outputs["refcond"]


def _step_variants(bench: StepBench) -> dict[str, Variant]:
    official_inputs = {**bench.inputs, "encoder_hidden_states": bench.official_context}

    @contextmanager
    def plain() -> Iterator[Callable[[], Any]]:
        yield lambda: bench.pipe.unet(**bench.inputs).sample

    @contextmanager
    def official() -> Iterator[Callable[[], Any]]:
        yield lambda: bench.official(**official_inputs).sample

    return {"plain": plain, "refcond": lambda: _Refcond(bench), "official": official, "refcond-fused": lambda: _Refcond(bench, fuse=True)}


def _run_interleaved(benchmark: Any, part: str, setting: str, variants: dict[str, Variant], rounds: int) -> None:
    """Run :func:`interleaved` once, as one pytest-benchmark round (so ``--benchmark-only`` keeps it; its time is the whole measurement)."""
    benchmark.group = "easyref-interleaved (one round = the whole measurement)"
    benchmark.extra_info.update(suite=SUITE, part=part, setting=setting)

    def measure() -> None:
        RESULTS[part][setting] = interleaved(variants, rounds)

    benchmark.pedantic(measure, rounds=1, iterations=1)


def test_step_interleaved(benchmark: Any, step_bench: StepBench) -> None:
    """All four variants timed round by round (refcond attached anew each round), for drift-free ratios."""
    _run_interleaved(benchmark, "step-interleaved", step_bench.setting.name, _step_variants(step_bench), step_bench.setting.interleaved_rounds)


def test_step_plain(benchmark: Any, step_bench: StepBench) -> None:
    _time_step(benchmark, step_bench, "plain", lambda: step_bench.pipe.unet(**step_bench.inputs).sample)


def test_step_refcond(benchmark: Any, step_bench: StepBench) -> None:
    with _Refcond(step_bench) as step:
        _time_step(benchmark, step_bench, "refcond", step)


def test_step_official(benchmark: Any, step_bench: StepBench) -> None:
    b = step_bench
    inputs = {**b.inputs, "encoder_hidden_states": b.official_context}

    def step() -> torch.Tensor:
        return b.official(**inputs).sample

    ours = _refcond_output(b)
    with torch.inference_mode():
        theirs = step()
    torch.testing.assert_close(theirs, ours, atol=_tolerance(ours), rtol=1e-4, msg=lambda m: f"the official math and refcond disagree: {m}")
    _time_step(benchmark, b, "official", step)


def test_step_refcond_fused(benchmark: Any, step_bench: StepBench) -> None:
    ours = _refcond_output(step_bench)
    with _Refcond(step_bench, fuse=True) as step:
        with torch.inference_mode():
            fused = step()
        torch.testing.assert_close(fused, ours, atol=_tolerance(ours), rtol=1e-4, msg=lambda m: f"the fused LoRA computes another step: {m}")
        _time_step(benchmark, step_bench, "refcond-fused", step)


# -- part 2: one generation ----------------------------------------------------------------------------

GENERATION = {"num_inference_steps": 4, "guidance_scale": 5.0, "output_type": "latent"}
GENERATION_ROUNDS = 15
GENERATION_INTERLEAVED_ROUNDS = 15
GENERATION_SETTING = "tiny-sdxl"


@dataclass
class GenerationBench:
    """The tiny SDXL pipeline with refcond's easyref attached, and an official pipeline sharing all but the UNet."""

    rp: refcond.RefcondPipeline
    official_pipe: Any
    checkpoint: dict[str, torch.Tensor]
    references: list[PIL.Image.Image]


@pytest.fixture(scope="module")
def generation_bench(qwen2vl_dir: Path) -> Iterator[GenerationBench]:
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    checkpoint = trained_scale(fabricate_official_checkpoint(pipe.unet), pipe.unet)
    components = {**pipe.components, "unet": official_unet(pipe.unet, checkpoint, _num_tokens(checkpoint), 1.0)}
    official_pipe = type(pipe)(**components)
    official_pipe.set_progress_bar_config(disable=True)
    # The MLLM reads the instruction alone here (the official emulation below does too): one encoding
    # then serves every prompt, which is what the warm-call numbers measure.
    rp = refcond.from_pipe(pipe, "easyref", checkpoint=dict(checkpoint), **tiny_easyref_overrides(qwen2vl_dir, append_prompt=False))
    yield GenerationBench(rp, official_pipe, checkpoint, reference_images(3))
    rp.detach()


def _num_tokens(checkpoint: dict[str, torch.Tensor]) -> int:
    """K, the number of reference tokens of an official checkpoint."""
    return int(checkpoint["mllm_final_layer.reference_tokens"].shape[0])


def official_generate(
    pipe: Any,
    encoder: Any,
    aggregator: Any,
    checkpoint: dict[str, torch.Tensor],
    prompt: str,
    references: list[PIL.Image.Image],
    *,
    negative_prompt: str = NEGATIVE_PROMPT,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> Any:
    """An emulation of the official ``EasyRef.generate`` (``ip_adapter/ip_adapter.py``), one sample.

    Each call, as the official code: ``get_image_embeds`` twice, for the references and for a black
    512x512 image (both with the instruction), each running the MLLM trunk (vision tower, all decoder
    layers but the last, final norm: :func:`uncached_encoding`) and the reference-token layer
    (``aggregator``), then ``MLPProjModel``; the K tokens are appended to ``pipe.encode_prompt``'s
    embeddings and the SDXL pipeline runs on ``pipe``, whose UNet has the official processors
    (:func:`refcond_easyref.testing.official_unet`). The MLLM modules are refcond's, whose math the
    parity tests check against the official forward; what is emulated is the official call sequence.
    """
    black = PIL.Image.new("RGB", (BLACK_SIZE, BLACK_SIZE))
    with torch.inference_mode():
        embeds = [official_projection(checkpoint, aggregator(uncached_encoding(encoder, group)).tokens) for group in (references, [black])]
        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            [prompt], num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=[negative_prompt]
        )
        prompt_embeds = torch.cat([prompt_embeds, embeds[0]], dim=1)
        negative_embeds = torch.cat([negative_embeds, embeds[1]], dim=1)
    return pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        generator=generator,
        **kwargs,
    ).images


def uncached_encoding(encoder: Any, group: list[PIL.Image.Image], prompt: str = "") -> ReferenceEncoding:
    """The MLLM trunk over one group with the instruction (and ``prompt``), batched, with none of refcond's caches (the official code has none)."""
    inputs = encoder.inputs([group], [encoder.config.instruction + prompt])
    mask = inputs["attention_mask"].bool()
    return ReferenceEncoding(encoder.trunk(inputs), mask, torch.full(mask.shape, MIXED_SOURCE))


def _refcond_generate(bench: GenerationBench, prompt: str, seed: int | None = None) -> torch.Tensor:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return bench.rp(prompt, bench.references, negative_prompt=NEGATIVE_PROMPT, generator=generator, **GENERATION).images


def _forget_encodings(rp: refcond.RefcondPipeline) -> None:
    """Empty refcond's caches: the pipeline's conditions, the encoder's unconditional encoding, vision outputs and prefixes."""
    rp.clear_cache()
    rp.encoder._unconditional = None  # the mllm encoder keeps the black image's encoding once computed
    rp.encoder.clear_caches()  # and the vision outputs and prefixes of the MLLM


def _time_generation(benchmark: Any, variant: str, run: Callable[..., Any], setup: Callable[[], Any] | None = None) -> None:
    benchmark.group = "easyref-generation"
    benchmark.extra_info.update(suite=SUITE, part="generation", setting=GENERATION_SETTING, variant=variant, **GENERATION)
    prepared = setup() if setup is not None else None  # the counted run is prepared as a timed round
    work = count_work(run, *(prepared[0] if prepared else ()))
    benchmark.pedantic(run, setup=setup, rounds=GENERATION_ROUNDS, iterations=1, warmup_rounds=1)
    _record(benchmark, "generation", GENERATION_SETTING, variant, work)


def test_generation_refcond_cold(benchmark: Any, generation_bench: GenerationBench) -> None:
    def cold() -> None:  # untimed, before each round
        _forget_encodings(generation_bench.rp)

    _time_generation(benchmark, "refcond-cold", lambda: _refcond_generate(generation_bench, "a photo"), setup=cold)


def test_generation_encode_cold(benchmark: Any, generation_bench: GenerationBench) -> None:
    """What the cache saves: ``rp.encode`` with empty caches (the MLLM on the references and on the black image)."""

    def cold() -> None:
        _forget_encodings(generation_bench.rp)

    _time_generation(benchmark, "encode-cold", lambda: generation_bench.rp.encode([generation_bench.references]), setup=cold)


def test_generation_refcond_warm(benchmark: Any, generation_bench: GenerationBench) -> None:
    _refcond_generate(generation_bench, "a photo")  # the first call encodes and caches
    prompts = iter(f"a photo of thing {i}" for i in range(1000))

    def new_prompt() -> tuple[tuple[str], dict[str, Any]]:
        return (next(prompts),), {}

    _time_generation(benchmark, "refcond-warm", lambda prompt: _refcond_generate(generation_bench, prompt), setup=new_prompt)


def test_generation_interleaved(benchmark: Any, generation_bench: GenerationBench) -> None:
    """refcond cold / warm, the encodings alone and the official path, timed round by round."""
    b = generation_bench
    prompts = iter(f"a new prompt {i}" for i in range(10_000))

    @contextmanager
    def cold() -> Iterator[Callable[[], Any]]:
        yield lambda: (_forget_encodings(b.rp), _refcond_generate(b, "a photo"))  # forgetting costs microseconds

    @contextmanager
    def encode() -> Iterator[Callable[[], Any]]:
        yield lambda: (_forget_encodings(b.rp), b.rp.encode([b.references]))

    @contextmanager
    def warm() -> Iterator[Callable[[], Any]]:
        _refcond_generate(b, "a photo")  # the references' encodings are cached
        yield lambda: _refcond_generate(b, next(prompts))

    @contextmanager
    def official() -> Iterator[Callable[[], Any]]:
        yield lambda: official_generate(b.official_pipe, b.rp.encoder, b.rp.aggregator, b.checkpoint, "a photo", b.references, **GENERATION)

    variants = {"refcond-cold": cold, "encode-cold": encode, "refcond-warm": warm, "official": official}
    _run_interleaved(benchmark, "generation-interleaved", GENERATION_SETTING, variants, GENERATION_INTERLEAVED_ROUNDS)


def test_generation_official(benchmark: Any, generation_bench: GenerationBench) -> None:
    b = generation_bench

    def official(seed: int | None = None) -> Any:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return official_generate(b.official_pipe, b.rp.encoder, b.rp.aggregator, b.checkpoint, "a photo", b.references, generator=generator, **GENERATION)

    ours = _refcond_generate(b, "a photo", seed=0)
    torch.testing.assert_close(official(seed=0), ours, atol=1e-4, rtol=1e-4, msg=lambda m: f"the official path and refcond generate different latents: {m}")
    _time_generation(benchmark, "official", official)


# -- summary -------------------------------------------------------------------------------------------


def _ratios(variants: dict[str, dict[str, float]], ratios: dict[str, tuple[str, str]]) -> dict[str, dict[str, float]]:
    return {
        label: {stat: variants[top][stat] / variants[bottom][stat] for stat in ("min", "median", "gflops", "ops") if stat in variants[top]}
        for label, (top, bottom) in ratios.items()
        if top in variants and bottom in variants
    }


class _Summary:
    """A pytest plugin, registered when the module ends, that prints the lines at the session's terminal summary."""

    def __init__(self, title: str, lines: list[str]):
        self.title, self.lines = title, lines

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.section(self.title)
        for line in self.lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: write the JSON and have the ratios printed (fastest round, median in brackets).

    This module reports on its own (not through ``conftest.py``), from a plugin registered here.
    """
    yield
    if not any(RESULTS.values()):
        return
    report: dict[str, Any] = {
        "what": {
            "step": "one UNet forward (guidance batch of 2), EasyRef injected (cross-attention + UNet LoRA) vs plain vs the official processors",
            "generation": f"one tiny-SDXL generation, {GENERATION['num_inference_steps']} steps, guidance {GENERATION['guidance_scale']}, "
            "3 references, latents out; refcond cold / warm cache vs the official call sequence",
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    lines = []
    for part, ratios in (("step", STEP_RATIOS), ("step-interleaved", STEP_RATIOS), ("generation", GENERATION_RATIOS), ("generation-interleaved", GENERATION_RATIOS)):
        report[part] = {}
        for setting, variants in RESULTS[part].items():
            found = _ratios(variants, ratios)
            report[part][setting] = {"seconds": variants, "ratios": found}
            lines.append(f"{part} {setting}, time: " + ", ".join(f"{label} {r['min']:.3f} ({r['median']:.3f})" for label, r in found.items()))
            if not part.endswith("interleaved"):
                lines.append(f"{part} {setting}, GFLOPs | operators: " + ", ".join(f"{label} {r['gflops']:.3f} | {r['ops']:.3f}" for label, r in found.items()))
    JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines.append(f"written to {JSON_PATH}")
    request.config.pluginmanager.register(_Summary("refcond EasyRef ratios (time: fastest round, median in brackets)", lines))
