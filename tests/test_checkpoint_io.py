"""Checkpoint files: safe reading, atomic writing, format detection, and strict weight loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import refcond
from refcond import CheckpointError, Composition, ImportedCheckpoint
from refcond.building import build, check_state_dict
from refcond.checkpoints import (
    import_checkpoint,
    io,
    native,
    read_checkpoint,
    write_safetensors,
)
from refcond.config import EmptyConfig


def weights() -> dict[str, torch.Tensor]:
    return {"encoder.proj.weight": torch.arange(6.0).reshape(2, 3), "injector.0.scale": torch.tensor([0.5])}


# -- reading and writing ---------------------------------------------------------------------


def test_safetensors_round_trip_keeps_tensors_and_metadata(tmp_path):
    path = write_safetensors(tmp_path / "sub" / "w.safetensors", weights(), {"author": "me"})
    state_dict, metadata = read_checkpoint(path)
    assert state_dict.keys() == weights().keys()
    for key, tensor in weights().items():
        assert torch.equal(state_dict[key], tensor)
    assert metadata == {"author": "me"}


def test_writing_leaves_no_temporary_file(tmp_path):
    write_safetensors(tmp_path / "w.safetensors", weights())
    write_safetensors(tmp_path / "w.safetensors", weights())  # overwrite in place
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_safetensors(tmp_path / "w.safetensors", weights(), {"version": "old"})

    def crash_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(path, {"other": torch.zeros(1)}, {"version": "new"})
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert read_checkpoint(path)[1] == {"version": "old"}


def test_tied_weights_are_written(tmp_path):
    shared = torch.ones(2, 2)
    state_dict, _ = read_checkpoint(write_safetensors(tmp_path / "tied.safetensors", {"a": shared, "b": shared}))
    assert torch.equal(state_dict["a"], state_dict["b"])


def test_writing_non_tensors_or_non_string_metadata_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"key 'step' holds a int, not a tensor"):
        write_safetensors(tmp_path / "w.safetensors", {"step": 3})
    with pytest.raises(CheckpointError, match=r"metadata must map str to str; not strings: \{'epoch': 'int'\}"):
        write_safetensors(tmp_path / "w.safetensors", weights(), {"epoch": 3})
    assert not list(tmp_path.iterdir())


def save_pickle(path: Path) -> Path:
    # the layout of the original IP-Adapter .bin files: one nested dict per part
    torch.save({"image_proj": {"proj.weight": torch.ones(4, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(3, 2)}}, path)
    return path


def test_pickle_files_are_refused_without_opt_in(tmp_path):
    path = save_pickle(tmp_path / "ip-adapter.bin")
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert "is a pickle file, which can run arbitrary code when loaded" in message
    assert "Convert it to .safetensors, or pass allow_pickle=True (CLI: --allow-pickle)" in message


def test_pickle_files_are_read_and_flattened_with_opt_in(tmp_path):
    state_dict, metadata = read_checkpoint(save_pickle(tmp_path / "ip-adapter.bin"), allow_pickle=True)
    assert sorted(state_dict) == ["image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"]
    assert state_dict["image_proj.proj.weight"].shape == (4, 2)
    assert metadata == {}


def test_pickles_with_more_than_tensors_are_refused_even_with_opt_in(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "step": 7}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint key 'step' holds a int, not a tensor"):
        read_checkpoint(tmp_path / "mixed.pt", allow_pickle=True)
    torch.save(torch.ones(2), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"holds a Tensor, not a dict of tensors"):
        read_checkpoint(tmp_path / "bare.pt", allow_pickle=True)


def test_pickles_that_need_arbitrary_code_are_refused_even_with_opt_in(tmp_path):
    torch.save({"w": torch.ones(1), "obj": Path("x")}, tmp_path / "code.ckpt")  # weights_only cannot rebuild a Path
    with pytest.raises(CheckpointError, match=r"code\.ckpt' could not be read as a torch file"):
        read_checkpoint(tmp_path / "code.ckpt", allow_pickle=True)


@pytest.mark.parametrize("content", [b"not safetensors at all", b""], ids=["garbage", "empty"])
def test_a_corrupt_safetensors_file_names_the_file(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"checkpoint '{path}' is not a valid safetensors file"):
        read_checkpoint(path)


def test_a_truncated_safetensors_file_names_the_file(tmp_path):
    path = write_safetensors(tmp_path / "cut.safetensors", {"w": torch.ones(64, 64)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.safetensors' is not a valid safetensors file"):
        read_checkpoint(path)


def test_missing_files_folders_and_unknown_suffixes(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors' not found\."):
        read_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match=r"not found \(it is a folder\)"):
        read_checkpoint(tmp_path)
    (tmp_path / "w.npz").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match=r"unknown file type '\.npz'; expected \.safetensors \(or, with allow_pickle=True, one of \.bin, \.pt"):
        read_checkpoint(tmp_path / "w.npz")


# -- formats -----------------------------------------------------------------------------------

COMPOSITION = {"backbone": "toy", "encoder": "toy", "aggregator": "toy-linear", "injectors": ["toy"]}


def test_import_checkpoint_reads_refcond_files(tmp_path):
    registry = refcond.from_modules(native).registry
    path = write_safetensors(tmp_path / "mine.safetensors", weights(), native.metadata_for(COMPOSITION))
    imported = import_checkpoint(path, registry)
    assert isinstance(imported, ImportedCheckpoint)
    assert imported.composition == COMPOSITION
    assert imported.source == "refcond"
    assert imported.state_dict.keys() == weights().keys()


def test_import_checkpoint_lists_known_formats_and_the_first_keys_when_none_matches(tmp_path):
    registry = refcond.from_modules(native).registry
    path = write_safetensors(tmp_path / "mystery.safetensors", {f"layer{i}.weight": torch.zeros(1) for i in range(8)})
    with pytest.raises(CheckpointError) as excinfo:
        import_checkpoint(path, registry)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: no registered checkpoint format recognises this file")
    assert "(first keys: layer0.weight, layer1.weight, layer2.weight, layer3.weight, layer4.weight)" in message
    assert "Known formats: refcond." in message
    assert "Install the plugin that provides its format" in message


def test_a_newer_refcond_file_says_to_upgrade(tmp_path):
    registry = refcond.from_modules(native).registry
    metadata = {**native.metadata_for(COMPOSITION), native.VERSION_KEY: "99"}
    path = write_safetensors(tmp_path / "future.safetensors", weights(), metadata)
    with pytest.raises(CheckpointError, match=r"future\.safetensors: refcond checkpoint format version '99' is not supported.*Upgrade refcond"):
        import_checkpoint(path, registry)


class BuggyFormat:
    """A format plugin with a bug in convert()."""

    def detect(self, state_dict, metadata):
        return "magic" in state_dict

    def convert(self, state_dict, metadata, backbone):
        return state_dict["missing-key"]


class BuggyFormatPlugin:
    __name__ = "buggy-format"

    @refcond.hookimpl
    def refcond_register_checkpoint_formats(self, register):
        register("buggy", BuggyFormat())


def test_a_format_plugin_that_crashes_is_named():
    registry = refcond.from_modules(BuggyFormatPlugin()).registry
    with pytest.raises(CheckpointError) as excinfo:
        import_checkpoint({"magic": torch.zeros(1)}, registry)
    message = str(excinfo.value)
    assert "the given state dict: checkpoint format 'buggy' (plugin 'buggy-format') failed to convert the file" in message
    assert "KeyError" in message


# -- strict loading ----------------------------------------------------------------------------


def test_check_state_dict_names_each_key_and_both_shapes():
    expected = {"proj.weight": torch.zeros(4, 2), "proj.bias": torch.zeros(4), "norm.weight": torch.zeros(4)}
    given = {"proj.weight": torch.zeros(4, 3), "proj.bias": torch.zeros(4), "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError) as excinfo:
        check_state_dict(expected, given, prefix="aggregator.")
    assert str(excinfo.value).splitlines() == [
        "checkpoint does not match the model:",
        "  - missing key aggregator.norm.weight (expected shape (4,))",
        "  - unexpected key aggregator.extra (shape (1,))",
        "  - key aggregator.proj.weight: expected shape (4, 2), got (4, 3)",
    ]


def test_check_state_dict_shows_ten_problems_and_counts_the_rest():
    with pytest.raises(CheckpointError) as excinfo:
        check_state_dict({}, {f"k{i:02d}": torch.zeros(1) for i in range(13)})
    lines = str(excinfo.value).splitlines()
    assert len(lines) == 12
    assert lines[-1] == "  - ... and 3 more"


def test_matching_weights_pass():
    check_state_dict({"w": torch.zeros(2)}, {"w": torch.ones(2)})


class ToyComponents:
    """Just enough components to build a composition whose aggregator holds weights."""

    __name__ = "toy-components"

    @refcond.hookimpl
    def refcond_register_backbones(self, register):
        register("toy", lambda config, context: object(), config=EmptyConfig)

    @refcond.hookimpl
    def refcond_register_encoders(self, register):
        register("toy", lambda config, context: object(), config=EmptyConfig)

    @refcond.hookimpl
    def refcond_register_aggregators(self, register):
        register("toy-linear", lambda config, context: torch.nn.Linear(2, 2), config=EmptyConfig)

    @refcond.hookimpl
    def refcond_register_injectors(self, register):
        register("toy", lambda config, context: object(), config=EmptyConfig)


def test_build_loads_a_refcond_checkpoint_into_its_components(tmp_path):
    plugins = refcond.from_modules(native, ToyComponents())
    state = {"aggregator.weight": torch.eye(2), "aggregator.bias": torch.tensor([1.0, 2.0])}
    path = write_safetensors(tmp_path / "toy.safetensors", state, native.metadata_for(COMPOSITION))
    built = build(None, plugins, checkpoint=path)
    assert built.composition == Composition.parse(COMPOSITION)
    assert torch.equal(built.aggregator.bias, torch.tensor([1.0, 2.0]))


def test_build_refuses_a_checkpoint_with_misshaped_weights(tmp_path):
    plugins = refcond.from_modules(native, ToyComponents())
    state = {"aggregator.weight": torch.eye(3), "aggregator.bias": torch.zeros(2)}
    path = write_safetensors(tmp_path / "toy.safetensors", state, native.metadata_for(COMPOSITION))
    with pytest.raises(CheckpointError, match=r"key aggregator\.weight: expected shape \(2, 2\), got \(3, 3\)"):
        build(None, plugins, checkpoint=path)


def test_build_refuses_keys_for_a_role_the_composition_lacks(tmp_path):
    plugins = refcond.from_modules(native, ToyComponents())
    state = {"aggregator.weight": torch.eye(2), "aggregator.bias": torch.zeros(2), "injector.3.w": torch.zeros(1)}
    path = write_safetensors(tmp_path / "toy.safetensors", state, native.metadata_for(COMPOSITION))
    with pytest.raises(CheckpointError, match=r"key 'injector\.3\.w' belongs to role 'injector\.3', which this composition does not have\. Roles: encoder, aggregator, injector\.0\."):
        build(None, plugins, checkpoint=path)



def test_written_files_follow_the_umask_not_private_temp_modes(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_safetensors(tmp_path / "shared.safetensors", weights())
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
