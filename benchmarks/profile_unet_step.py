"""Kernel-level profile of one denoising step: how many kernels each variant launches and how long
they keep the device busy.

Wall-clock step times on a shared or virtualised machine scatter by tens of percent; the summed
kernel time and the kernel count per step do not. Same settings and variants as
``test_bench_unet_step.py``. Run::

    REFCOND_BENCH_DEVICE=cuda REFCOND_BENCH_DTYPE=float16 python benchmarks/profile_unet_step.py sd15-512px

It prints, per variant, kernels launched and device (or CPU) time per step, interleaved wall-clock
medians, and the ratios; ``--json PATH`` writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from test_bench_unet_step import DEVICE, SETTINGS, build_bench, variant_step  # noqa: E402

VARIANTS = ("plain", "refcond", "diffusers")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def kernel_profile(step, steps: int) -> dict[str, float]:
    """Kernels launched and summed kernel time (ms) per step, from torch.profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync()
    events = prof.key_averages()
    if DEVICE.type == "cuda":
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        count = sum(e.count for e in kernels)
        busy_us = sum(e.self_device_time_total for e in kernels)
    else:  # on a CPU the operators' own time is the work done
        kernels = [e for e in events if e.key.startswith("aten::")]
        count = sum(e.count for e in kernels)
        busy_us = sum(e.self_cpu_time_total for e in kernels)
    return {"kernels_per_step": count / steps, "busy_ms_per_step": busy_us / 1000 / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", default=["tiny-sd15"], help=f"any of {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per variant")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved wall-clock rounds")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    results: dict[str, dict] = {}
    for name in args.settings:
        bench = build_bench(SETTINGS[name])
        per_variant: dict[str, dict[str, float]] = {}
        walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
        with torch.inference_mode():
            for variant in VARIANTS:
                with variant_step(bench, variant) as step:
                    for _ in range(3):  # warm up (kernel selection, allocator)
                        step()
                    per_variant[variant] = kernel_profile(step, args.steps)
            # Interleave the variants round by round so drifts (clocks, neighbours) hit all alike.
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    with variant_step(bench, variant) as step:
                        _sync()
                        start = time.perf_counter()
                        step()
                        _sync()
                        walls[variant].append(time.perf_counter() - start)
        for variant in VARIANTS:
            per_variant[variant]["wall_ms_median"] = statistics.median(walls[variant]) * 1000
        ratios = {
            f"{a}/{b}": {k: per_variant[a][k] / per_variant[b][k] for k in per_variant[a]}
            for a, b in (("refcond", "plain"), ("diffusers", "plain"), ("refcond", "diffusers"))
        }
        results[name] = {"variants": per_variant, "ratios": ratios}
        print(f"== {name} on {DEVICE} ({bench.unet.dtype})")
        for variant, row in per_variant.items():
            print(f"  {variant:10s} " + "  ".join(f"{k} {v:9.2f}" for k, v in row.items()))
        for label, row in ratios.items():
            print(f"  {label:18s} " + "  ".join(f"{k} {v:5.3f}" for k, v in row.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
