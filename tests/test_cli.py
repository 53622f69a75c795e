"""The ``refcond`` command line, driven through click's CliRunner on tiny offline models."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

import refcond
import refcond.aggregators
from refcond.cli import CliState, cli, main
from refcond.cli.generate import parse_overrides
from refcond.testing import reference_images, tiny_sd15_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1.5 pipeline saved as a local diffusers folder, as `--model` takes it."""
    folder = tmp_path_factory.mktemp("model")
    tiny_sd15_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ip_adapter_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An IP-Adapter checkpoint in the official layout, with random weights for the tiny pipeline."""
    from refcond_injectors import testing

    pipe = tiny_sd15_pipeline()
    path = tmp_path_factory.mktemp("ckpt") / "ip-adapter_tiny.safetensors"
    save_file(testing.fabricate_ip_adapter_state_dict(pipe.unet, pipe.image_encoder, seed=3), str(path))
    return path


@pytest.fixture(scope="module")
def ref_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("refs")
    args = []
    for i, image in enumerate(reference_images(3)):
        image.save(folder / f"ref{i}.png")
        args += ["--ref", str(folder / f"ref{i}.png")]
    return args


def invoke(*args: str, obj: CliState | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], obj=obj)


def assert_clean_error(result: Result, exit_code: int, *fragments: str) -> None:
    """An ``Error: ...`` message with the given exit code, and no traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Error:" in result.stderr and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr


# -- help and plugins ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["plugins"], ["generate"], ["demo"]], ids=["refcond", "plugins", "generate", "demo"])
def test_every_help_text_describes_the_command_and_shows_examples(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: refcond {' '.join(command)}".rstrip())
    assert "Examples:" in result.output
    assert f"refcond {' '.join(command)}".rstrip() in result.output.split("Examples:")[1]


def test_plugins_lists_every_plugin_with_its_components():
    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("refcond-aggregators", "refcond-backbones", "refcond-encoders", "hooks: refcond_register_aggregators"):
        assert text in out
    assert "weighted-mean" in out and "Weighted average of the references" in out
    assert "clip -> mean -> cross-attention" in out  # a composition shows its recipe
    assert "failed" not in out.lower()


def test_plugins_json_has_stable_keys_and_the_builtin_components():
    result = invoke("plugins", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"refcond_version", "plugins", "failures"}
    assert data["failures"] == []
    plugins = {p["name"]: p for p in data["plugins"]}
    assert set(plugins["refcond-aggregators"]) == {"name", "distribution", "version", "hooks", "failed", "components"}
    assert plugins["refcond-aggregators"]["distribution"] == "refcond"
    assert plugins["refcond-aggregators"]["version"] == refcond.__version__
    components = {(c["kind"], c["name"]) for p in data["plugins"] for c in p["components"]}
    assert {
        ("backbone", "sd15"),
        ("backbone", "sdxl"),
        ("encoder", "clip"),
        ("aggregator", "mean"),
        ("checkpoint_format", "refcond"),
    } <= components
    mean = next(c for c in plugins["refcond-aggregators"]["components"] if c["name"] == "weighted-mean")
    assert mean["config"] == "refcond.aggregators.MeanConfig"
    assert "config_schema" not in mean


def test_plugins_schema_shows_each_components_options():
    data = json.loads(invoke("plugins", "--json", "--schema").stdout)
    clip = next(c for p in data["plugins"] for c in p["components"] if c["name"] == "clip")
    assert clip["config_schema"]["properties"]["output"]["enum"] == ["image_embeds", "hidden_states"]
    text = invoke("plugins", "--schema").output
    assert 'output: "image_embeds"|"hidden_states" = "image_embeds"' in text
    assert "weights: list[float] | None = null" in text


class BrokenEncoders:
    """A plugin whose registration hook raises."""

    __name__ = "broken-encoders"

    @refcond.hookimpl
    def refcond_register_encoders(self, register):
        raise RuntimeError("boom: missing dependency")


def test_plugins_shows_a_plugin_that_failed_and_keeps_the_others():
    plugins = refcond.from_modules(refcond.aggregators, BrokenEncoders())
    text = invoke("plugins", obj=CliState(plugins))
    assert text.exit_code == 0, text.output
    assert "broken-encoders" in text.output and "[FAILED, see below]" in text.output
    assert "failed to register: refcond_register_encoders: RuntimeError: boom: missing dependency" in text.output
    assert "weighted-mean" in text.output
    data = json.loads(invoke("plugins", "--json", obj=CliState(plugins)).stdout)
    assert data["failures"] == [
        {
            "plugin": "broken-encoders",
            "distribution": None,
            "stage": "register",
            "error": "refcond_register_encoders: RuntimeError: boom: missing dependency",
        }
    ]
    assert {p["name"]: p["failed"] for p in data["plugins"]} == {"refcond.aggregators": False, "broken-encoders": True}


# -- generate -----------------------------------------------------------------------------------


def test_parse_overrides_turns_set_items_into_role_overrides():
    assert parse_overrides(["aggregator=concat", "encoder.output=hidden_states", "encoder.hidden_layer=-1"]) == {
        "aggregator": {"name": "concat"},
        "encoder": {"config": {"output": "hidden_states", "hidden_layer": -1}},
    }
    assert parse_overrides(["injectors.0.scale=0.5", "injector.cross-attention.input_dim=null"]) == {
        "injectors": {"0": {"config": {"scale": 0.5}}, "cross-attention": {"config": {"input_dim": None}}}
    }
    assert parse_overrides(["injectors=cross-attention,lora", "aggregator.weights=[1, 2]"]) == {
        "injectors": ["cross-attention", "lora"],
        "aggregator": {"config": {"weights": [1, 2]}},
    }


def test_generate_writes_the_image_and_a_json_report(model_dir, ip_adapter_file, ref_args, tmp_path):
    out = tmp_path / "new" / "folder" / "cat.png"
    result = invoke(
        "generate", "--model", model_dir, "--checkpoint", ip_adapter_file, *ref_args, "--prompt", "a cat",
        "--steps", 2, "--width", 48, "--height", 32, "--seed", 7, "--scale", 0.8, "--out", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    with PIL.Image.open(out) as image:
        assert image.size == (48, 32) and image.mode == "RGB"
    assert report["output"] == str(out.resolve())
    assert (report["width"], report["height"], report["seed"], report["steps"]) == (48, 32, 7, 2)
    assert report["composition"]["name"] == "ip-adapter" and report["backbone"] == "sd15"
    assert report["composition"]["backbone"]["config"]["model"] == str(model_dir)
    assert report["reference_scale"] == 0.8 and len(report["references"]) == 3
    assert report["condition_shape"][0] == 1
    assert set(report["timings"]) == {"prepare", "load", "encode", "generate", "write", "total"}
    assert "[1/3] Loading sd15 pipeline" in result.stderr and "[3/3] Generating (seed 7, 2 steps)" in result.stderr
    assert not list(out.parent.glob(".*.tmp"))  # the atomic write left no temporary file


def test_generate_with_the_same_seed_gives_the_same_image(model_dir, ip_adapter_file, ref_args, tmp_path):
    images = []
    for name in ("a.png", "b.png"):
        args = ["generate", "-m", model_dir, "--checkpoint", ip_adapter_file, *ref_args, "-p", "a cat", "--steps", 2, "--seed", 11]
        result = invoke(*args, "-o", tmp_path / name, "--quiet")
        assert result.exit_code == 0, result.output
        assert result.stdout == "" and "[1/3]" not in result.stderr
        images.append(np.asarray(PIL.Image.open(tmp_path / name)))
    assert np.array_equal(images[0], images[1])


def test_generate_from_a_refcond_checkpoint_needs_no_model_or_composition(model_dir, ref_args, tmp_path):
    """A refcond checkpoint records its composition and the model it was made on."""
    from diffusers import StableDiffusionPipeline

    rp = refcond.from_pipe(StableDiffusionPipeline.from_pretrained(model_dir), "ip-adapter", aggregator="concat")
    checkpoint = rp.save(tmp_path / "mine.safetensors")
    result = invoke("generate", "--checkpoint", checkpoint, *ref_args, "-p", "a cat", "--steps", 2, "-o", tmp_path / "o.png", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == str(model_dir) and report["composition"]["aggregator"]["name"] == "concat"


def test_generate_with_the_lora_tuning_baseline(model_dir, ref_args, tmp_path):
    tuning = json.dumps({"steps": 2, "output_dir": str(tmp_path / "cache")})
    result = invoke(
        "generate", "-m", model_dir, "-c", "lora-tuning", "--set", f"injectors.lora.tuning={tuning}",
        *ref_args, "-p", "a photo of sks", "--steps", 2, "-o", tmp_path / "o.png", "--json", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["condition_shape"] is None and report["composition"]["injectors"][0]["config"]["tuning"]["steps"] == 2
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # the LoRA tuned on the references


def test_generate_with_easyref_and_an_official_checkpoint(model_dir, ref_args, tmp_path, tiny_qwen2vl_dir):
    from diffusers import UNet2DConditionModel
    from refcond_easyref.testing import fabricate_official_checkpoint
    from safetensors.torch import save_file

    from refcond.testing.qwen2vl import MAX_PIXELS, MIN_PIXELS

    official = tmp_path / "model.safetensors"
    save_file(fabricate_official_checkpoint(UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")), str(official))
    result = invoke(
        "generate", "-m", model_dir, "-c", "easyref", "--checkpoint", official, *ref_args, "-p", "a cat", "--steps", 2,
        "--set", f"encoder.model={tiny_qwen2vl_dir}", "--set", "encoder.dtype=float32",
        "--set", f"encoder.min_pixels={MIN_PIXELS}", "--set", f"encoder.max_pixels={MAX_PIXELS}",
        "-o", tmp_path / "o.png", "--json", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["condition_shape"] == [1, 8, 64]  # the file's 8 reference tokens, of the MLLM's width
    assert report["composition"]["injectors"][1]["config"]["layers"]["rank"] == 4


def test_generate_from_a_composition_file_with_set_overrides(model_dir, ref_args, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'encoder = "clip"\naggregator = "mean"\ninjectors = ["cross-attention"]\n'
        f'[backbone]\nname = "sd15"\nconfig = {{ model = {json.dumps(str(model_dir))} }}\n'
    )
    result = invoke(
        "generate", "-c", recipe, *ref_args, "--steps", 1, "--seed", 0, "-o", tmp_path / "x.png", "--json",
        "--set", "aggregator=concat", "--set", "injectors.0.num_tokens=2", "--set", "encoder.output=hidden_states",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    comp = report["composition"]
    assert comp["aggregator"]["name"] == "concat"
    assert comp["injectors"][0]["config"]["num_tokens"] == 2
    assert comp["encoder"]["config"]["output"] == "hidden_states"
    assert report["condition_shape"][:2] == [1, 3 * 17]  # 3 references x 17 CLIP tokens each, concatenated
    assert "Warning: no --checkpoint" in result.stderr
    with PIL.Image.open(tmp_path / "x.png") as image:
        assert image.size == (refcond.testing.IMAGE_SIZE, refcond.testing.IMAGE_SIZE)


@pytest.mark.parametrize(
    ("args", "exit_code", "fragments"),
    [
        (["--ref", "missing.png"], 1, ["reference 0 ('missing.png'): file not found"]),
        (["-c", "ip-adaptor"], 1, ["unknown composition 'ip-adaptor'. Did you mean 'ip-adapter'?", "Available compositions: 'easyref', 'ip-adapter'"]),
        (["--set", "encoder.ouput=hidden_states"], 1, ["encoder 'clip'", "unknown field 'ouput'. Did you mean 'output'?"]),
        (["--set", "encodr.output=x"], 1, ["unknown composition role 'encodr'. Did you mean 'encoder'?"]),
        (["--set", "aggregator=meen"], 1, ["unknown aggregator 'meen'. Did you mean 'mean'?"]),
        (["--set", "encoder"], 2, ["expected ROLE=NAME or ROLE.FIELD=VALUE"]),
        (["--out", "image.xyz"], 1, ["cannot tell the image format of output 'image.xyz'"]),
        (["--width", "50"], 2, ["50 is not a multiple of 8"]),
        (["--scale", "strong"], 2, ["neither a number"]),
        (["--weights", "1,2"], 2, ["got 2 weights for 3 references"]),
    ],
    ids=["missing-ref", "unknown-composition", "field-typo", "role-typo", "unknown-component", "set-syntax",
         "out-format", "odd-width", "bad-scale", "weights-count"],
)  # fmt: skip
def test_generate_reports_bad_input_before_loading_the_model(model_dir, ref_args, tmp_path, args, exit_code, fragments):
    base = ["generate", "--model", model_dir, "--out", tmp_path / "out.png"]
    refs = [] if "--ref" in args else ref_args
    result = invoke(*base, *refs, *args)
    assert_clean_error(result, exit_code, *fragments)
    assert "[1/3]" not in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_generate_reports_missing_models_and_unsafe_checkpoints(ref_args, model_dir, tmp_path):
    assert_clean_error(invoke("generate", *ref_args), 2, "no model to load: pass --model")
    assert_clean_error(invoke("generate", *ref_args, "-m", tmp_path / "nowhere"), 1, "cannot find a diffusers pipeline at")
    pickle_file = tmp_path / "ip-adapter.bin"
    torch.save({"x": torch.zeros(1)}, pickle_file)
    result = invoke("generate", *ref_args, "-m", model_dir, "--checkpoint", pickle_file)
    assert_clean_error(result, 1, "is a pickle file", "--allow-pickle")


# -- entry points -------------------------------------------------------------------------------


def test_console_script_and_python_m_run_the_cli():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="refcond")
    assert script.load() is main
    done = subprocess.run([sys.executable, "-m", "refcond", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: refcond [OPTIONS] COMMAND") and "generate" in done.stdout


def test_parse_overrides_reaches_nested_fields():
    assert parse_overrides(["injectors.lora.layers.rank=4", "injectors.lora.layers.scale=0.5"]) == {
        "injectors": {"lora": {"config": {"layers": {"rank": 4, "scale": 0.5}}}}
    }


def test_generate_with_an_encoder_that_reads_the_prompt_and_fresh_weights(model_dir, ref_args, tmp_path, tiny_qwen2vl_dir):
    """easyref's mllm reads the prompt (append_prompt); without --checkpoint only the composition's own weights are fresh."""
    from refcond.testing.qwen2vl import MAX_PIXELS, MIN_PIXELS

    result = invoke(
        "generate", "-m", model_dir, "-c", "easyref", *ref_args, "-p", "a cat", "--steps", 1, "--seed", 3,
        "--set", f"encoder.model={tiny_qwen2vl_dir}", "--set", "encoder.dtype=float32", "--set", "encoder.append_prompt=true",
        "--set", f"encoder.min_pixels={MIN_PIXELS}", "--set", f"encoder.max_pixels={MAX_PIXELS}",
        "--set", "aggregator.num_tokens=4", "--set", "injectors.lora.layers.rank=2",
        "-o", tmp_path / "o.png", "--json", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["condition_shape"] == [1, 4, 64]
    assert report["composition"]["injectors"][1]["config"]["layers"] == {"rank": 2, "targets": ["to_q", "to_k", "to_v", "to_out.0"], "scale": 1.0}
    warning = next(line for line in result.stderr.splitlines() if "no --checkpoint" in line)
    assert "(seed 3)" in warning and "encoder." not in warning  # the borrowed MLLM is not fresh


def test_generate_with_the_same_seed_gives_the_same_fresh_weights(model_dir, ref_args, tmp_path):
    images = []
    for name, seed in (("a.png", 5), ("b.png", 5), ("c.png", 6)):
        result = invoke("generate", "-m", model_dir, *ref_args, "-p", "a cat", "--steps", 2, "--seed", seed, "-o", tmp_path / name, "--quiet")
        assert result.exit_code == 0, result.output
        images.append(np.asarray(PIL.Image.open(tmp_path / name), dtype=np.int16))
    assert np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])


@pytest.mark.parametrize(
    ("device", "fragment"),
    [("quantum", "'quantum' is not a device"), (f"cuda:{torch.cuda.device_count() + 3}", "is not available on this machine")],
    ids=["unknown", "absent"],
)
def test_generate_refuses_a_device_this_machine_lacks_in_one_line(model_dir, ref_args, tmp_path, device, fragment):
    result = invoke("generate", "-m", model_dir, *ref_args, "--device", device, "-o", tmp_path / "o.png")
    assert_clean_error(result, 2, fragment)


# -- --set values no configuration holds: one Error line, before the model loads ----------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("injectors.0.scale=NaN", "NaN is not a number a configuration takes"),
        ("injectors.0.scale=-Infinity", "-Infinity is not a number a configuration takes"),
        ("injectors.0.scale=[1, NaN]", "NaN is not a number a configuration takes"),
        ("injectors.0.num_tokens=" + "9" * 5000, "holds an integer too long to read"),
        ("injectors.0.scale=" + "[" * 100_000 + "]" * 100_000, "the value is nested too deeply"),
        ("injectors.0.scale=" + "[" * 40 + "]" * 40, "nested more than 32 levels deep"),
        ("injectors.0.num_tokens=" + "9" * 30, "is an integer of 30 digits"),
        ("injectors.0.num_tokens=100000000000", "num_tokens: Input should be less than or equal to 4096"),
        ("injectors.0.resampler_depth=9223372036854775807", "resampler_depth: Input should be less than or equal to 64"),
        ("injectors.0.scale=nan", "scale: Input should be a finite number"),
        ("encoder.model=./missing", "is not a folder that exists, and not a valid Hugging Face hub id"),
        ("encoder." + ".".join(["a"] * 40) + "=1", "nested more than 32 levels deep"),
    ],
    ids=["nan", "inf", "nan-in-list", "5000-digits", "deep-json", "nested-json", "30-digits", "tokens", "depth", "nan-text",
         "missing-folder", "deep-key"],
)  # fmt: skip
def test_generate_refuses_set_values_no_configuration_holds_in_one_line(model_dir, ref_args, tmp_path, value, fragment):
    result = invoke("generate", "--model", model_dir, *ref_args, "--set", value, "--steps", 1, "--out", tmp_path / "o.png", "--quiet")
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "o.png").exists()


def test_set_values_that_are_quoted_json_strings_stay_text():
    assert parse_overrides(['encoder.instruction="NaN"', "encoder.output=hidden_states"]) == {
        "encoder": {"config": {"instruction": "NaN", "output": "hidden_states"}}
    }
