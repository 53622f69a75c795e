"""Fuzzing the checkpoints: every file is loaded, or refused with a RefcondError, and the UNet stays as it was.

Generated checkpoints start valid — refcond checkpoints (``rp.save`` of the ``ip-adapter`` and
``easyref`` compositions), official IP-Adapter base and Plus files, an official EasyRef file, LoRA files in the
diffusers and Kohya layouts — and are then mutated:

- metadata: ``refcond.composition`` / ``refcond.provenance`` / ``refcond.format_version`` replaced by
  random JSON of any shape (NaN, infinities, huge integers, deep nesting) or text, one part of the
  composition (a role, a config, a value) replaced or dropped, keys dropped or added;
- keys: renamed (random text, control characters, empty, a huge or non-ASCII index, another role's
  name for the same weight), dropped, added, duplicated under another role name;
- tensors: another shape (0-d, empty dimensions), another dtype (int, bool, half, double, complex),
  NaN / inf / huge values at one place or everywhere;
- bytes: truncated, header or data bytes flipped, the header length rewritten, garbage appended;
- paths that are not regular files: FIFOs, symlinks to FIFOs, devices or nowhere, folders, loops.

Each is loaded through :func:`refcond.from_pipe` (``ip-adapter`` / ``easyref`` / a ``lora`` injector),
:func:`refcond.load` and :func:`refcond.describe_checkpoint`; an accepted file generates once (1 step, latents) and the
pipeline is detached. :func:`fuzzing.guard` classifies each input (see fuzzing.py).
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzzing import TALLY, guard, same_state, unet_state
from hypothesis import assume, given
from hypothesis import strategies as st
from refcond_easyref.testing import fabricate_official_checkpoint, tiny_easyref_overrides
from refcond_injectors.testing import fabricate_ip_adapter_state_dict, fabricate_lora_state_dict
from safetensors.torch import save, save_file

import refcond
from refcond.checkpoints import native
from refcond.testing import reference_images, save_tiny_qwen2vl, tiny_sd15_pipeline, tiny_sdxl_pipeline

SURFACE = "checkpoints"
KINDS = ("refcond", "refcond-easyref", "ip-base", "ip-plus", "easyref", "lora-diffusers", "lora-kohya")
#: The kinds whose files are refcond checkpoints (metadata and all).
REFCOND_KINDS = ("refcond", "refcond-easyref")
#: The kinds loaded on the SDXL pipeline.
SDXL_KINDS = ("refcond-easyref", "easyref")

#: Text of any Unicode but lone surrogates (a safetensors key or metadata value is UTF-8).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=16,
)
#: Values planted in a tensor: refused ones (non-finite, beyond float16's range) and ones that load.
BAD_VALUES = (float("nan"), float("inf"), float("-inf"), 65505.0, -7e4, 1e30, 3.4e38)
GOOD_VALUES = (0.0, -1.0, 3.0, 100.0, 65504.0, -65504.0, 1e-30)
DTYPES = (torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.float16, torch.bfloat16, torch.float64, torch.complex64)


class World:
    """The tiny pipelines, the valid checkpoints the mutations start from, and a folder for the files."""

    def __init__(self, sd15: Any, sdxl: Any, overrides: dict[str, Any], bases: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]], folder: Path) -> None:
        self.sd15, self.sdxl, self.overrides, self.bases, self.folder = sd15, sdxl, overrides, bases, folder
        self.references = reference_images(2)

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return "World(tiny sd15 and sdxl pipelines, valid checkpoints: " + ", ".join(self.bases) + ")"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    folder = tmp_path_factory.mktemp("fuzz-checkpoints")
    sd15, sdxl = tiny_sd15_pipeline(), tiny_sdxl_pipeline()
    overrides = tiny_easyref_overrides(save_tiny_qwen2vl(folder / "qwen2vl"))
    saved = {}
    for kind, rp in (("refcond", refcond.from_pipe(sd15, "ip-adapter", seed=0)), ("refcond-easyref", refcond.from_pipe(sdxl, "easyref", seed=0, **overrides))):
        with pytest.warns(UserWarning, match="built in memory"):
            saved[kind] = refcond.read_checkpoint(rp.save(folder / f"{kind}.safetensors"))  # the MLLM is borrowed: named, not stored
        rp.detach()
    bases = {
        **saved,
        "ip-base": (fabricate_ip_adapter_state_dict(sd15.unet, sd15.image_encoder, "base", seed=1), {}),
        "ip-plus": (fabricate_ip_adapter_state_dict(sd15.unet, sd15.image_encoder, "plus", seed=2, resampler_depth=2), {}),
        "easyref": (fabricate_official_checkpoint(sdxl.unet, seed=3), {"format": "pt"}),
        "lora-diffusers": (fabricate_lora_state_dict(sd15, "diffusers", seed=4), {}),
        "lora-kohya": (fabricate_lora_state_dict(sd15, "kohya", seed=5), {}),
    }
    return World(sd15, sdxl, overrides, bases, folder)


# -- running one input ------------------------------------------------------------------------------


def load(world: World, kind: str, path: Any, how: int) -> None:
    """Load ``path`` as a ``kind`` file (``how`` picks the entry point); generate once when accepted."""
    pipe = world.sdxl if kind in SDXL_KINDS else world.sd15

    def action() -> Any:
        if kind.startswith("lora"):
            rp = refcond.from_pipe(pipe, lora_only(path))
            try:
                return rp("a cat", num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0)).images
            finally:
                rp.detach()
        if kind in REFCOND_KINDS or how == 1:
            rp = refcond.load(path, pipe, **(world.overrides if kind == "easyref" else {}))
        elif kind == "easyref":
            rp = refcond.from_pipe(pipe, "easyref", checkpoint=path, **world.overrides)
        else:
            rp = refcond.from_pipe(pipe, "ip-adapter", checkpoint=path)
        try:
            return rp("a cat", world.references, num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0)).images
        finally:
            rp.detach()

    guard(SURFACE, action, state=lambda: pipeline_state(pipe), same=same_pipeline)


#: The pipeline's models an input may touch: the UNet (injectors, LoRA), the text encoders (LoRA files), the CLIP image encoder (borrowed).
MODELS = ("text_encoder", "text_encoder_2", "image_encoder", "vae")


def pipeline_state(pipe: Any) -> dict[str, Any]:
    """:func:`fuzzing.unet_state` of the UNet, and the weights and module classes of the pipeline's other models."""
    state = {"unet": unet_state(pipe.unet)}
    for name in MODELS:
        model = getattr(pipe, name, None)
        if model is not None:
            state[name] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()])
    return state


def same_pipeline(before: dict[str, Any], after: dict[str, Any]) -> bool:
    if before.keys() != after.keys() or not same_state(before["unet"], after["unet"]):
        return False
    for name in before.keys() - {"unet"}:
        (weights, modules), (weights_after, modules_after) = before[name], after[name]
        if modules != modules_after or weights.keys() != weights_after.keys() or not all(torch.equal(weights[k], weights_after[k]) for k in weights):
            return False
    return True


def lora_only(path: Any) -> dict[str, Any]:
    return {"injectors": [{"name": "lora", "config": {"loras": [{"path": str(path)}]}}]}


def describe(path: Any) -> None:
    guard(SURFACE, lambda: refcond.describe_checkpoint(path))


counter = itertools.count()


def write(world: World, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path = world.folder / f"example{next(counter)}.safetensors"
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    except Exception:  # noqa: BLE001 - a file safetensors cannot write (e.g. a key it refuses) is no input
        assume(False)
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_the_valid_checkpoints_load_and_generate(world: World, kind: str) -> None:
    """The starting points are accepted and generate finite latents (else the mutations would prove nothing)."""
    tensors, metadata = world.bases[kind]
    before = sum(c.get("accepted", 0) for c in TALLY.counts.values())
    load(world, kind, write(world, tensors, metadata), 0)
    assert sum(c.get("accepted", 0) for c in TALLY.counts.values()) == before + 1, f"the valid {kind} checkpoint was refused"


# -- metadata ----------------------------------------------------------------------------------------


def deep(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a": ' * depth + "1" + "}" * depth


def replace_inside(value: Any, data: st.DataObject) -> Any:
    """``value`` (a JSON tree) with one node replaced by random JSON, or dropped from its object/array."""
    if not isinstance(value, (dict, list)) or not value or data.draw(st.integers(0, 3)) == 0:
        return data.draw(JSON, label="replacement")
    keys = list(value) if isinstance(value, dict) else list(range(len(value)))
    key = data.draw(st.sampled_from(keys), label="inside")
    out = dict(value) if isinstance(value, dict) else list(value)
    if data.draw(st.integers(0, 4)) == 0:
        del out[key]
    else:
        out[key] = replace_inside(value[key], data)
    return out


def metadata_value(current: str | None, data: st.DataObject) -> str:
    choice = data.draw(st.sampled_from(["json", "inside", "deep", "digits", "text", "nan"]), label="metadata mutation")
    if choice == "json":
        return json.dumps(data.draw(JSON, label="json"))
    if choice == "inside" and current is not None:
        try:
            return json.dumps(replace_inside(json.loads(current), data))
        except (ValueError, RecursionError):  # not JSON, or nested deeper than Python reads (a previous mutation)
            return current
    if choice == "deep":
        return deep(data.draw(st.sampled_from([20, 33, 40, 1000, 100_000])), data.draw(st.sampled_from(["list", "object"])))
    if choice == "digits":
        return data.draw(st.sampled_from(["", "-"])) + "9" * data.draw(st.sampled_from([19, 20, 400, 5000]))
    if choice == "nan":
        return data.draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", '{"injectors": NaN}', '{"injectors": ["lora"], "name": 1e400}']))
    return data.draw(TEXT, label="text")


@given(data=st.data())
def test_metadata(world: World, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(REFCOND_KINDS), label="kind")
    tensors, metadata = world.bases[kind]
    metadata = dict(metadata)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        key = data.draw(st.sampled_from([native.COMPOSITION_KEY, native.PROVENANCE_KEY, native.VERSION_KEY, "other"]), label="key")
        if key == "other":
            metadata[data.draw(TEXT, label="new key")] = data.draw(TEXT, label="its value")
        elif data.draw(st.integers(0, 5)) == 0:
            metadata.pop(key, None)
        else:
            metadata[key] = metadata_value(metadata.get(key), data)
    path = write(world, tensors, metadata)
    load(world, kind, path, 0)
    describe(path)


# -- keys --------------------------------------------------------------------------------------------


def renamed(key: str, kind: str, data: st.DataObject) -> str:
    parts = key.split(".")
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    choice = data.draw(st.sampled_from(["text", "index", "part", "role", "prefix"]), label="rename")
    if choice == "index" and numeric:
        i = data.draw(st.sampled_from(numeric))
        parts[i] = data.draw(st.sampled_from(["99999999999", "4", "01", "-1", "٣", "9" * 5000, "", str(int(parts[i]) + 1)]))
        return ".".join(parts)
    if choice == "part":
        i = data.draw(st.integers(0, len(parts) - 1))
        parts[i] = data.draw(TEXT)
        return ".".join(parts)
    if choice == "role" and kind in REFCOND_KINDS and key.startswith(("injector.0.", "injector.1.")):
        return "injector." + data.draw(st.sampled_from(["cross-attention", "lora", "0", "1", "2", "99999999", "encoder"])) + key[len("injector.0") :]
    if choice == "prefix":
        prefixes = ["image_proj.", "ip_adapter.", "encoder.", "aggregator.", "injector.0.", "mllm_final_layer.", "image_proj_model.", "unet.", "multimodal_llm.", ""]
        return data.draw(st.sampled_from(prefixes)) + key.split(".", 1)[-1]
    return data.draw(TEXT, label="new name")


def small_tensor(data: st.DataObject) -> torch.Tensor:
    shape = data.draw(st.lists(st.integers(0, 6), max_size=3), label="shape")
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))


@given(data=st.data())
def test_keys(world: World, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    tensors, metadata = world.bases[kind]
    tensors = dict(tensors)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        key = data.draw(st.sampled_from(sorted(tensors)), label="key")
        choice = data.draw(st.sampled_from(["rename", "drop", "drop-group", "add", "duplicate"]), label="mutation")
        if choice == "rename":
            tensors[renamed(key, kind, data)] = tensors.pop(key)
        elif choice == "drop" and len(tensors) > 1:
            del tensors[key]
        elif choice == "drop-group":  # e.g. every key of one resampler layer, or the whole LoRA
            group = key.rsplit(".", data.draw(st.integers(1, 3)))[0] + "."
            tensors = {k: v for k, v in tensors.items() if not k.startswith(group)} or tensors
        elif choice == "add":
            tensors[renamed(key, kind, data)] = small_tensor(data)
        else:
            tensors[renamed(key, kind, data)] = tensors[key].clone()
    path = write(world, tensors, metadata)
    load(world, kind, path, data.draw(st.integers(0, 1), label="how"))


# -- tensors -----------------------------------------------------------------------------------------


def mutated(tensor: torch.Tensor, data: st.DataObject) -> torch.Tensor:
    choice = data.draw(st.sampled_from(["value", "shape", "dtype", "value", "fill", "0-d", "transpose"]), label="tensor mutation")
    if choice == "shape":
        return small_tensor(data)
    if choice == "dtype":
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        return (tensor > 0) if dtype == torch.bool else tensor.to(dtype)
    if choice == "0-d":
        return torch.tensor(data.draw(st.sampled_from(GOOD_VALUES + BAD_VALUES)))
    if choice == "transpose" and tensor.ndim >= 2:
        return tensor.transpose(0, -1).contiguous()
    out = tensor.clone() if tensor.is_floating_point() else tensor.float()
    if choice == "fill":
        return out.fill_(data.draw(st.sampled_from(BAD_VALUES + (0.0, 1.0)), label="fill"))
    flat = out.view(-1)
    if flat.numel() == 0:
        return out
    flat[data.draw(st.integers(0, flat.numel() - 1), label="at")] = data.draw(st.sampled_from(BAD_VALUES + GOOD_VALUES), label="value")
    return out


@given(data=st.data())
def test_tensors(world: World, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    tensors, metadata = world.bases[kind]
    tensors = dict(tensors)
    for _ in range(data.draw(st.integers(1, 2), label="mutations")):
        key = data.draw(st.sampled_from(sorted(tensors)), label="key")
        tensors[key] = mutated(tensors[key], data)
    load(world, kind, write(world, tensors, metadata), data.draw(st.integers(0, 1), label="how"))


# -- bytes -------------------------------------------------------------------------------------------


@given(data=st.data())
def test_bytes(world: World, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    tensors, metadata = world.bases[kind]
    raw = bytearray(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata or None))
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    choice = data.draw(st.sampled_from(["truncate", "header", "data", "length", "append", "garbage"]), label="byte mutation")
    if choice == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    elif choice in ("header", "data"):
        low, high = (8, header - 1) if choice == "header" else (header, len(raw) - 1)
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            raw[data.draw(st.integers(low, high), label="at")] ^= data.draw(st.integers(1, 255), label="bits")
    elif choice == "length":
        raw[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, header - 9, header + 1, len(raw), 2**32, 2**63, 2**64 - 1])))
    elif choice == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64), label="garbage")
    else:
        raw = bytearray(data.draw(st.binary(max_size=256), label="garbage"))
    path = world.folder / f"example{next(counter)}.safetensors"
    path.write_bytes(bytes(raw))
    load(world, kind, path, data.draw(st.integers(0, 1), label="how"))
    if kind in REFCOND_KINDS:
        describe(path)


# -- paths that are not regular files ----------------------------------------------------------------


def special(folder: Path, kind: str) -> Path:
    path = folder / f"special{next(counter)}.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-to-fifo":
        os.mkfifo(folder / f"{path.name}.fifo")
        path.symlink_to(folder / f"{path.name}.fifo")
    elif kind == "folder":
        path.mkdir()
    elif kind == "symlink-to-folder":
        path.symlink_to(folder)
    elif kind == "device":
        path.symlink_to(os.devnull)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "broken-symlink":
        path.symlink_to(folder / "nowhere")
    elif kind == "loop":
        path.symlink_to(path)
    else:  # an empty regular file
        path.write_bytes(b"")
    return path


@given(data=st.data())
def test_special_files(world: World, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["fifo", "symlink-to-fifo", "folder", "symlink-to-folder", "device", "zero", "broken-symlink", "loop", "empty"]))
    path = special(world.folder, kind)
    load(world, data.draw(st.sampled_from(KINDS[:5]), label="as"), path, data.draw(st.integers(0, 1), label="how"))
    describe(path)
    load(world, "lora-diffusers", path, 0)
