"""refcond train: the loss goes down, each stage trains exactly its selection, dropout happens at the
configured rates, a killed run resumes to the same weights, two processes train data-parallel.

Everything runs on the tiny offline models, on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from refcond_easyref.testing import tiny_easyref_overrides

import refcond
from refcond.cli import cli
from refcond.testing import reference_images, tiny_sd15_pipeline
from refcond.training import TrainingData, train
from refcond.training.config import DropoutConfig, LossConfig
from refcond.training.data import collate
from refcond.training.objective import Objective

RESOLUTION = 64


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six samples: two references and a target each, with a caption."""
    folder = tmp_path_factory.mktemp("data")
    for i, image in enumerate(reference_images(6, size=48)):
        image.save(folder / f"{i}.png")
    lines = [json.dumps({"references": [f"{(i + 1) % 6}.png", f"{(i + 2) % 6}.png"], "image": f"{i}.png", "caption": f"a photo of thing {i}"}) for i in range(6)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_sd15_pipeline().save_pretrained(folder)
    return folder


def ip_adapter_run(data_file: Path, output: Path, steps: int = 8, **stage: Any) -> dict[str, Any]:
    return {
        "composition": "ip-adapter",
        "data": {"path": str(data_file), "resolution": RESOLUTION},
        "output": str(output),
        "seed": 3,
        "stages": [{"name": "ip", "train": ["injector.cross-attention"], "steps": steps, "batch_size": 2, "optimizer": {"learning_rate": 1e-3}, **stage}],
    }


def evaluation_loss(rp: refcond.RefcondPipeline, data_file: Path) -> float:
    """The loss on the first four samples with fixed noise and timesteps and no dropout: comparable across weights."""
    data = TrainingData({"path": str(data_file), "resolution": RESOLUTION}, seed=0)
    batch = collate([data[k] for k in range(4)])
    objective = Objective(rp, DropoutConfig(references=0, text=0, both=0), LossConfig())
    with torch.no_grad():
        loss, _ = objective(batch, torch.Generator().manual_seed(0))
    return float(loss)


def test_ip_adapter_training_lowers_the_loss_and_trains_only_its_selection(data_file: Path, tmp_path: Path) -> None:
    pipe = tiny_sd15_pipeline()
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    fresh = refcond.from_pipe(pipe, "ip-adapter", seed=3)  # what training starts from: the same seed
    start, start_loss = fresh.state_dict(), evaluation_loss(fresh, data_file)
    fresh.detach()

    result = train(ip_adapter_run(data_file, tmp_path / "run", steps=12), pipeline=pipe, progress=False)

    trained = refcond.load(result.checkpoint, pipe)
    assert evaluation_loss(trained, data_file) < 0.97 * start_loss
    end = trained.state_dict()
    assert start.keys() == end.keys() and all(k.startswith("injector.0.") for k in end)
    assert all(not torch.equal(start[k], end[k]) for k in end), "a selected parameter did not change"
    trained.detach()
    assert all(torch.equal(unet_before[k], v) for k, v in pipe.unet.state_dict().items()), "the backbone changed"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))


def test_the_trained_ip_adapter_export_loads_in_diffusers_and_generates_as_refcond(data_file: Path, tmp_path: Path) -> None:
    config = {**ip_adapter_run(data_file, tmp_path / "run", steps=2), "export": ["ip-adapter"]}
    result = train(config, pipeline=tiny_sd15_pipeline(), progress=False)
    exported = result.exports["ip-adapter"]
    refs = reference_images(2)

    def latents(pipe: Any, **kwargs: Any) -> torch.Tensor:
        out = pipe(prompt="a photo", num_inference_steps=2, guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs)
        return out.images

    ours = latents(refcond.load(result.checkpoint, tiny_sd15_pipeline()), references=refs)
    theirs = tiny_sd15_pipeline()
    theirs.load_ip_adapter(str(exported.parent), subfolder="", weight_name=exported.name, image_encoder_folder=None)
    # diffusers averages nothing: give it the mean of the references' embeddings, as refcond's 'mean' aggregator makes it.
    embeds = theirs.prepare_ip_adapter_image_embeds([refs], None, "cpu", 1, False)[0].mean(dim=1, keepdim=True)
    expected = latents(theirs, ip_adapter_image_embeds=[embeds])
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_easyref_stages_chain_and_each_trains_only_its_selection(data_file: Path, tmp_path: Path, tiny_qwen2vl_dir: Path) -> None:
    """Stage 1 trains the aggregator and the cross-attention injector; stages 2 and 3 the MLLM and the UNet LoRA too."""
    pipe = tiny_sd15_pipeline()
    roles = tiny_easyref_overrides(tiny_qwen2vl_dir)
    stage = {"steps": 6, "batch_size": 2, "optimizer": {"learning_rate": 1e-3}, "dropout": {"references": 0.1, "text": 0.1, "both": 0.1}}
    alignment = ["aggregator", "injector.cross-attention"]
    finetuning = [*alignment, "encoder", "injector.lora"]
    runs = [
        {"stages": [{"name": "alignment", "train": alignment, **stage}]},
        {"stages": [{"name": "single", "train": finetuning, **stage, "data": {"max_references": 1}}]},
        {"stages": [{"name": "multi", "train": finetuning, **stage, "data": {"truncate_rate": 0.4}}], "export": ["easyref"]},
    ]
    fresh = refcond.from_pipe(pipe, "easyref", seed=3, **roles)
    before, losses = fresh.state_dict(), [evaluation_loss(fresh, data_file)]
    fresh.detach()
    previous: Path | None = None
    for i, run in enumerate(runs):
        config = {"data": {"path": str(data_file), "resolution": RESOLUTION}, "output": str(tmp_path / f"stage{i + 1}"), "seed": 3, **run}
        config.update({"composition": "easyref", "roles": roles} if previous is None else {"from": str(previous)})
        result = train(config, pipeline=pipe, progress=False)
        previous = result.checkpoint
        rp = refcond.load(previous, pipe)
        after = rp.state_dict()
        losses.append(evaluation_loss(rp, data_file))
        rp.detach()
        selected = tuple(f"{p}." for p in ("aggregator", "injector.0", *(("encoder", "injector.1") if i else ())))
        unchanged = {k for k in before if not k.startswith(selected)}
        assert all(torch.equal(before[k], after[k]) for k in unchanged), f"stage {i + 1} changed weights outside its selection"
        assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith(selected)), f"stage {i + 1} left a selected weight as it was"
        assert i == 0 or any(k.startswith("encoder.") for k in after), "a fine-tuned MLLM must be stored"
        before = {**before, **after}
    assert losses[-1] < losses[0], losses
    # The official layout of the last stage's output loads back to the same weights.
    official = refcond.from_pipe(pipe, "easyref", checkpoint=result.exports["easyref"], **roles)
    again = official.state_dict()
    official.detach()
    assert after.keys() <= again.keys() and all(torch.equal(again[k], after[k]) for k in after)


def test_gradient_checkpointing_recomputes_the_mllm_and_unet_to_the_same_weights(
    data_file: Path, tmp_path: Path, tiny_qwen2vl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roles = tiny_easyref_overrides(tiny_qwen2vl_dir)
    stage = {"name": "s", "train": ["encoder", "aggregator"], "steps": 2, "batch_size": 2, "optimizer": {"learning_rate": 1e-3}}
    recomputed = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: recomputed.append(fn) or checkpoint(fn, *a, **k))
    results = []
    for flag in (False, True):
        config = {"composition": "easyref", "roles": roles, "data": {"path": str(data_file), "resolution": RESOLUTION}, "seed": 1,
                  "output": str(tmp_path / str(flag)), "stages": [{**stage, "gradient_checkpointing": flag}]}  # fmt: skip
        pipe = tiny_sd15_pipeline()
        results.append(refcond.read_checkpoint(train(config, pipeline=pipe, progress=False).checkpoint)[0])
        assert not pipe.unet.is_gradient_checkpointing, "gradient checkpointing must end with the stage"
        if not flag:
            assert not recomputed
    layers = {type(fn).__name__ for fn in recomputed}
    assert "Qwen2VLDecoderLayer" in layers, layers  # the MLLM's decoder layers were recomputed (the UNet's too)
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_an_encoder_lora_trains_then_merges_into_a_plain_fine_tuned_encoder(data_file: Path, tmp_path: Path, tiny_qwen2vl_dir: Path) -> None:
    roles = tiny_easyref_overrides(tiny_qwen2vl_dir)
    fresh = refcond.from_pipe(tiny_sd15_pipeline(), "easyref", seed=3, **roles)
    before = {k: v.clone() for k, v in fresh.encoder.state_dict().items()}
    fresh.detach()
    lora = {"rank": 2, "targets": ["q_proj", "v_proj"]}
    stage = {"name": "lora", "train": ["aggregator"], "encoder_lora": lora, "steps": 3, "batch_size": 2, "optimizer": {"learning_rate": 1e-2}}
    config = {"composition": "easyref", "roles": roles, "data": {"path": str(data_file), "resolution": RESOLUTION}, "seed": 3,
              "output": str(tmp_path / "run"), "stages": [stage]}  # fmt: skip
    result = train(config, pipeline=tiny_sd15_pipeline(), progress=False)

    tensors, _ = refcond.read_checkpoint(result.checkpoint)
    encoder = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
    assert encoder.keys() == before.keys(), "the checkpoint must hold the merged encoder under its own names, no LoRA layers"
    changed = {k for k in encoder if not torch.equal(encoder[k], before[k])}
    assert changed == {k for k in before if k.endswith(("q_proj.weight", "v_proj.weight"))}
    rp = refcond.load(result.checkpoint, tiny_sd15_pipeline())  # a plain easyref composition, no PEFT layers
    assert all(torch.equal(rp.encoder.state_dict()[k], v) for k, v in encoder.items())
    assert not any("lora" in name for name, _ in rp.encoder.named_modules())

    both = {**config, "stages": [{**stage, "train": ["encoder"]}]}
    with pytest.raises(refcond.ConfigError, match="'train' names the encoder and encoder_lora trains a LoRA of it: choose one"):
        train(both, pipeline=tiny_sd15_pipeline(), progress=False)


def test_dropout_happens_at_the_configured_rates(tiny_qwen2vl_dir: Path) -> None:
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", seed=0)
    objective = Objective(rp, DropoutConfig(references=0.2, text=0.1, both=0.05), LossConfig())
    draws = objective._dropout(40_000, torch.Generator().manual_seed(0))
    rates = {kind: float(mask.float().mean()) for kind, mask in draws.items()}
    assert rates == pytest.approx({"references": 0.2, "text": 0.1, "both": 0.05}, abs=0.01)
    assert not bool((draws["references"] & draws["text"]).any() or (draws["text"] & draws["both"]).any())  # exclusive
    rp.detach()


def test_a_run_counts_dropped_samples_renders_validation_keeps_the_last_states_and_an_ema(data_file: Path, tmp_path: Path) -> None:
    stage = {
        "dropout": {"references": 0.5, "text": 0.0, "both": 0.0},
        "validation": {"every": 5, "prompts": ["a", "b"], "references": [[str(data_file.parent / "0.png")], [str(data_file.parent / "1.png")]], "num_inference_steps": 1},
        "checkpoint_every": 3,
        "keep_last": 1,
        "ema_decay": 0.5,
    }
    result = train(ip_adapter_run(data_file, tmp_path / "run", steps=10, **stage), pipeline=tiny_sd15_pipeline(), progress=False)
    assert 2 <= result.stages[0].dropped["references"] <= 18  # 20 samples at rate 0.5
    assert result.stages[0].dropped["text"] == result.stages[0].dropped["both"] == 0
    grids = sorted(p.name for p in (tmp_path / "run" / "validation").iterdir())
    assert grids == ["00-ip-step-00000005.png", "00-ip-step-00000010.png"]
    assert PIL.Image.open(tmp_path / "run" / "validation" / grids[0]).size == (2 * 32, 32)  # one image per prompt, side by side
    assert [p.name for p in (tmp_path / "run" / "states").iterdir()] == ["00-ip-step-00000010"]
    weights, _ = refcond.read_checkpoint(tmp_path / "run" / "ip.safetensors")
    averaged, _ = refcond.read_checkpoint(tmp_path / "run" / "ip-ema.safetensors")
    assert weights.keys() == averaged.keys() and any(not torch.equal(weights[k], averaged[k]) for k in weights)


def _toml(config: dict[str, Any], path: Path, *extra: str) -> Path:
    stage = config["stages"][0]
    lines = [
        f'composition = "{config["composition"]}"', f'model = "{config["model"]}"', f'output = "{config["output"]}"', f"seed = {config['seed']}",
        "[data]", f'path = "{config["data"]["path"]}"', f"resolution = {config['data']['resolution']}",
        "[[stages]]", f'name = "{stage["name"]}"', f"train = {json.dumps(stage['train'])}", f"steps = {stage['steps']}",
        f"batch_size = {stage['batch_size']}", f"checkpoint_every = {stage['checkpoint_every']}", "optimizer = { learning_rate = 0.001 }", *extra,
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(data_file: Path, model_dir: Path, tmp_path: Path) -> None:
    base = {**ip_adapter_run(data_file, tmp_path / "killed", steps=6, checkpoint_every=1), "model": str(model_dir)}
    killed = _toml(base, tmp_path / "killed.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "refcond", "train", str(killed), "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    states = tmp_path / "killed" / "states"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and len(list(states.glob("0*"))) < 2:
        time.sleep(0.05)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    resumed = train(killed, resume="latest", progress=False)
    straight = train({**base, "output": str(tmp_path / "straight")}, progress=False)
    a, _ = refcond.read_checkpoint(resumed.checkpoint)
    b, _ = refcond.read_checkpoint(straight.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an uninterrupted run"
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7)), "the metrics of redone steps must not repeat"


def test_sigterm_saves_a_state_before_the_run_stops(data_file: Path, model_dir: Path, tmp_path: Path) -> None:
    base = {**ip_adapter_run(data_file, tmp_path / "run", steps=10, checkpoint_every=1000), "model": str(model_dir)}
    config = _toml(base, tmp_path / "run.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "refcond", "train", str(config), "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    assert process.poll() is None, f"the run ended before the signal: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    (state,) = (tmp_path / "run" / "states").iterdir()  # none was due (checkpoint_every = 1000): the signal saved it
    done = len(metrics.read_text().splitlines())
    assert state.name == f"00-ip-step-{done:08d}" and 2 <= done < 10
    assert not (tmp_path / "run" / "model.safetensors").exists()
    resumed = train(config, resume="latest", progress=False)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 11)) and resumed.checkpoint.is_file()


def test_sigint_finishes_the_step_saves_and_stops(data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from refcond.training import trainer

    log = trainer._Run._log

    def interrupt_at_step_3(self: Any, index: int, stage: Any, step: int, *args: Any) -> None:
        log(self, index, stage, step, *args)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    monkeypatch.setattr(trainer._Run, "_log", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(ip_adapter_run(data_file, tmp_path / "run", steps=10, checkpoint_every=1000), pipeline=tiny_sd15_pipeline(), progress=False)
    assert [p.name for p in (tmp_path / "run" / "states").iterdir()] == ["00-ip-step-00000003"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the run must restore the handlers it replaced"


def test_two_processes_see_different_samples_and_end_with_the_same_weights(data_file: Path, model_dir: Path, tmp_path: Path) -> None:
    run = {**ip_adapter_run(data_file, tmp_path / "ddp", steps=3, checkpoint_every=3), "model": str(model_dir)}
    config = _toml(run, tmp_path / "ddp.toml", 'lr_schedule = "linear"')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "refcond", "train", str(config), "--quiet"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    processes = json.loads((tmp_path / "ddp" / "processes-00.json").read_text())
    assert sorted(p["process"] for p in processes) == [0, 1]
    seen = [set(p["first_samples"]) for p in processes]
    assert not seen[0] & seen[1], "the two processes trained on the same samples"
    assert processes[0]["weights_sha256"] == processes[1]["weights_sha256"]
    rates = [json.loads(line)["lr"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([1e-3 * 2 / 3, 1e-3 / 3, 0.0]), "the schedule must step once per optimizer step, not once per process"


# -- bad configs and data --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": [{"name": "s", "train": ["injector.0.projectr"], "steps": 1}]}, r"train selector 'injector\.0\.projectr' names no parameter.*injector\.0\.projector"),
        ({"stages": [{"name": "s", "train": ["injector.lora"], "steps": 1}]}, r"the composition has no injector 'lora'; its injectors are \['cross-attention'\]"),
        ({"stages": [{"name": "s", "train": ["aggregator"], "steps": 1, "batch_sise": 2}]}, r"unknown field 'stages\.0\.batch_sise'\. Did you mean 'batch_size'\?"),
        ({"stages": []}, r"stages: List should have at least 1 item"),
        ({"stages": [{"name": "s", "train": ["injector.0"], "encoder_lora": {"rank": 4, "targets": ["nothing_here"]}, "steps": 1}]}, r"encoder_lora: .*nothing_here"),
        ({"seed": -1}, r"seed: Input should be greater than or equal to 0"),
        ({"data": {"path": "/no/such/file.jsonl"}}, r"no/such/file\.jsonl"),
    ],
)
def test_bad_training_configs_are_config_errors(data_file: Path, tmp_path: Path, change: dict[str, Any], message: str) -> None:
    config = {**ip_adapter_run(data_file, tmp_path / "run"), **change}
    with pytest.raises(refcond.ConfigError, match=message):
        train(config, pipeline=tiny_sd15_pipeline(), progress=False)


def test_the_cli_reports_bad_input_in_one_line(data_file: Path, model_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--recipe", "ip-adaptr", "--data", str(data_file), "-m", str(model_dir)])
    assert result.exit_code == 1 and "Error: unknown recipe 'ip-adaptr'" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["train", "--recipe", "easyref-stage1", "--data", str(data_file), "-m", str(model_dir), "--output", str(tmp_path / "o"), "--resume", "latest"])
    assert result.exit_code == 1 and "holds no saved training state" in result.output
    result = runner.invoke(cli, ["train", "--data", str(data_file)])
    assert result.exit_code == 2 and "give a CONFIG file or a --recipe" in result.output


def test_the_shipped_accelerate_configs_parse_and_unknown_names_list_them() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    from refcond.training import LAUNCH_CONFIGS, launch_config

    kinds = {name: load_config_from_file(str(launch_config(name))).distributed_type.value for name in LAUNCH_CONFIGS}
    assert kinds == {"deepspeed-zero2": "DEEPSPEED", "fsdp": "FSDP"}
    assert load_config_from_file(str(launch_config("deepspeed-zero2"))).deepspeed_config["zero_stage"] == 2
    with pytest.raises(refcond.ConfigError, match="there are: deepspeed-zero2, fsdp"):
        launch_config("zero3")


def test_every_shipped_recipe_is_a_valid_run_once_given_data(data_file: Path) -> None:
    from refcond.training import load_train_config

    recipes = refcond.get_plugins().registry.names("recipe")
    assert {"ip-adapter", "ip-adapter-plus", "easyref-stage1", "easyref-stage2", "easyref-stage3"} <= set(recipes)
    for name in recipes:
        recipe = refcond.get_plugins().registry.get("recipe", name).obj
        config = load_train_config(recipe, {"data": {"path": str(data_file)}, "model": "./sd15"})
        assert config.stages and config.export, name
    stage3 = load_train_config(refcond.get_plugins().registry.get("recipe", "easyref-stage3").obj, {"data": {"path": str(data_file)}})
    assert stage3.data.truncate_rate == 0.4 and stage3.stages[0].optimizer.learning_rate == 2e-5


def test_the_ip_adapter_plus_recipe_runs_from_the_command_line_and_exports(data_file: Path, model_dir: Path, tmp_path: Path) -> None:
    args = ["train", "--recipe", "ip-adapter-plus", "--data", str(data_file), "-m", str(model_dir), "--output", str(tmp_path / "plus"),
            "--steps", "1", "--batch-size", "1", "--resolution", "64", "--quiet", "--json"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    exported = Path(report["exports"]["ip-adapter"])
    tensors, _ = refcond.read_checkpoint(exported)
    assert any(k.startswith("image_proj.layers.0.0.to_kv") for k in tensors), "the resampler's official keys"
    rp = refcond.from_pipe(tiny_sd15_pipeline(), "ip-adapter", checkpoint=exported)
    assert rp.composition.injectors[0].config["projector"] == "resampler"
