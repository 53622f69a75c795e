"""The encoding cache: a frozen encoder's encodings kept on disk, keyed by content.

Training with the cache ends with the weights of training without it, bit for bit, and a run killed
between two files of a batch resumes to the weights of an uninterrupted one; a run over
samples the cache holds never calls the encoder; other encoder weights or config miss; a stage
that trains the encoder never touches the cache; a damaged file is recomputed with one warning.
Tiny models, CPU."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from refcond_easyref.testing import tiny_easyref_overrides
from refcond_encoders.clip import ClipEncoder
from refcond_encoders.mllm import MllmEncoder
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import refcond
from refcond.testing import reference_images, tiny_sd15_pipeline
from refcond.training import train
from refcond.training.encoding_cache import EncodingCache

RESOLUTION = 64
RECORDS = 4
#: Samples from every conditioning branch: dropped references (the unconditional encoding), dropped captions (another prompt key).
DROPOUT = {"references": 0.25, "text": 0.25, "both": 0.25}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four samples: two references and a target each, with a caption."""
    folder = tmp_path_factory.mktemp("data")
    for i, image in enumerate(reference_images(RECORDS + 2, size=48)):
        image.save(folder / f"{i}.png")
    lines = [json.dumps({"references": [f"{i + 1}.png", f"{i + 2}.png"], "image": f"{i}.png", "caption": f"a photo of thing {i}"}) for i in range(RECORDS)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many reference groups each encoder method was given (patched on the encoder classes)."""
    counts: Counter[str] = Counter()
    for cls in (ClipEncoder, MllmEncoder):
        for name in ("encode", "encode_unconditional"):
            original = getattr(cls, name)

            def counted(self: Any, *args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
                references = args[-1] if _name == "encode_unconditional" else args[0]
                counts[_name] += len(references)
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, name, counted)
    return counts


def run_config(composition: str, data_file: Path, output: Path, roles: dict[str, Any], steps: int = 4, **stage: Any) -> dict[str, Any]:
    train_ = ["aggregator", "injector.cross-attention"] if composition == "easyref" else ["injector.cross-attention"]
    return {
        "composition": composition,
        "roles": roles,
        # In order, so the second epoch draws the first one's reference groups again.
        "data": {"path": str(data_file), "resolution": RESOLUTION, "shuffle_references": False},
        "output": str(output),
        "seed": 5,
        "stages": [{"name": "s", "train": train_, "steps": steps, "batch_size": 2, "optimizer": {"learning_rate": 1e-3}, "dropout": DROPOUT, **stage}],
    }


def weights(result: Any) -> dict[str, torch.Tensor]:
    state, _ = refcond.read_checkpoint(result.checkpoint)
    return state


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:4]}"


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.safetensors"))


@pytest.fixture(params=["ip-adapter", "easyref"])
def composition(request: pytest.FixtureRequest, tiny_qwen2vl_dir: Path) -> tuple[str, dict[str, Any]]:
    name = request.param
    return name, tiny_easyref_overrides(tiny_qwen2vl_dir) if name == "easyref" else {}


def test_cached_training_trains_as_uncached_and_a_second_run_never_calls_the_encoder(
    composition: tuple[str, dict[str, Any]], data_file: Path, tmp_path: Path, encoded: Counter[str]
) -> None:
    name, roles = composition
    pipe = tiny_sd15_pipeline()
    shared = tmp_path / "shared-cache"

    cached = train({**run_config(name, data_file, tmp_path / "cached", roles), "encoding_cache": str(shared)}, pipeline=pipe, progress=False)
    first = dict(encoded)
    files = cache_files(shared)
    # 8 samples drawn from 4 records: the second epoch reads what the first one wrote, except where a dropped caption makes a new
    # key; the encoder then encodes that sample's whole batch, and only the new key is stored.
    assert 0 < first["encode"] < 2 * RECORDS and RECORDS < len(files) <= first["encode"] + first["encode_unconditional"]

    encoded.clear()
    uncached = train(run_config(name, data_file, tmp_path / "uncached", roles, cache_encodings=False), pipeline=pipe, progress=False)
    assert encoded["encode"] == 2 * RECORDS and not (tmp_path / "uncached" / "encoding-cache").exists()
    assert_same_weights(weights(cached), weights(uncached))

    encoded.clear()
    again = train({**run_config(name, data_file, tmp_path / "again", roles), "encoding_cache": str(shared)}, pipeline=pipe, progress=False)
    assert encoded["encode"] == encoded["encode_unconditional"] == 0, "a run over cached samples called the encoder"
    assert cache_files(shared) == files
    assert_same_weights(weights(again), weights(uncached))


def test_the_default_folder_is_in_the_output_and_a_second_epoch_reads_it(data_file: Path, tmp_path: Path, encoded: Counter[str]) -> None:
    config = run_config("ip-adapter", data_file, tmp_path / "run", {}, steps=6, dropout={"references": 0.0, "text": 0.0, "both": 0.0})
    train(config, pipeline=tiny_sd15_pipeline(), progress=False)
    # Three epochs of four samples: only the first one reaches the encoder.
    assert encoded["encode"] == encoded["encode_unconditional"] == RECORDS
    assert len(cache_files(tmp_path / "run" / "encoding-cache")) == 2 * RECORDS


def test_other_encoder_weights_or_config_or_inputs_miss(tmp_path: Path, encoded: Counter[str]) -> None:
    pipe = tiny_sd15_pipeline()
    pipe.image_encoder.requires_grad_(False)  # as a stage's selection leaves it
    groups = [reference_images(2, size=32, seed=1), reference_images(1, size=32, seed=2)]

    def encode(rp: refcond.RefcondPipeline) -> EncodingCache:
        cache = EncodingCache(tmp_path / "cache", rp)  # what each stage makes
        rp.train()
        with cache.serving():
            rp.encode(groups)
        rp.eval()
        return cache

    rp = refcond.from_pipe(pipe, "ip-adapter", seed=0)
    assert (encode(rp).misses, encode(rp).hits, encoded["encode"]) == (4, 4, 2)  # conditional and unconditional of 2 groups, then read back
    with torch.no_grad():
        pipe.image_encoder.vision_model.post_layernorm.weight.add_(0.01)
    assert encode(rp).misses == 4 and encoded["encode"] == 4, "other encoder weights must miss"
    rp.detach()

    rp = refcond.from_pipe(pipe, "ip-adapter", seed=0, encoder={"config": {"output": "hidden_states"}})
    assert encode(rp).misses == 4 and encoded["encode"] == 6, "another encoder config must miss"

    cache = EncodingCache(tmp_path / "cache", rp)
    conditional, unconditional = cache.keys(groups, None)
    assert len(set(conditional + unconditional)) == 4
    assert cache.keys(groups, ["a", "b"])[0] != conditional != cache.keys(groups, ["a", "c"])[0]
    assert cache.keys(groups[::-1], None)[0] == conditional[::-1]  # per sample, not per batch
    flipped = [[groups[0][1], groups[0][0]], groups[1]]
    assert cache.keys(flipped, None)[0][0] != conditional[0], "the order of the references is part of the key"
    rp.detach()


def test_an_encoder_with_an_active_dropout_layer_is_not_cached(tmp_path: Path, encoded: Counter[str]) -> None:
    pipe = tiny_sd15_pipeline()
    pipe.image_encoder.requires_grad_(False)
    pipe.image_encoder.vision_model.extra = torch.nn.Dropout(0.1)  # its encodings would be draws, not a function of the images
    rp = refcond.from_pipe(pipe, "ip-adapter", seed=0)
    cache = EncodingCache(tmp_path / "cache", rp)
    pipe.image_encoder.train()
    with pytest.warns(RuntimeWarning, match="active dropout layer"), cache.serving():
        rp.encode([reference_images(1, size=32)])
    assert encoded["encode"] == 1 and cache.misses == 0 and not (tmp_path / "cache").exists()
    rp.detach()


def test_a_stage_that_trains_the_encoder_never_touches_the_cache(
    data_file: Path, tmp_path: Path, tiny_qwen2vl_dir: Path, encoded: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the encoding cache was used while the encoder trains")

    monkeypatch.setattr(EncodingCache, "__init__", refuse)
    monkeypatch.setattr(EncodingCache, "fetch", refuse)
    config = run_config("easyref", data_file, tmp_path / "run", tiny_easyref_overrides(tiny_qwen2vl_dir), steps=1)
    config["stages"][0]["train"] += ["encoder"]
    train(config, pipeline=tiny_sd15_pipeline(), progress=False)
    assert encoded["encode"] == 2 and not (tmp_path / "run" / "encoding-cache").exists()


def _damage(files: list[Path]) -> None:
    """Four kinds of damage, in turn: truncated, a tensor missing, another shape, a flipped byte."""
    for i, path in enumerate(files):
        kind = i % 4
        if kind == 0:
            path.write_bytes(path.read_bytes()[:-7])
        elif kind == 3:
            raw = bytearray(path.read_bytes())
            raw[-3] ^= 0xFF
            path.write_bytes(bytes(raw))
        else:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata()
            state = load_file(str(path))
            changed = {"tokens": state["tokens"], "mask": state["mask"]} if kind == 1 else {**state, "tokens": state["tokens"][:, :-1].contiguous()}
            save_file(changed, str(path), metadata=metadata)


def test_damaged_files_are_recomputed_with_one_warning(data_file: Path, tmp_path: Path, encoded: Counter[str]) -> None:
    pipe = tiny_sd15_pipeline()
    config = run_config("ip-adapter", data_file, tmp_path / "first", {}, steps=2, dropout={"references": 0.0, "text": 0.0, "both": 0.0})
    config["encoding_cache"] = str(tmp_path / "cache")
    first = train(config, pipeline=pipe, progress=False)
    files = cache_files(tmp_path / "cache")
    assert len(files) == 2 * RECORDS
    _damage(files)

    encoded.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = train({**config, "output": str(tmp_path / "second")}, pipeline=pipe, progress=False)
    said = [str(w.message) for w in caught if "encoding cache" in str(w.message)]
    assert len(said) == 1 and "recomputed and overwritten" in said[0], said
    assert encoded["encode"] == encoded["encode_unconditional"] == RECORDS  # every file was damaged
    assert_same_weights(weights(first), weights(second))

    encoded.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train({**config, "output": str(tmp_path / "third")}, pipeline=pipe, progress=False)
    assert encoded["encode"] + encoded["encode_unconditional"] == 0, "the damaged files were not overwritten"


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even the trainer's handlers."""


def test_a_run_killed_between_two_files_of_a_batch_resumes_to_the_weights_of_an_uninterrupted_one(
    data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from refcond.training import trainer

    config = run_config("ip-adapter", data_file, tmp_path / "killed", {}, steps=4, checkpoint_every=1, dropout={"references": 0.0, "text": 0.0, "both": 0.0})
    write, save_state = EncodingCache._write, trainer._Run._save_state
    writes_left: list[int] = []

    def write_then_die(self: EncodingCache, key: str, row: Any) -> None:
        write(self, key, row)
        if writes_left and writes_left.pop() == 1:
            raise _Killed

    def save_then_arm(self: Any, position: Any, keep_last: int) -> None:
        save_state(self, position, keep_last)
        if position.step == 1:
            writes_left[:] = [1]  # the first file of step 2's batch of two new samples is written, the second is not

    monkeypatch.setattr(EncodingCache, "_write", write_then_die)
    monkeypatch.setattr(trainer._Run, "_save_state", save_then_arm)
    with pytest.raises(_Killed):
        train(config, pipeline=tiny_sd15_pipeline(), progress=False)
    monkeypatch.undo()
    assert len(cache_files(tmp_path / "killed" / "encoding-cache")) == 2 * 2 + 1  # step 1's two samples, twice; one of step 2's

    resumed = train(config, pipeline=tiny_sd15_pipeline(), resume="latest", progress=False)
    straight = train({**config, "output": str(tmp_path / "straight")}, pipeline=tiny_sd15_pipeline(), progress=False)
    assert_same_weights(weights(resumed), weights(straight))


def test_an_unwritable_folder_slows_training_down_but_does_not_stop_it(data_file: Path, tmp_path: Path, encoded: Counter[str]) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    config = {**run_config("ip-adapter", data_file, tmp_path / "run", {}, steps=2), "encoding_cache": str(blocker)}
    with pytest.warns(RuntimeWarning, match="without storing encodings"):
        train(config, pipeline=tiny_sd15_pipeline(), progress=False)
    assert encoded["encode"] == RECORDS


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"encoding_cache": ""}, r"encoding_cache: String should have at least 1 character"),
        ({"stages": [{"name": "s", "train": ["aggregator"], "steps": 1, "cache_encoding": False}]}, r"Did you mean 'cache_encodings'\?"),
    ],
)
def test_bad_cache_settings_are_config_errors(data_file: Path, tmp_path: Path, change: dict[str, Any], message: str) -> None:
    config = {**run_config("ip-adapter", data_file, tmp_path / "run", {}), **change}
    with pytest.raises(refcond.ConfigError, match=message):
        train(config, pipeline=tiny_sd15_pipeline(), progress=False)
