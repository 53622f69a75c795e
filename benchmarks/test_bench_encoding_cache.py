"""What the encoding cache saves: EasyRef stage 1 (frozen MLLM), time per epoch after the first, cached or not.

Each run is ``refcond.training.train`` of the ``easyref`` composition with EasyRef's stage-1
selection (``aggregator``, ``injector.cross-attention``: the MLLM is frozen) on the tiny SD1.5
pipeline, in a fresh process (``python benchmarks/test_bench_encoding_cache.py worker ...``):

- ``cached``: ``cache_encodings = true`` (the default), a cache folder of its own, empty at the start:
  the first epoch runs the MLLM and writes every sample's two encodings (conditional, and the
  unconditional one that dropped references read), later epochs read them;
- ``uncached``: ``cache_encodings = false``: the MLLM reads every sample's references and caption
  at every step, and the black unconditional image too.

No conditioning dropout and no shuffling of references, so every epoch draws the encodings the first
one wrote: what the cache saves at best (a dropped caption or another order of the references is a
new key, see docs/training.md). Time per step: a global ``torch.optim`` step post-hook stamps the
end of every optimizer step; a step's time is the interval between two stamps, so it covers data,
encoding, forward, backward, clipping, AdamW and the trainer's bookkeeping, and nothing of the setup.
An epoch's time is the sum over its steps, reported for every epoch after the first. The run also
checks that both variants end with the same weights (SHA-256 of the final checkpoint's tensors).

Settings (``REFCOND_BENCH_ENCODING_CACHE_SETTINGS=tiny,qwen2vl-2b`` selects them):

- ``tiny``: the tiny Qwen2-VL of the tests (64-d, 16x16-pixel references: 16 MLLM tokens each),
  8 records of 2 references, batch 2, 5 epochs, 4 runs of each variant, alternating;
- ``qwen2vl-2b``: Qwen2-VL-2B-Instruct's shape (2.21B parameters, random weights, float32; saved
  once with ``save_pretrained`` in bfloat16, 4.4 GB) at the official 336-px rule (144 MLLM tokens
  per reference), EasyRef's 64 reference tokens; 2 records of 1 reference, batch 1, 2 epochs, one
  run of each. It needs about 14 GB of memory and some 10 minutes on one CPU thread.

Run: ``OMP_NUM_THREADS=1 python -m pytest benchmarks/test_bench_encoding_cache.py -q --benchmark-only -s``
(see README.md). Results go to ``benchmarks/results/encoding_cache.json``
(``REFCOND_BENCH_ENCODING_CACHE_JSON``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

RESULTS = Path(os.environ.get("REFCOND_BENCH_ENCODING_CACHE_JSON", Path(__file__).parent / "results" / "encoding_cache.json"))
VARIANTS = ("cached", "uncached")
#: ``records`` of ``references`` images each (``reference_size`` px), ``batch``, ``epochs``; ``rounds`` runs per variant.
SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": {"records": 8, "references": 2, "reference_size": 48, "batch": 2, "epochs": 5, "rounds": 4},
    "qwen2vl-2b": {"records": 2, "references": 1, "reference_size": 336, "batch": 1, "epochs": 2, "rounds": 1},
}
SELECTED = [s for s in os.environ.get("REFCOND_BENCH_ENCODING_CACHE_SETTINGS", ",".join(SETTINGS)).split(",") if s]
if set(SELECTED) - set(SETTINGS):
    raise pytest.UsageError(f"REFCOND_BENCH_ENCODING_CACHE_SETTINGS: unknown {sorted(set(SELECTED) - set(SETTINGS))}; available: {', '.join(SETTINGS)}")
STAGE1 = ["aggregator", "injector.cross-attention"]


# -- one run, in a fresh process ----------------------------------------------------------------------


def _overrides(setting: str, model: Path) -> dict[str, Any]:
    from refcond_easyref.testing import tiny_easyref_overrides

    roles = tiny_easyref_overrides(model)
    if setting == "qwen2vl-2b":
        from refcond_encoders.mllm import OFFICIAL_MAX_PIXELS, OFFICIAL_MIN_PIXELS

        roles["encoder"]["config"].update(min_pixels=OFFICIAL_MIN_PIXELS, max_pixels=OFFICIAL_MAX_PIXELS)
        roles["aggregator"]["config"]["num_tokens"] = 64  # EasyRef's K
    return roles


def _worker(setting: str, variant: str, work: str) -> dict[str, Any]:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from refcond import read_checkpoint
    from refcond.testing import tiny_sd15_pipeline
    from refcond.training import train

    torch.manual_seed(0)
    spec = SETTINGS[setting]
    folder = Path(work)
    steps_per_epoch = spec["records"] // spec["batch"]
    output = folder / variant
    shutil.rmtree(output, ignore_errors=True)
    config = {
        "composition": "easyref",
        "roles": _overrides(setting, folder / "model"),
        "data": {"path": str(folder / "data" / "train.jsonl"), "resolution": 64, "shuffle_references": False},
        "output": str(output),
        "seed": 0,
        "stages": [
            {
                "name": "alignment",
                "train": STAGE1,
                "steps": steps_per_epoch * spec["epochs"],
                "batch_size": spec["batch"],
                "dropout": {"references": 0.0, "text": 0.0, "both": 0.0},
                "checkpoint_every": 10**6,
                "cache_encodings": variant == "cached",
            }
        ],
    }
    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    pipe = tiny_sd15_pipeline()
    started = time.perf_counter()
    result = train(config, pipeline=pipe, progress=False)
    wall = time.perf_counter() - started
    step_seconds = [b - a for a, b in zip(stamps, stamps[1:])]  # step_seconds[i] is step i + 2
    epochs = [sum(step_seconds[e * steps_per_epoch - 1 : (e + 1) * steps_per_epoch - 1]) for e in range(1, spec["epochs"])]
    state, _ = read_checkpoint(result.checkpoint)
    digest = hashlib.sha256()
    for key, value in sorted(state.items()):
        digest.update(key.encode())
        digest.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    cache = output / "encoding-cache"
    files = list(cache.glob("*/*.safetensors"))
    return {
        "setting": setting,
        "variant": variant,
        "epoch_seconds_after_first": epochs,
        "step_seconds": step_seconds,
        "wall_seconds": wall,
        "weights_sha256": digest.hexdigest(),
        "cache_files": len(files),
        "cache_bytes": sum(f.stat().st_size for f in files),
        "samples": spec["records"],
        "threads": torch.get_num_threads(),
    }


def run_in_fresh_process(*args: str, timeout: float = 3600) -> dict[str, Any]:
    """Run this file with ``args`` in a new Python process; its JSON result (the last line of its output)."""
    done = subprocess.run(
        [sys.executable, __file__, *args], check=False, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the benchmark -------------------------------------------------------------------------------------

def _prepare(setting: str, folder: Path) -> None:
    """The data (targets and references) and the MLLM folder (weights, tokenizer, image processor) of a setting."""
    from refcond.testing import reference_images, save_tiny_qwen2vl

    spec = SETTINGS[setting]
    data = folder / "data"
    data.mkdir(parents=True)
    count = spec["records"] * spec["references"]
    for i, image in enumerate(reference_images(count, size=spec["reference_size"], seed=1)):
        image.save(data / f"r{i}.png")
    for i, image in enumerate(reference_images(spec["records"], size=64, seed=2)):
        image.save(data / f"t{i}.png")
    n = spec["references"]
    lines = [
        json.dumps({"references": [f"r{i * n + j}.png" for j in range(n)], "image": f"t{i}.png", "caption": f"a photo of thing {i}"})
        for i in range(spec["records"])
    ]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    if setting == "tiny":
        save_tiny_qwen2vl(folder / "model")
        return
    from easyref_encoder import run_in_fresh_process as run_encoder_script
    from refcond_encoders.mllm import OFFICIAL_MAX_PIXELS, OFFICIAL_MIN_PIXELS
    from transformers import Qwen2VLImageProcessorPil

    from refcond.testing.qwen2vl import tiny_qwen2vl_tokenizer

    run_encoder_script("save", setting, str(folder / "model"))  # the 2B shape, bfloat16, in its own process
    size = {"shortest_edge": OFFICIAL_MIN_PIXELS, "longest_edge": OFFICIAL_MAX_PIXELS}
    Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2, size=size).save_pretrained(folder / "model")
    tiny_qwen2vl_tokenizer().save_pretrained(folder / "model")  # its ids fit the 2B vocabulary


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """``{setting: folder}``, prepared on first use; removed at the end (the 2B model is 4.4 GB)."""
    folders: dict[str, Path] = {}
    yield folders
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)


def _runs() -> list[tuple[str, str, int]]:
    """Variants alternating round by round (C U, U C, ...), so drifts of the machine's load hit both alike."""
    out = []
    for setting in SELECTED:
        for r in range(SETTINGS[setting]["rounds"]):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            out.extend((setting, variant, r) for variant in order)
    return out


@pytest.mark.parametrize(("setting", "variant", "round_"), _runs())
def test_epoch_time(benchmark: Any, setting: str, variant: str, round_: int, workdirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    """One training run in a fresh process; timed: the process's wall time; the epochs after the first are in extra_info."""
    if setting not in workdirs:
        workdirs[setting] = tmp_path_factory.mktemp(f"encoding-cache-{setting}")
        _prepare(setting, workdirs[setting])
    result = benchmark.pedantic(lambda: run_in_fresh_process("worker", setting, variant, str(workdirs[setting])), rounds=1, iterations=1)
    benchmark.extra_info.update(suite="encoding_cache", round=round_, **result)  # conftest.py prints and writes the summary


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting: seconds per epoch after the first (fastest and median over epochs and runs) by variant, and cached/uncached."""
    out: dict[str, Any] = {}
    for setting in dict.fromkeys(r["setting"] for r in results):
        mine = [r for r in results if r["setting"] == setting]
        epochs = {v: [e for r in mine if r["variant"] == v for e in r["epoch_seconds_after_first"]] for v in VARIANTS}
        if not all(epochs.values()):
            continue
        row: dict[str, Any] = {v: {"fastest": min(epochs[v]), "median": statistics.median(epochs[v]), "epochs": len(epochs[v])} for v in VARIANTS}
        row["cached/uncached"] = {k: row["cached"][k] / row["uncached"][k] for k in ("fastest", "median")}
        row["same_weights"] = len({r["weights_sha256"] for r in mine}) == 1
        cached = [r for r in mine if r["variant"] == "cached"]
        row["cache_bytes_per_sample"] = cached[0]["cache_bytes"] / cached[0]["samples"]
        row["threads"] = mine[0]["threads"]
        out[setting] = row
    return out


def write_summary(runs: list[dict[str, Any]]) -> list[str]:
    """The summary's lines; the summary, merged by setting into :data:`RESULTS`, with every run."""
    from refcond.files import write_json

    table = summarize(runs)
    lines = []
    for setting, row in table.items():
        c, u, ratio = row["cached"], row["uncached"], row["cached/uncached"]
        lines.append(
            f"{setting}: cached {c['fastest']:.3f} s ({c['median']:.3f}), uncached {u['fastest']:.3f} s ({u['median']:.3f}), "
            f"cached/uncached {ratio['fastest']:.4f} ({ratio['median']:.4f}); same weights: {row['same_weights']}; "
            f"{row['cache_bytes_per_sample'] / 1024:.0f} KiB of cache per sample"
        )
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    machine = {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version()}
    write_json(RESULTS, {"machine": machine, "settings": {**previous.get("settings", {}), **table}, "runs": runs})
    return [*lines, f"written to {RESULTS}"]


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command != "worker":
        raise SystemExit(f"unknown command {command!r}; use: worker SETTING VARIANT FOLDER")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(_worker(*arguments)))
