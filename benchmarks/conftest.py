"""Prints the ratios of the benchmarks at the end of the session and writes them to JSON.

Ratios are taken from the fastest round (``min``), the figure least disturbed by other processes,
and also given for the median. Each suite (a benchmark's ``extra_info["suite"]``) has its own
section and JSON file: the UNet-step suite (the default) writes to ``REFCOND_BENCH_JSON``
(default ``benchmarks/results/unet_step_ratios.json``), the LoRA suite to
``REFCOND_BENCH_LORA_RATIOS_JSON`` (default ``benchmarks/results/lora_ratios.json``), the compile
suite to ``REFCOND_BENCH_COMPILE_RATIOS_JSON`` (default ``benchmarks/results/compile_ratios.json``). The EasyRef
encoder suite (times, sequence lengths, memory; no ratios) has its own table and JSON file,
``REFCOND_BENCH_EASYREF_JSON`` (default ``benchmarks/results/easyref_encoder.json``); the
encoding-cache suite (seconds per epoch) ``REFCOND_BENCH_ENCODING_CACHE_JSON`` (default
``benchmarks/results/encoding_cache.json``).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_JSON = Path(__file__).parent / "results" / "unet_step_ratios.json"
RATIOS = {
    "refcond/plain": ("refcond", "plain"),
    "diffusers/plain": ("diffusers", "plain"),
    "refcond/diffusers": ("refcond", "diffusers"),
}


@dataclass(frozen=True)
class Suite:
    """One family of benchmarks: its ratios, its heading, what a round measures, where its JSON goes."""

    ratios: dict[str, tuple[str, str]]
    title: str
    what: str
    json_variable: str
    default_json: Path


SUITES = {
    "unet_step": Suite(
        RATIOS,
        "refcond UNet-step ratios (fastest round; median in brackets)",
        "one UNet forward (one denoising step, guidance batch of 2); IP-Adapter Plus, 4 references concatenated",
        "REFCOND_BENCH_JSON",
        DEFAULT_JSON,
    ),
    "lora": Suite(
        {"lora/plain": ("lora", "plain"), "fused/plain": ("lora-fused", "plain"), "fused/lora": ("lora-fused", "lora")},
        "refcond LoRA ratios (fastest round; median in brackets)",
        "one UNet forward (one denoising step, guidance batch of 2) with a LoRA on every transformer block, unfused or fused",
        "REFCOND_BENCH_LORA_RATIOS_JSON",
        DEFAULT_JSON.parent / "lora_ratios.json",
    ),
    "compile": Suite(
        {"compiled/eager": ("compiled", "eager")},
        "refcond torch.compile ratio (fastest round; median in brackets)",
        "one UNet forward (one denoising step, guidance batch of 2) with cross-attention and a LoRA file attached and a condition bound",
        "REFCOND_BENCH_COMPILE_RATIOS_JSON",
        DEFAULT_JSON.parent / "compile_ratios.json",
    ),
}


def _collect(config: Any, suite: str = "unet_step") -> dict[str, dict[str, dict[str, float]]]:
    """``{setting: {variant: {"min": s, "median": s, "mean": s, "rounds": n}}}`` of one suite, from pytest-benchmark."""
    session = getattr(config, "_benchmarksession", None)
    timings: dict[str, dict[str, dict[str, float]]] = {}
    for bench in getattr(session, "benchmarks", []):
        info = bench.extra_info
        if "setting" not in info or not bench.stats or info.get("suite", "unet_step") != suite:
            continue
        stats = bench.stats
        timings.setdefault(info["setting"], {})[info["variant"]] = {
            "min": stats.min,
            "median": stats.median,
            "mean": stats.mean,
            "rounds": stats.rounds,
        }
    return timings


def _ratios(variants: dict[str, dict[str, float]], ratios: dict[str, tuple[str, str]] = RATIOS) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, (top, bottom) in ratios.items():
        if top in variants and bottom in variants:
            out[label] = {stat: variants[top][stat] / variants[bottom][stat] for stat in ("min", "median")}
    return out


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    for name, suite in SUITES.items():
        _report(terminalreporter, config, name, suite)
    _report_easyref(terminalreporter, config)
    _report_encoding_cache(terminalreporter, config)


def _report_encoding_cache(terminalreporter: Any, config: Any) -> None:
    """The encoding-cache suite: seconds per epoch after the first, cached and not (see ``test_bench_encoding_cache.py``)."""
    session = getattr(config, "_benchmarksession", None)
    runs = [dict(bench.extra_info) for bench in getattr(session, "benchmarks", []) if bench.extra_info.get("suite") == "encoding_cache"]
    if not runs:
        return
    from test_bench_encoding_cache import write_summary

    terminalreporter.section("refcond encoding cache: seconds per epoch after the first (fastest; median in brackets)")
    for line in write_summary(runs):
        terminalreporter.write_line(line)


def _report_easyref(terminalreporter: Any, config: Any) -> None:
    """EasyRef's encoder suite: a table per setting (see ``easyref_encoder.summarize``), merged into its JSON file by setting."""
    session = getattr(config, "_benchmarksession", None)
    records = [
        {**bench.extra_info, "min": bench.stats.min, "median": bench.stats.median, "rounds": bench.stats.rounds}
        for bench in getattr(session, "benchmarks", [])
        if bench.extra_info.get("suite") == "easyref_encoder" and bench.stats
    ]
    if not records:
        return
    # Imported only when the suite ran: it loads transformers.
    from easyref_encoder import summarize

    path = Path(os.environ.get("REFCOND_BENCH_EASYREF_JSON", DEFAULT_JSON.parent / "easyref_encoder.json"))
    report = json.loads(path.read_text()) if path.exists() else {}
    report["settings"], lines = summarize(records, report.get("settings"))
    report.update(torch=torch.__version__, machine=platform.processor() or platform.machine())
    terminalreporter.section("refcond EasyRef encoder: one conditional pass per group of N references; loading the MLLM")
    for line in lines:
        terminalreporter.write_line(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    terminalreporter.write_line(f"written to {path}")


def _report(terminalreporter: Any, config: Any, name: str, suite: Suite) -> None:
    timings = _collect(config, name)
    if not timings:
        return
    report: dict[str, Any] = {
        "what": suite.what,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "settings": {},
    }
    terminalreporter.section(suite.title)
    for setting, variants in timings.items():
        ratios = _ratios(variants, suite.ratios)
        report["settings"][setting] = {"seconds": variants, "ratios": ratios}
        parts = [f"{label} {r['min']:.3f} ({r['median']:.3f})" for label, r in ratios.items()]
        terminalreporter.write_line(f"{setting}: " + ", ".join(parts))
        if "refcond-bind" in variants and "refcond" in variants:
            bind = variants["refcond-bind"]["min"] / variants["refcond"]["min"]
            terminalreporter.write_line(f"{setting}: refcond's once-per-generation binding costs {bind:.2f} refcond steps")
    path = Path(os.environ.get(suite.json_variable, suite.default_json))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    terminalreporter.write_line(f"written to {path}")
