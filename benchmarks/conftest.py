"""Prints the ratios of the UNet-step benchmarks at the end of the session and writes them to JSON.

Ratios are taken from the fastest round (``min``), the figure least disturbed by other processes,
and also given for the median. The JSON goes to ``REFCOND_BENCH_JSON`` (default
``benchmarks/results/unet_step_ratios.json``).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

DEFAULT_JSON = Path(__file__).parent / "results" / "unet_step_ratios.json"
RATIOS = {
    "refcond/plain": ("refcond", "plain"),
    "diffusers/plain": ("diffusers", "plain"),
    "refcond/diffusers": ("refcond", "diffusers"),
}


def _collect(config: Any) -> dict[str, dict[str, dict[str, float]]]:
    """``{setting: {variant: {"min": s, "median": s, "mean": s, "rounds": n}}}`` from pytest-benchmark."""
    session = getattr(config, "_benchmarksession", None)
    timings: dict[str, dict[str, dict[str, float]]] = {}
    for bench in getattr(session, "benchmarks", []):
        info = bench.extra_info
        if "setting" not in info or not bench.stats:
            continue
        stats = bench.stats
        timings.setdefault(info["setting"], {})[info["variant"]] = {
            "min": stats.min,
            "median": stats.median,
            "mean": stats.mean,
            "rounds": stats.rounds,
        }
    return timings


def _ratios(variants: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, (top, bottom) in RATIOS.items():
        if top in variants and bottom in variants:
            out[label] = {stat: variants[top][stat] / variants[bottom][stat] for stat in ("min", "median")}
    return out


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    timings = _collect(config)
    if not timings:
        return
    report: dict[str, Any] = {
        "what": "one UNet forward (one denoising step, guidance batch of 2); IP-Adapter Plus, 4 references concatenated",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "settings": {},
    }
    terminalreporter.section("refcond UNet-step ratios (fastest round; median in brackets)")
    for setting, variants in timings.items():
        ratios = _ratios(variants)
        report["settings"][setting] = {"seconds": variants, "ratios": ratios}
        parts = [f"{label} {r['min']:.3f} ({r['median']:.3f})" for label, r in ratios.items()]
        terminalreporter.write_line(f"{setting}: " + ", ".join(parts))
        if "refcond-bind" in variants and "refcond" in variants:
            bind = variants["refcond-bind"]["min"] / variants["refcond"]["min"]
            terminalreporter.write_line(f"{setting}: refcond's once-per-generation binding costs {bind:.2f} refcond steps")
    path = Path(os.environ.get("REFCOND_BENCH_JSON", DEFAULT_JSON))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    terminalreporter.write_line(f"written to {path}")
