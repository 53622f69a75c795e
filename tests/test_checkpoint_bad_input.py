"""Bad checkpoints are refused with a clear error, never a raw exception, a hang, an allocation or NaN images.

Each test is one class of bad input: what the file holds, what refcond says about it, and that the
pipeline is left exactly as it was. (The fuzz suite, tests/fuzz/test_fuzz_checkpoints.py, generates
many more of each class.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from refcond_easyref.testing import fabricate_official_checkpoint, tiny_easyref_overrides
from refcond_injectors.testing import fabricate_ip_adapter_state_dict
from safetensors.torch import save_file

import refcond
from refcond import CheckpointError
from refcond.checkpoints import native
from refcond.checkpoints.values import MAX_MAGNITUDE
from refcond.testing import reference_images, tiny_sd15_pipeline, tiny_sdxl_pipeline

# -- helpers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15() -> Any:
    return tiny_sd15_pipeline()


@pytest.fixture(scope="module")
def sdxl() -> Any:
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def refcond_file(tmp_path_factory: pytest.TempPathFactory, sd15: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a refcond checkpoint of the 'ip-adapter' composition on the tiny SD1.5."""
    rp = refcond.from_pipe(sd15, "ip-adapter", seed=0)
    with pytest.warns(UserWarning, match="built in memory"):
        path = rp.save(tmp_path_factory.mktemp("refcond") / "ip.safetensors")
    rp.detach()
    return refcond.read_checkpoint(path)


def unet_state(unet: torch.nn.Module) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    return {k: id(v) for k, v in unet.attn_processors.items()}, {k: v.clone() for k, v in unet.state_dict().items()}


def same_unet(before: Any, after: Any) -> bool:
    return before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


@contextmanager
def refused(match: str, unet: torch.nn.Module | None = None, seconds: float = 20.0) -> Iterator[pytest.ExceptionInfo[CheckpointError]]:
    """Expect a CheckpointError matching ``match`` within ``seconds`` (a hang fails the test), the UNet left as it was."""
    before = unet_state(unet) if unet is not None else None

    def alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with pytest.raises(CheckpointError, match=match) as excinfo:
            yield excinfo
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if unet is not None:
        assert same_unet(before, unet_state(unet)), "a refused checkpoint changed the UNet"


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def generate(rp: refcond.RefcondPipeline) -> torch.Tensor:
    return rp("a cat", reference_images(2), num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0)).images


# -- metadata: the composition, the provenance, the format version ---------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "holds a JSON array, not an object"),
        ("3", "holds a JSON number, not an object"),
        ('"ip-adapter"', "holds a JSON string, not an object"),
        ("null", "holds a JSON null, not an object"),
        ("NaN", "holds NaN, which is not a JSON number"),
        ('{"injectors": 5}', "'injectors' is a JSON number; it must be a list of components"),
        ('{"injectors": ["cross-attention"], "encoder": 1e999}', "holds the number '1e999', too large to be a float"),
        ('{"injectors": ["cross-attention"], "name": ' + "9" * 5000 + "}", "outside the 64-bit range"),
        ("[" * 5000 + "]" * 5000, "is nested too deeply"),
        ('{"injectors": ' + "[" * 40 + "]" * 40 + "}", "is nested 41 levels deep"),
        ('{"injectors": ["a"], "injectors": ["b"]}', "names 'injectors' twice in one object"),
        ('{"injectors": [', "is not valid JSON"),
        ('{"injectors": ["cross-attention"], "colour": "red"}', "unknown field 'colour'"),
    ],
    ids=["list", "number", "string", "null", "nan", "injectors-number", "inf", "huge-int", "deep", "nested", "duplicate", "truncated", "unknown-field"],
)
def test_a_malformed_composition_is_named_by_load_and_describe(
    tmp_path: Path, sd15: Any, refcond_file: Any, text: str, message: str
) -> None:
    tensors, metadata = refcond_file
    path = write(tmp_path / "bad.safetensors", tensors, {**metadata, native.COMPOSITION_KEY: text})
    with refused(rf"bad\.safetensors'?[: ].*'refcond\.composition'", sd15.unet) as excinfo:
        refcond.load(path, sd15)
    assert message in str(excinfo.value)
    with refused(rf"bad\.safetensors'?[: ].*'refcond\.composition'") as excinfo:
        refcond.describe_checkpoint(path)
    assert message in str(excinfo.value)


def test_an_oversized_composition_is_refused_before_parsing(tmp_path: Path, refcond_file: Any) -> None:
    tensors, metadata = refcond_file
    path = write(tmp_path / "big.safetensors", tensors, {**metadata, native.COMPOSITION_KEY: " " * (native.MAX_JSON_CHARS + 1)})
    with refused(r"big\.safetensors.*'refcond\.composition' is 1048577 characters long"):
        refcond.describe_checkpoint(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "it holds a JSON array, not an object"),
        ('{"components": "clip"}', "its field 'components' is a JSON string, not an object of roles"),
        ('{"borrowed": {"encoder": {"sha256": "x"}}}', r"borrowed\['encoder'\] is a JSON object, not a list of objects"),
        ("{", "is not valid JSON"),
        ("Infinity", "holds Infinity, which is not a JSON number"),
    ],
    ids=["list", "field-type", "borrowed-entry", "truncated", "infinity"],
)
def test_a_malformed_provenance_is_named_by_describe_and_does_not_stop_loading(
    tmp_path: Path, sd15: Any, refcond_file: Any, text: str, message: str
) -> None:
    tensors, metadata = refcond_file
    path = write(tmp_path / "prov.safetensors", tensors, {**metadata, native.PROVENANCE_KEY: text})
    with refused(r"prov\.safetensors") as excinfo:
        refcond.describe_checkpoint(path)
    assert "'refcond.provenance'" in str(excinfo.value) and message.replace("\\", "") in str(excinfo.value)
    refcond.load(path, sd15).detach()  # loading reads only the composition


@pytest.mark.parametrize("version", ["2.0", "[2]", '"2"', "", "02", "-1", "٢"])
def test_a_format_version_that_is_not_a_whole_number_is_corrupt_metadata(tmp_path: Path, sd15: Any, refcond_file: Any, version: str) -> None:
    tensors, metadata = refcond_file
    path = write(tmp_path / "v.safetensors", tensors, {**metadata, native.VERSION_KEY: version})
    with refused(r"v\.safetensors.*'refcond\.format_version' is .*, not a format version .*metadata is corrupt", sd15.unet):
        refcond.load(path, sd15)
    with refused(r"not a format version"):
        refcond.describe_checkpoint(path)


def test_a_missing_format_version_is_named(tmp_path: Path, refcond_file: Any) -> None:
    tensors, metadata = refcond_file
    path = write(tmp_path / "v.safetensors", tensors, {k: v for k, v in metadata.items() if k != native.VERSION_KEY})
    with refused(r"has 'refcond\.composition' but no 'refcond\.format_version'"):
        refcond.describe_checkpoint(path)


# -- tensors: NaN, inf, huge, empty, wrong dtype, wrong keys --------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), r"holds NaN \(1 of 1024 values, float32\)"),
        (float("inf"), r"holds inf \(1 of 1024 values, float32\)"),
        (-1e5, r"holds values as large as 1e\+05 in magnitude \(float32\), beyond 65504 \(float16's largest finite value\)"),
    ],
    ids=["nan", "inf", "huge"],
)
def test_non_finite_and_huge_values_are_refused_in_a_refcond_file(
    tmp_path: Path, sd15: Any, refcond_file: Any, value: float, message: str
) -> None:
    tensors, metadata = refcond_file
    key = "injector.0.layers.0.to_k_ip.weight"  # [32, 32]
    broken = {**tensors, key: tensors[key].clone()}
    broken[key][3, 5] = value
    path = write(tmp_path / "values.safetensors", broken, metadata)
    with refused(rf"values\.safetensors: the checkpoint holds tensors refcond cannot load:\n  - key '{key}': {message}", sd15.unet):
        refcond.load(path, sd15)


def test_values_up_to_float16s_largest_load(tmp_path: Path, sd15: Any, refcond_file: Any) -> None:
    tensors, metadata = refcond_file
    key = "injector.0.layers.0.to_k_ip.weight"
    edge = {**tensors, key: tensors[key].clone()}
    edge[key][0, 0] = -MAX_MAGNITUDE
    rp = refcond.load(write(tmp_path / "edge.safetensors", edge, metadata), sd15)
    assert rp.injectors[0].layers[0].to_k_ip.weight[0, 0] == -MAX_MAGNITUDE
    rp.detach()


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_nan_in_an_ip_adapter_file_names_the_files_own_key(tmp_path: Path, sd15: Any, variant: str) -> None:
    state = fabricate_ip_adapter_state_dict(sd15.unet, sd15.image_encoder, variant=variant)
    key = "image_proj.proj.weight" if variant == "base" else "image_proj.layers.1.0.to_kv.weight"
    state[key][0, 0] = float("nan")
    path = write(tmp_path / f"{variant}.safetensors", state)
    with refused(rf"{variant}\.safetensors: .*\n  - key '{key.replace('.', '[.]')}': holds NaN", sd15.unet):
        refcond.from_pipe(sd15, "ip-adapter", checkpoint=path)


def test_a_state_dict_given_in_memory_is_checked_too(sd15: Any) -> None:
    state = fabricate_ip_adapter_state_dict(sd15.unet, sd15.image_encoder)
    state["image_proj.norm.bias"] = torch.full_like(state["image_proj.norm.bias"], float("-inf"))
    with refused(r"(?s)the given state dict: .*key 'image_proj\.norm\.bias': holds inf \(32 of 32 values", sd15.unet):
        refcond.from_pipe(sd15, "ip-adapter", checkpoint=state)


def test_many_bad_tensors_are_listed_ten_at_a_time(sd15: Any) -> None:
    state = {f"image_proj.k{i:02d}": torch.full((2,), float("nan")) for i in range(13)}
    with refused(r"k09': holds NaN.*\n  - \.\.\. and 3 more\n"):
        refcond.from_pipe(sd15, "ip-adapter", checkpoint=state)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(0, 32), r"holds no values \(shape \(0, 32\)\)"),
        (torch.zeros(32, 32, dtype=torch.complex64), r"holds complex numbers \(complex64\)"),
    ],
    ids=["empty", "complex"],
)
def test_empty_and_complex_tensors_are_refused(tmp_path: Path, sd15: Any, refcond_file: Any, tensor: torch.Tensor, message: str) -> None:
    tensors, metadata = refcond_file
    key = "injector.0.layers.0.to_k_ip.weight"
    path = write(tmp_path / "odd.safetensors", {**tensors, key: tensor}, metadata)
    with refused(rf"key '{key}': {message}", sd15.unet):
        refcond.load(path, sd15)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.ones(32, 32, dtype=torch.int64), r"expected floating-point values \(float32\), got integer \(int64\)"),
        (torch.ones(32, 32, dtype=torch.bool), r"expected floating-point values \(float32\), got bool \(bool\)"),
        (torch.tensor(1.0), r"expected shape \(32, 32\), got \(\)"),
    ],
    ids=["int", "bool", "0-d"],
)
def test_a_tensor_of_the_wrong_kind_or_shape_is_not_cast(tmp_path: Path, sd15: Any, refcond_file: Any, tensor: torch.Tensor, message: str) -> None:
    tensors, metadata = refcond_file
    key = "injector.0.layers.0.to_k_ip.weight"
    path = write(tmp_path / "kind.safetensors", {**tensors, key: tensor}, metadata)
    with refused(rf"key {key}: {message}", sd15.unet):
        refcond.load(path, sd15)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "the key is empty"),
        ("injector.0.x\n- everything is fine", "the key holds control characters"),
        ("injector.0." + "x" * 2000, "the key is 2011 characters long"),
    ],
    ids=["empty", "newline", "long"],
)
def test_keys_that_are_not_weight_names_are_refused(tmp_path: Path, sd15: Any, refcond_file: Any, key: str, message: str) -> None:
    tensors, metadata = refcond_file
    path = write(tmp_path / "keys.safetensors", {**tensors, key: torch.zeros(1)}, metadata)
    with refused(message, sd15.unet):
        refcond.load(path, sd15)


def test_one_weight_under_two_role_names_is_refused(tmp_path: Path, sd15: Any, refcond_file: Any) -> None:
    tensors, metadata = refcond_file
    twin = {**tensors, "injector.cross-attention.layers.0.to_k_ip.weight": torch.zeros(32, 32)}
    with refused(
        r"keys 'injector\.0\.layers\.0\.to_k_ip\.weight' and 'injector\.cross-attention\.layers\.0\.to_k_ip\.weight' both hold "
        r"injector\.0\.layers\.0\.to_k_ip\.weight",
        sd15.unet,
    ):
        refcond.load(write(tmp_path / "twin.safetensors", twin, metadata), sd15)


@pytest.mark.parametrize("index", ["99999999", "1", "01", "٠", "9" * 5000])
def test_a_role_index_out_of_range_is_named(tmp_path: Path, sd15: Any, refcond_file: Any, index: str) -> None:
    tensors, metadata = refcond_file
    path = write(tmp_path / "role.safetensors", {**tensors, f"injector.{index}.x": torch.zeros(1)}, metadata)
    with refused(r"(which this composition does not have|is for injector|the key is \d+ characters long)", sd15.unet):
        refcond.load(path, sd15)


# -- sizes read from keys and shapes are bounded before anything is built ------------------------------


def test_a_resampler_layer_index_is_bounded_before_anything_is_built(tmp_path: Path, sd15: Any) -> None:
    state = fabricate_ip_adapter_state_dict(sd15.unet, sd15.image_encoder, variant="plus")
    state["image_proj.layers.99999999999.0.norm1.weight"] = torch.ones(32)
    started = time.perf_counter()
    with refused(r"key image_proj\.layers\.99999999999\.0\.norm1\.weight: resampler layer 99999999999 is out of range", sd15.unet, seconds=10):
        refcond.from_pipe(sd15, "ip-adapter", checkpoint=write(tmp_path / "deep.safetensors", state))
    assert time.perf_counter() - started < 5


def test_resampler_layers_must_be_numbered_without_gaps(tmp_path: Path, sd15: Any) -> None:
    state = fabricate_ip_adapter_state_dict(sd15.unet, sd15.image_encoder, variant="plus", resampler_depth=3)
    state = {k.replace("layers.2.", "layers.5.") if k.startswith("image_proj.layers.2.") else k: v for k, v in state.items()}
    with refused(r"layers are numbered 0-1, 5, but they must be 0\.\.5 without gaps: no image_proj\.layers\.2\.\* key", sd15.unet):
        refcond.from_pipe(sd15, "ip-adapter", checkpoint=write(tmp_path / "gaps.safetensors", state))


def test_an_ip_adapter_with_too_many_tokens_is_refused(tmp_path: Path, sd15: Any) -> None:
    state = fabricate_ip_adapter_state_dict(sd15.unet, sd15.image_encoder, variant="plus", num_tokens=1025)
    with refused(r"key image_proj\.latents has shape \(1, 1025, 32\), more than the 1024 tokens per reference", sd15.unet):
        refcond.from_pipe(sd15, "ip-adapter", checkpoint=write(tmp_path / "tokens.safetensors", state))


def test_a_layer_number_too_long_to_convert_is_an_unexpected_key(tmp_path: Path, sd15: Any) -> None:
    state = fabricate_ip_adapter_state_dict(sd15.unet, sd15.image_encoder)
    state[f"ip_adapter.{'7' * 900}.to_k_ip.weight"] = torch.zeros(32, 32)
    with refused(r"unexpected key ip_adapter\.777", sd15.unet):
        refcond.from_pipe(sd15, "ip-adapter", checkpoint=write(tmp_path / "long.safetensors", state))


def test_easyref_reference_tokens_are_bounded_and_must_be_in_the_mllms_width(tmp_path: Path, sdxl: Any, tiny_qwen2vl_dir: Path) -> None:
    state = fabricate_official_checkpoint(sdxl.unet, num_tokens=1025)
    overrides = tiny_easyref_overrides(tiny_qwen2vl_dir)
    with refused(r"key mllm_final_layer\.reference_tokens has shape \(1025, 64\): 1025 reference tokens, more than the 1024", sdxl.unet):
        refcond.from_pipe(sdxl, "easyref", checkpoint=write(tmp_path / "many.safetensors", state), **overrides)
    state = fabricate_official_checkpoint(sdxl.unet)
    state["mllm_final_layer.reference_tokens"] = torch.zeros(8, 3)
    with refused(r"reference_tokens: expected a \[num_tokens, 64\] tensor .*got shape \(8, 3\)", sdxl.unet):
        refcond.from_pipe(sdxl, "easyref", checkpoint=write(tmp_path / "narrow.safetensors", state), **overrides)


def test_an_easyref_lora_weight_that_is_not_a_matrix_is_named(tmp_path: Path, sdxl: Any, tiny_qwen2vl_dir: Path) -> None:
    state = fabricate_official_checkpoint(sdxl.unet)
    key = next(k for k in state if k.endswith("to_q_lora.down.weight"))
    state[key] = torch.tensor(0.5)
    with refused(rf"key {key.replace('.', '[.]')}: a LoRA weight is a matrix .*got shape \(\)", sdxl.unet):
        refcond.from_pipe(sdxl, "easyref", checkpoint=write(tmp_path / "lora.safetensors", state), **tiny_easyref_overrides(tiny_qwen2vl_dir))


# -- files that are not regular files are refused without being opened ------------------------------------


#: A child process that opens FIFOs for writing (and closes them) every 50 ms after a delay.
_RELEASER = """
import os, sys, time
time.sleep(float(sys.argv[1]))
while True:
    for fifo in sys.argv[2:]:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while nobody reads: nothing to release
        except OSError:
            pass
    time.sleep(0.05)
"""


@contextmanager
def fifo_released_after(fifos: list[Path], seconds: float = 3.0) -> Iterator[None]:
    """After ``seconds``, open each FIFO for writing and close it again, so a reader blocked on it gets EOF.

    Opening a FIFO for reading blocks until a writer comes, in a system call that neither Python's
    signals nor its other threads get past (safetensors holds the GIL); a writer in another process
    turns a regression that opens one into a failed test instead of a hung one.
    """
    releaser = subprocess.Popen([sys.executable, "-c", _RELEASER, str(seconds), *map(str, fifos)])
    try:
        yield
    finally:
        releaser.kill()
        releaser.wait()


def special_files(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    links = {"fifo": fifo, "symlink-to-fifo": tmp_path / "link.safetensors", "folder": tmp_path / "folder.safetensors"}
    links["symlink-to-fifo"].symlink_to(fifo)
    links["folder"].mkdir()
    links["symlink-to-device"] = tmp_path / "null.safetensors"
    links["symlink-to-device"].symlink_to("/dev/zero")
    links["broken-symlink"] = tmp_path / "gone.safetensors"
    links["broken-symlink"].symlink_to(tmp_path / "nowhere.safetensors")
    return links


@pytest.mark.parametrize("reader", ["load", "describe", "read_checkpoint", "read_metadata", "lora"])
def test_special_files_are_refused_without_opening_them(tmp_path: Path, sd15: Any, reader: str) -> None:
    messages = {
        "fifo": r"is a named pipe \(FIFO\), not a regular file",
        "symlink-to-fifo": r"is a named pipe \(FIFO\), not a regular file",
        "folder": r"not found \(it is a folder\)",
        "symlink-to-device": r"is a character device, not a regular file",
        "broken-symlink": r"not found \(a symlink whose target does not exist\)",
    }
    read = {
        "load": lambda path: refcond.load(path, sd15),
        "describe": refcond.describe_checkpoint,
        "read_checkpoint": refcond.read_checkpoint,
        "read_metadata": refcond.read_metadata,
        "lora": lambda path: refcond.from_pipe(sd15, {"injectors": [{"name": "lora", "config": {"loras": [{"path": str(path)}]}}]}),
    }[reader]
    files = special_files(tmp_path)
    for kind, path in files.items():
        if reader == "lora" and kind == "folder":
            continue  # a folder is a valid LoRA location: below
        started = time.perf_counter()
        with fifo_released_after([files["fifo"]]), refused(messages[kind], sd15.unet, seconds=10):
            read(path)
        assert time.perf_counter() - started < 2, f"{kind}: refused only after {time.perf_counter() - started:.1f} s (it was opened)"


def test_a_pickle_path_that_is_a_pipe_is_refused_even_with_allow_pickle(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "weights.bin")
    with fifo_released_after([tmp_path / "weights.bin"]), refused(r"weights\.bin' is a named pipe \(FIFO\), not a regular file", seconds=10):
        refcond.read_checkpoint(tmp_path / "weights.bin", allow_pickle=True)


def test_a_lora_folder_holding_a_pipe_is_refused_without_opening_it(tmp_path: Path, sd15: Any) -> None:
    os.mkfifo(tmp_path / "style.safetensors")
    with fifo_released_after([tmp_path / "style.safetensors"]):
        with refused(r"holds 'style\.safetensors', which is not a regular file", sd15.unet, seconds=10):
            refcond.from_pipe(sd15, {"injectors": [{"name": "lora", "config": {"loras": [{"path": str(tmp_path)}]}}]})
        with refused(r"LoRA file '.*style\.safetensors' is a named pipe \(FIFO\)", sd15.unet, seconds=10):
            refcond.from_pipe(sd15, {"injectors": [{"name": "lora", "config": {"loras": [{"path": str(tmp_path), "weight_name": "style.safetensors"}]}}]})


@pytest.mark.parametrize("checkpoint", [3, ["a.safetensors"], b"a.safetensors"], ids=["int", "list", "bytes"])
def test_a_checkpoint_that_is_not_a_path_is_named(sd15: Any, checkpoint: Any) -> None:
    with refused(r"a checkpoint is a file path \(str or pathlib\.Path\) or a dict of tensors", sd15.unet):
        refcond.from_pipe(sd15, "ip-adapter", checkpoint=checkpoint)


# -- LoRA files ------------------------------------------------------------------------------------------


def test_a_lora_file_with_nan_is_refused_naming_the_key(tmp_path: Path, sd15: Any) -> None:
    from refcond_injectors.testing import fabricate_lora_state_dict

    state = fabricate_lora_state_dict(sd15, "diffusers")
    key = next(k for k in state if "lora_A" in k)
    state[key][0, 0] = float("nan")
    path = write(tmp_path / "nan-lora.safetensors", state)
    with refused(r"(?s)LoRA '.*nan-lora\.safetensors' \(keys as diffusers names them\): .*holds NaN \(1 of", sd15.unet):
        refcond.from_pipe(sd15, {"injectors": [{"name": "lora", "config": {"loras": [{"path": str(path)}]}}]})


def test_a_kohya_lora_with_a_nan_alpha_is_refused(tmp_path: Path, sd15: Any) -> None:
    from refcond_injectors.testing import fabricate_lora_state_dict

    state = fabricate_lora_state_dict(sd15, "kohya")
    key = next(k for k in state if k.endswith(".alpha"))
    state[key] = torch.tensor(float("nan"))
    path = write(tmp_path / "alpha.safetensors", state)
    with refused(r"alpha.*(holds NaN|is nan)", sd15.unet):
        refcond.from_pipe(sd15, {"injectors": [{"name": "lora", "config": {"loras": [{"path": str(path)}]}}]})


def test_a_lora_file_with_integer_weights_is_refused(tmp_path: Path, sd15: Any) -> None:
    from refcond_injectors.testing import fabricate_lora_state_dict

    state = fabricate_lora_state_dict(sd15, "diffusers")
    key = next(k for k in state if "lora_B" in k)
    state[key] = torch.ones_like(state[key], dtype=torch.int32)
    path = write(tmp_path / "int-lora.safetensors", state)
    with refused(r"holds int32 values; LoRA weights are floating-point", sd15.unet):
        refcond.from_pipe(sd15, {"injectors": [{"name": "lora", "config": {"loras": [{"path": str(path)}]}}]})


@pytest.mark.parametrize(("layout", "half"), [("diffusers", "lora_A"), ("diffusers", "lora_B"), ("attn-procs", "up")])
def test_half_a_lora_pair_is_refused(tmp_path: Path, sd15: Any, layout: str, half: str) -> None:
    """PEFT would leave the missing half as uninitialised memory: images that are NaN on some runs and not on others."""
    from refcond_injectors.testing import fabricate_lora_state_dict

    state = fabricate_lora_state_dict(sd15, layout)
    dropped = next(k for k in sorted(state) if f".{half}." in k or f"_lora.{half}." in k)
    del state[dropped]
    path = write(tmp_path / "partial.safetensors", state)
    with refused(r"has no '.*': the file holds half of a LoRA pair, and the missing half would be left as uninitialised memory", sd15.unet):
        refcond.from_pipe(sd15, {"injectors": [{"name": "lora", "config": {"loras": [{"path": str(path)}]}}]})


# -- and a good file still loads and generates finite latents -----------------------------------------------


def test_a_good_refcond_file_still_loads_and_generates(tmp_path: Path, sd15: Any, refcond_file: Any) -> None:
    tensors, metadata = refcond_file
    rp = refcond.load(write(tmp_path / "good.safetensors", tensors, metadata), sd15)
    try:
        assert torch.isfinite(generate(rp)).all()
        info = refcond.describe_checkpoint(tmp_path / "good.safetensors")
        assert info["format_version"] == native.FORMAT_VERSION and json.loads(metadata[native.COMPOSITION_KEY]) == info["composition"]
    finally:
        rp.detach()
