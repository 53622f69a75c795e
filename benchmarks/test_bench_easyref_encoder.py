"""EasyRef's encoder side: what one reference group costs as it grows, and what loading the MLLM costs.

For each setting (``REFCOND_BENCH_EASYREF_SETTINGS=tiny,qwen2vl-2b`` selects them; see
``easyref_encoder.py`` for the models):

- ``test_encoder_time``: for N = 1, 2, 4, 8, 16 references in one group, the time of one conditional
  pass: ``encoder.encode([group])`` (Qwen2-VL's vision tower on every image, all decoder layers but
  the last, final norm) and the ``reference-tokens`` aggregator (64 tokens through a copy of the last
  layer), under ``torch.inference_mode``. It records the MLLM sequence length L and the condition
  length, which must be K = 64 for every N.
- ``test_encoder_peak_memory``: for the same N, the peak RSS that pass adds, in a fresh process
  (model built, one warm-up pass over another group, then the kernel's high-water mark reset).
- ``test_load_memory``: peak and steady RSS of building the MLLM parts from a ``save_pretrained``
  folder (bfloat16) and reading every kept weight once, refcond's way (read once, the aggregator
  copies the last layer, which the encoder then lets go of) and the official way (``from_pretrained`` twice, truncated as in its
  ``EasyRef.__init__``), loaded as bfloat16 (the official dtype; transformers maps the file) and as
  float32 (converted, so copied).

The measurements that need a fresh process run first, while this process holds no model.
``conftest.py`` prints the table at the end of the session, with the least-squares slope of the
fastest time in N, and writes it to ``benchmarks/results/easyref_encoder.json``
(``REFCOND_BENCH_EASYREF_JSON`` changes the path). Run::

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_bench_easyref_encoder.py -q --benchmark-only
"""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from easyref_encoder import (
    IMAGE_SIZE,
    LOAD_DTYPES,
    NUM_TOKENS,
    REFERENCE_COUNTS,
    SETTINGS,
    WAYS,
    Setting,
    build_encoder,
    condition,
    references,
    run_in_fresh_process,
)

from refcond.testing import reference_images


def _selected() -> list[str]:
    names = [s for s in os.environ.get("REFCOND_BENCH_EASYREF_SETTINGS", ",".join(SETTINGS)).split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise pytest.UsageError(f"REFCOND_BENCH_EASYREF_SETTINGS: unknown {unknown}; available: {', '.join(SETTINGS)}")
    return names


SELECTED = _selected()
#: One built (encoder, aggregator) at a time: the 2B shape holds 9 GB in float32.
_BUILT: dict[str, Any] = {}


def _drop_built() -> None:
    _BUILT.clear()
    gc.collect()


def _built(setting: Setting) -> Any:
    if setting.name not in _BUILT:
        _drop_built()
        encoder, aggregator = build_encoder(setting)
        with torch.inference_mode():  # one-off lazy allocations, outside the timed rounds
            condition(encoder, aggregator, reference_images(1, size=IMAGE_SIZE, seed=1))
        _BUILT[setting.name] = (encoder, aggregator)
    return _BUILT[setting.name]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """``{setting: folder}`` of settings saved with ``save_pretrained`` (bfloat16); removed at the end (the 2B one is 4.4 GB)."""
    folders: dict[str, Path] = {}
    yield folders
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("dtype", LOAD_DTYPES)
@pytest.mark.parametrize("setting_name", SELECTED)
def test_load_memory(
    benchmark: Any, setting_name: str, dtype: str, way: str, saved_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Peak / steady RSS of building EasyRef's MLLM parts in a fresh process; timed: that process's wall time."""
    _drop_built()
    if setting_name not in saved_models:
        folder = tmp_path_factory.mktemp(f"easyref-{setting_name}")
        run_in_fresh_process("save", setting_name, str(folder))
        saved_models[setting_name] = folder
    result = benchmark.pedantic(lambda: run_in_fresh_process("load-memory", str(saved_models[setting_name]), way, dtype), rounds=1, iterations=1)
    benchmark.extra_info.update(suite="easyref_encoder", kind="load", setting=setting_name, **result)


@pytest.mark.parametrize("count", REFERENCE_COUNTS)
@pytest.mark.parametrize("setting_name", SELECTED)
def test_encoder_peak_memory(benchmark: Any, setting_name: str, count: int) -> None:
    """Peak RSS one conditional pass over ``count`` references adds, in a fresh process; timed: that process's wall time."""
    _drop_built()
    result = benchmark.pedantic(lambda: run_in_fresh_process("encode-memory", setting_name, str(count)), rounds=1, iterations=1)
    assert result["condition_length"] == NUM_TOKENS
    benchmark.extra_info.update(suite="easyref_encoder", kind="encode-memory", **result)


@pytest.mark.parametrize("count", REFERENCE_COUNTS)
@pytest.mark.parametrize("setting_name", SELECTED)
def test_encoder_time(benchmark: Any, setting_name: str, count: int) -> None:
    """Time of ``encoder.encode([group])`` + the reference-tokens aggregator for one group of ``count`` references."""
    setting = SETTINGS[setting_name]
    encoder, aggregator = _built(setting)
    group = references(count)
    with torch.inference_mode():
        encoding, cond = benchmark.pedantic(
            lambda: condition(encoder, aggregator, group),
            rounds=setting.rounds,
            iterations=1,
            warmup_rounds=1 if setting.rounds > 1 else 0,  # the 2B shape: one pass per N after the build's warm-up
        )
    assert cond.tokens.shape[1] == NUM_TOKENS  # K tokens whatever N
    benchmark.extra_info.update(
        suite="easyref_encoder",
        kind="encode",
        setting=setting_name,
        references=count,
        sequence_length=int(encoding.tokens.shape[1]),
        condition_length=int(cond.tokens.shape[1]),
        threads=torch.get_num_threads(),
        dtype=str(encoder.dtype).removeprefix("torch."),
    )
