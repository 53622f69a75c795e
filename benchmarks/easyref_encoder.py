"""EasyRef's encoder side, measured: the models, one conditional pass, and fresh-process memory probes.

Imported by ``test_bench_easyref_encoder.py`` (and ``conftest.py`` for the summary), and run as a
script for what has to happen in a fresh process, where the resident set size (RSS) of the process
is not blurred by earlier work::

    python benchmarks/easyref_encoder.py encode-memory SETTING N    # peak RSS one conditional pass adds
    python benchmarks/easyref_encoder.py save SETTING FOLDER        # save_pretrained, bfloat16
    python benchmarks/easyref_encoder.py load-memory FOLDER WAY DTYPE  # refcond | official, bfloat16 | float32

Each command prints one JSON object on its last line of stdout.

Memory is the process's RSS as the kernel tracks it: ``/proc/self/status`` ``VmRSS`` (now) and
``VmHWM`` (the high-water mark, reset by writing ``5`` to ``/proc/self/clear_refs``), so the peak
is exact, not sampled. ``tracemalloc`` does not see torch's CPU allocations.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL.Image import Image
from refcond_easyref import ReferenceTokensAggregator, ReferenceTokensConfig
from refcond_encoders.mllm import (
    OFFICIAL_MAX_PIXELS,
    OFFICIAL_MIN_PIXELS,
    MllmEncoder,
    MllmEncoderConfig,
)
from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from refcond import Condition, ReferenceEncoding
from refcond.testing import reference_images
from refcond.testing.qwen2vl import (
    _SPECIAL_IDS,
    MAX_PIXELS,
    MIN_PIXELS,
    tiny_qwen2vl,
    tiny_qwen2vl_config,
    tiny_qwen2vl_processor,
    tiny_qwen2vl_tokenizer,
)

#: Reference-group sizes timed and measured.
REFERENCE_COUNTS = (1, 2, 4, 8, 16)
#: EasyRef's number of reference tokens K: the condition's length whatever the number of references.
NUM_TOKENS = 64
#: Reference images are made at the official ``cond_image_size`` (the processors resize them).
IMAGE_SIZE = 336
#: float32: on this AVX2 CPU (no bfloat16 instructions) a bfloat16 pass of the 2B shape took 8x longer.
ENCODE_DTYPE = "float32"
#: Load comparison: bfloat16 (the official dtype, the file's) and float32 (converted on load, so copied).
LOAD_DTYPES = ("bfloat16", "float32")
WAYS = ("refcond", "official")


@dataclass(frozen=True)
class Setting:
    """A Qwen2-VL shape, how to build it with random weights, its input pieces and how many rounds to time."""

    name: str
    build: Callable[[], Qwen2VLForConditionalGeneration]
    processor: Callable[[], tuple[Any, Any]]
    min_pixels: int
    max_pixels: int
    rounds: int


def qwen2vl_2b_config() -> Qwen2VLConfig:
    """Qwen2-VL-2B-Instruct's shape (2.21B parameters, tied embeddings); special token ids from the tiny tokenizer."""
    tokenizer = tiny_qwen2vl_tokenizer()  # its ids are all < 151936, so it can feed the 2B shape
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "rope_theta": 1_000_000.0,
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 32,
            "embed_dim": 1280,
            "num_heads": 16,
            "mlp_ratio": 4,
            "hidden_size": 1536,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "in_channels": 3,
        },
        tie_word_embeddings=True,
        **{name: tokenizer.convert_tokens_to_ids(token) for name, token in _SPECIAL_IDS.items()},
    )
    config._attn_implementation = "sdpa"
    return config


def qwen2vl_2b(dtype: torch.dtype = torch.float32) -> Qwen2VLForConditionalGeneration:
    """The 2B shape with seeded random weights (N(0, 0.02) matrices, unit norms, zero biases), in eval mode.

    transformers' own initialisation is skipped: it runs torch's default init and then its own, about
    half again as long as one ``normal_`` pass (most of the time is the first touch of 9 GB anyway).
    """
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = Qwen2VLForConditionalGeneration(qwen2vl_2b_config())
    model.tie_weights()  # skipped with the initialisation; the 2B model ties lm_head to the token embeddings
    model.to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim > 1:
                parameter.normal_(0.0, 0.02, generator=generator)
            elif "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.zero_()
    return model.eval()


def _official_processor() -> tuple[Any, Any]:
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": OFFICIAL_MIN_PIXELS, "longest_edge": OFFICIAL_MAX_PIXELS},
    )
    return image_processor, tiny_qwen2vl_tokenizer()


SETTINGS = {
    # The tiny test model: 16x16-pixel references (16 LLM tokens each).
    "tiny": Setting("tiny", tiny_qwen2vl, tiny_qwen2vl_processor, MIN_PIXELS, MAX_PIXELS, rounds=30),
    # Qwen2-VL-2B's shape at the official 336-px rule (144 LLM tokens, 576 ViT patches per reference).
    "qwen2vl-2b": Setting("qwen2vl-2b", qwen2vl_2b, _official_processor, OFFICIAL_MIN_PIXELS, OFFICIAL_MAX_PIXELS, rounds=1),
}


def build_encoder(setting: Setting, caches: bool = False) -> tuple[MllmEncoder, ReferenceTokensAggregator]:
    """The ``mllm`` encoder around a freshly built model, and the ``reference-tokens`` aggregator (K = 64) from its last layer.

    :param caches: keep the encoder's vision and prefix caches on (off: every pass is a cold one).
    """
    image_processor, tokenizer = setting.processor()
    sizes = {} if caches else {"vision_cache_mb": 0, "prefix_cache_mb": 0}
    config = MllmEncoderConfig(model=None, min_pixels=setting.min_pixels, max_pixels=setting.max_pixels, dtype=ENCODE_DTYPE, **sizes)
    encoder = MllmEncoder.from_model(setting.build(), image_processor, tokenizer, config).eval()
    torch.manual_seed(0)
    aggregator = ReferenceTokensAggregator(*encoder.final_layer(), ReferenceTokensConfig(num_tokens=NUM_TOKENS)).eval()
    return encoder, aggregator


def references(count: int) -> list[Image]:
    """``count`` distinct 336x336 RGB images."""
    return reference_images(count, size=IMAGE_SIZE)


def condition(encoder: MllmEncoder, aggregator: ReferenceTokensAggregator, group: Sequence[Image]) -> tuple[ReferenceEncoding, Condition]:
    """What is timed: one conditional MLLM pass over one group, then the reference tokens (the 64-token condition)."""
    encoding = encoder.encode([list(group)])
    return encoding, aggregator(encoding)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- memory ----------------------------------------------------------------------------------------


def memory_status() -> dict[str, int]:
    """``VmRSS`` / ``VmHWM`` / ``RssAnon`` / ``RssFile`` of this process, in bytes (Linux)."""
    with open("/proc/self/status") as status:
        text = status.read()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024 for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def settle() -> dict[str, int]:
    """Collect garbage, hand freed heap pages back to the kernel, reset the high-water mark; the status after."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: freed pages may stay resident and count as "before"
        pass
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return memory_status()


def _encode_memory(setting_name: str, count: int) -> dict[str, Any]:
    """Peak RSS one conditional pass adds, in this (fresh) process, after a warm-up pass over another group."""
    setting = SETTINGS[setting_name]
    encoder, aggregator = build_encoder(setting)
    with torch.inference_mode():
        condition(encoder, aggregator, reference_images(1, size=IMAGE_SIZE, seed=1))  # one-off lazy allocations
        group = references(count)
        before = settle()
        start = time.perf_counter()
        encoding, cond = condition(encoder, aggregator, group)
        seconds = time.perf_counter() - start
        after = memory_status()
    return {
        "setting": setting_name,
        "references": count,
        "sequence_length": int(encoding.tokens.shape[1]),
        "condition_length": int(cond.tokens.shape[1]),
        "rss_before_bytes": before["VmRSS"],
        "peak_bytes": after["VmHWM"] - before["VmRSS"],
        "seconds": seconds,
        "threads": torch.get_num_threads(),
    }


def _unique_parameters(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        for parameter in module.parameters():
            seen.setdefault(id(parameter), parameter)
    return list(seen.values())


def _save(setting_name: str, folder: str) -> dict[str, Any]:
    model = qwen2vl_2b(torch.bfloat16) if setting_name == "qwen2vl-2b" else tiny_qwen2vl().to(torch.bfloat16)
    model.save_pretrained(folder)
    return {"setting": setting_name, "folder": folder, "parameters": parameter_count(model)}


def _load_memory(folder: str, way: str, dtype_name: str) -> dict[str, Any]:
    """Peak and steady RSS of building EasyRef's MLLM parts from ``folder``, refcond's way or the official way.

    After building, every kept weight is read once: transformers 5 maps a safetensors file of the
    requested dtype into memory and a weight becomes resident only when first read, as it will be
    by the first pass. Loading into another dtype converts, and so copies, every weight.
    """
    dtype = getattr(torch, dtype_name)
    config = Qwen2VLConfig.from_pretrained(folder)
    tiny = config.text_config.hidden_size == tiny_qwen2vl_config().text_config.hidden_size
    # The processor pieces are made before the baseline: only the model parts are compared.
    image_processor, tokenizer = tiny_qwen2vl_processor() if tiny else _official_processor()
    pixels = (MIN_PIXELS, MAX_PIXELS) if tiny else (OFFICIAL_MIN_PIXELS, OFFICIAL_MAX_PIXELS)
    encoder_config = MllmEncoderConfig(model=None, min_pixels=pixels[0], max_pixels=pixels[1], dtype=dtype_name)
    before = settle()
    start = time.perf_counter()
    if way == "refcond":  # read once; the aggregator takes a copy of the last layer, and the encoder lets go of it
        model = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        encoder = MllmEncoder.from_model(model, image_processor, tokenizer, encoder_config)
        aggregator = ReferenceTokensAggregator(*encoder.final_layer(), ReferenceTokensConfig(num_tokens=NUM_TOKENS))
        del model  # the encoder holds what it uses; the aggregator its copy of the last layer
        kept = _unique_parameters(encoder, aggregator)
    elif way == "official":  # easyref-official.md 1.1, in transformers 5's layout (the decoder is model.language_model)
        final = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").model.language_model
        final.layers = final.layers[-1:]
        final.embed_tokens = torch.nn.Identity()
        final.reference_tokens = torch.nn.Parameter(0.1 * torch.randn(NUM_TOKENS, config.text_config.hidden_size, dtype=dtype))
        trunk = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        trunk.model.language_model.layers = trunk.model.language_model.layers[:-1]
        trunk.norm = torch.nn.Identity()
        kept = _unique_parameters(final, trunk)
    else:
        raise ValueError(f"way must be one of {WAYS}, got {way!r}")
    gc.collect()
    seconds = time.perf_counter() - start
    built = memory_status()
    with torch.no_grad():
        for parameter in kept:
            parameter.sum()  # page the weight in
    after = memory_status()
    return {
        "way": way,
        "dtype": dtype_name,
        "parameters_kept": sum(p.numel() for p in kept),
        "rss_before_bytes": before["VmRSS"],
        "peak_bytes": after["VmHWM"] - before["VmRSS"],
        "steady_bytes": after["VmRSS"] - before["VmRSS"],
        "steady_file_backed_bytes": after["RssFile"] - before["RssFile"],
        "built_untouched_bytes": built["VmRSS"] - before["VmRSS"],
        "seconds": seconds,
    }


def run_in_fresh_process(*args: str, timeout: float = 3600) -> dict[str, Any]:
    """Run this file with ``args`` in a new Python process; its JSON result."""
    import subprocess

    done = subprocess.run(
        [sys.executable, __file__, *args], check=False, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the summary -----------------------------------------------------------------------------------


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``: ``(a, b)``."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - b * mean_x, b


def _row(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    return {prefix + k: v for k, v in record.items() if k not in ("suite", "kind", "setting")}


def summarize(records: Sequence[dict[str, Any]], previous: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Merge one session's records (benchmarks' ``extra_info`` plus timings) into ``previous`` settings; the lines to print.

    Results accumulate by setting, N and load variant: a run of some of them replaces those only.
    The slope and the load ratios are recomputed from the merged rows.
    """
    settings: dict[str, Any] = json.loads(json.dumps(previous or {}))
    for record in records:
        entry = settings.setdefault(record["setting"], {})
        encode, load = entry.setdefault("encode", {}), entry.setdefault("load", {})
        if record["kind"] == "encode":
            encode.setdefault(str(record["references"]), {}).update(_row(record))
        elif record["kind"] == "encode-memory":
            memory = {k: record[k] for k in ("peak_bytes", "rss_before_bytes", "seconds")}
            encode.setdefault(str(record["references"]), {}).update(_row(memory, "memory_"))
        elif record["kind"] == "load":
            load[f"{record['dtype']}/{record['way']}"] = _row(record)
    lines: list[str] = []
    for name in dict.fromkeys(r["setting"] for r in records):
        lines += _describe(name, settings[name])
    return settings, lines


def _describe(name: str, entry: dict[str, Any]) -> list[str]:
    """Add the slope and load ratios to a setting's ``entry``; its table as lines."""
    mib = 2**20
    rows = {int(n): row for n, row in entry["encode"].items() if "min" in row}
    lines = [f"{name}: N | L | condition | fastest s | median s | fastest s / N | peak +MiB (fresh process)"] if rows else []
    for count in sorted(rows):
        row = rows[count]
        peak = f"{row['memory_peak_bytes'] / mib:.0f}" if "memory_peak_bytes" in row else "-"
        lines.append(
            f"{name}: {count:2d} | {row['sequence_length']:5d} | {row['condition_length']} | {row['min']:.3f} | {row['median']:.3f} | "
            f"{row['min'] / count:.3f} | {peak}"
        )
    if len(rows) >= 2:
        a, b = fit_line(sorted(rows), [rows[c]["min"] for c in sorted(rows)])
        entry["fit_fastest_seconds"] = {"a": a, "b": b, "b_over_a": b / a if a > 0 else None}
        ratio = f"{b / a:.2f}" if a > 0 else "undefined (a <= 0: the fixed cost is below the noise)"
        lines.append(f"{name}: time ~ a + b*N (fastest): a = {a:.3f} s, b = {b:.3f} s per reference, b/a = {ratio}")
    ratios = entry["load_ratio_refcond_over_official"] = {}
    for dtype in LOAD_DTYPES:
        ways = {way: entry["load"].get(f"{dtype}/{way}") for way in WAYS}
        if None in ways.values():
            continue
        for way, row in ways.items():
            lines.append(
                f"{name}: load {dtype} {way}: peak +{row['peak_bytes'] / mib:.0f} MiB, steady +{row['steady_bytes'] / mib:.0f} MiB "
                f"({row['parameters_kept'] / 1e6:.0f}M parameters kept), {row['seconds']:.1f} s"
            )
        r, o = ways["refcond"], ways["official"]
        ratios[dtype] = {"peak": r["peak_bytes"] / o["peak_bytes"], "steady": r["steady_bytes"] / o["steady_bytes"]}
        lines.append(f"{name}: load {dtype} refcond/official: peak {ratios[dtype]['peak']:.2f}, steady {ratios[dtype]['steady']:.2f}")
    return lines


def main(argv: Sequence[str]) -> None:
    command, *args = argv
    if command == "encode-memory":
        result = _encode_memory(args[0], int(args[1]))
    elif command == "save":
        result = _save(args[0], args[1])
    elif command == "load-memory":
        result = _load_memory(args[0], args[1], args[2])
    else:
        raise SystemExit(f"unknown command {command!r}; use encode-memory, save or load-memory")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
