"""Cost of ``refcond.training.train`` against a minimal hand-written loop, and of a second process.

**Trainer against a hand loop** (``test_trainer_against_hand_loop``). The ``ip-adapter``
composition (CLIP image embeddings, mean, linear projector, decoupled cross-attention) trains its
``injector.cross-attention`` selection (projector + every layer's image K/V) with AdamW, batch 1,
gradient clipping at 1.0 and no conditioning dropout, two ways on the same pipeline and data:

- ``trainer``: ``refcond.training.train(config, pipeline=pipe, progress=False)``;
- ``hand``: the loop of docs/index.md's "Train your own loop", doing the trainer's work and nothing
  else: one sample of ``TrainingData`` (same images, crops and captions), VAE encode and a latent
  sample, noise and timestep, ``pipe.encode_prompt``, ``rp.encode`` + ``rp.bind``, UNet forward,
  MSE, backward, ``clip_grad_norm_``, AdamW, and ``rp.save`` at the end. Its noise, timesteps and
  sample order come from generators seeded as the trainer seeds them, so both compute the same
  losses; the run checks that they do before it reports a ratio.

Two fresh processes (``python benchmarks/test_bench_training.py worker ...``) each build the
pipeline once and then alternate the variants run after run (T H D, D H T, ...; the second
process starts with H), so that drifts of a shared machine's load hit all variants alike. Every
run builds its composition anew, and ``train`` leaves the pipeline as it found it.

- **Time per step**: a global ``torch.optim`` step post-hook stamps the end of every optimizer
  step in every variant; a step's time is the interval between two consecutive stamps, so it
  covers everything a loop does per step (data, forward, backward, clipping, AdamW, the trainer's
  logging and bookkeeping) and nothing of the setup (building, accelerate, the first step) or the
  teardown (saving). The first ``warmup`` intervals are left out. Both the wall-clock interval and
  the process's CPU time (``time.process_time``) over it are kept: with one thread, the CPU time is
  the work done, and other jobs on the machine change it much less than the wall clock. The
  trainer's own ``samples_per_second`` in ``metrics.jsonl`` is read as a cross-check.
- **Peak memory**: the process's resident set size as the kernel tracks it. After the pipeline is
  built (and accelerate imported, in both variants) the worker collects garbage, calls
  ``malloc_trim`` and resets the high-water mark (``/proc/self/clear_refs``); the peak is
  ``VmHWM`` minus the ``VmRSS`` before: exact, not sampled. It is read at the end of the last
  step (``steps``: what training holds) and at the end of the run (``run``: with setup and
  saving), for the first run of each process only (the trainer's in one, the hand loop's in the
  other): later runs reuse memory that earlier ones freed. ``tracemalloc`` does not see torch's
  CPU allocations.

**Processes** (``test_processes_samples_per_second``): the CLI's ``refcond train CONFIG.toml
--quiet`` under ``torchrun --standalone --nproc_per_node N`` (gloo on CPU), batch 1 per process:
``1x1`` (one process, one thread), ``2x1`` (two data-parallel processes, one thread each) and
``1x1+1x1`` (two independent one-process runs at once: what two processes get from this machine
without data parallelism); ``1x2`` (one process, two threads) on request
(``REFCOND_BENCH_TRAINING_LAUNCHES``). The CLI is entered through this file (``... cli STAMPS
CONFIG``), which only adds the optimizer-step stamps before calling ``refcond.cli.main``. Samples
per second come from the trainer's ``metrics.jsonl`` (every process's samples), median over the
steps after the warm-up; CPU and wall time per step per process from the stamps.

Run: ``OMP_NUM_THREADS=1 python -m pytest benchmarks/test_bench_training.py -q --benchmark-only -s``
(see README.md). Results go to ``benchmarks/results/training.json`` (``REFCOND_BENCH_TRAINING_JSON``).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

SEED = 0
#: The diagnostic variant: the trainer with diffusers' ``ModelMixin.device``/``.dtype`` reading the first parameter.
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
REFERENCES = 2  # per sample
RECORDS = 6
RESULTS = Path(os.environ.get("REFCOND_BENCH_TRAINING_JSON", Path(__file__).parent / "results" / "training.json"))

#: ``resolution``: training image side in pixels; ``steps`` per run; ``warmup``: step intervals left
#: out at the start of each run; ``rounds``: runs of each variant in each of the two worker processes.
SETTINGS: dict[str, dict[str, Any]] = {
    # The tiny test pipeline; its VAE downsamples by 2, so 64 px give 32 x 32 latents.
    "tiny-sd15": {"resolution": 64, "steps": 20, "warmup": 3, "rounds": 4},
    # SD1.5's UNet, VAE and text-encoder architectures (random weights) at 128 px: 16 x 16 latents.
    "sd15-128px": {"resolution": 128, "steps": 5, "warmup": 1, "rounds": 2},
}
SELECTED = [s for s in os.environ.get("REFCOND_BENCH_SETTINGS", "tiny-sd15,sd15-128px").split(",") if s in SETTINGS]
#: Settings of the process test: (steps, warm-up steps, rounds).
PROCESS_SETTINGS = {"tiny-sd15": (40, 5, 2)}
PROCESS_SELECTED = [s for s in os.environ.get("REFCOND_BENCH_SETTINGS", "tiny-sd15").split(",") if s in PROCESS_SETTINGS]


# -- what both loops share --------------------------------------------------------------------------


def derived_seed(*parts: Any) -> int:
    """The trainer's seeding rule (sha256 of the ':'-joined path), so the hand loop draws the same noise."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") % 2**63


def build_pipeline(setting: str) -> Any:
    """The pipeline of a setting, seeded: the same weights in every worker."""
    from refcond.testing import tiny_sd15_pipeline

    if setting == "tiny-sd15":
        return tiny_sd15_pipeline()
    import torch
    from common import sd15_unet
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from refcond.testing import tiny_feature_extractor, tiny_image_encoder, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(  # CLIP ViT-L/14's text model (SD1.5's), on the tiny vocabulary
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    torch.manual_seed(2)
    vae = AutoencoderKL(  # SD1.5's VAE: downsamples by 8
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    ).eval()
    resolution = SETTINGS[setting]["resolution"]
    return StableDiffusionPipeline(
        unet=sd15_unet(resolution // 8),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=tiny_feature_extractor(),
        # The tiny CLIP vision model with ViT-H/14's 1024-d projection: the projector has IP-Adapter
        # SD1.5's shape (1024 -> 4 x 768); ViT-H itself (632M parameters, frozen) is left out.
        image_encoder=tiny_image_encoder(projection_dim=1024),
        requires_safety_checker=False,
    )


def write_data(folder: Path, resolution: int) -> Path:
    """Six records of two references, a target and a caption; images a quarter larger than ``resolution`` (so they are resized)."""
    from refcond.testing import reference_images

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(reference_images(RECORDS, size=resolution * 5 // 4)):
        image.save(folder / f"{i}.png")
    lines = [
        json.dumps({"references": [f"{(i + k) % RECORDS}.png" for k in range(1, REFERENCES + 1)], "image": f"{i}.png", "caption": f"a photo of thing {i}"})
        for i in range(RECORDS)
    ]
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_config(data: Path, resolution: int, steps: int, output: Path) -> dict[str, Any]:
    """The trainer's run: what the hand loop does."""
    return {
        "composition": "ip-adapter",
        "data": {"path": str(data), "resolution": resolution},
        "output": str(output),
        "seed": SEED,
        "stages": [
            {
                "name": "ip",
                "train": ["injector.cross-attention"],
                "steps": steps,
                "batch_size": 1,
                "optimizer": {"learning_rate": LEARNING_RATE},
                "max_grad_norm": MAX_GRAD_NORM,
                "checkpoint_every": 10**6,  # the state is written once, after the last step
                "dropout": {"references": 0.0, "text": 0.0, "both": 0.0},
                **_no_encoding_cache(),
            }
        ],
    }


def _no_encoding_cache() -> dict[str, Any]:
    """``cache_encodings = false`` where the trainer has it: a cached encoding would skip the CLIP pass the hand loop makes."""
    from refcond.training.config import StageConfig

    return {"cache_encodings": False} if "cache_encodings" in StageConfig.model_fields else {}


def hand_loop(pipe: Any, data_path: Path, resolution: int, steps: int, output: Path) -> list[float]:
    """The trainer's work, written out (docs/index.md, "Train your own loop"); the losses of every step."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    import refcond
    from refcond.training import TrainingData
    from refcond.training.data import collate

    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder):
        module.requires_grad_(False)
    rp = refcond.from_pipe(pipe, "ip-adapter", seed=SEED)
    trainable = []
    for name, parameter in rp.named_parameters():  # the projector and every layer's image K/V
        parameter.requires_grad_(name.startswith("injector.0."))
        if parameter.requires_grad:
            trainable.append(parameter)
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    data = TrainingData({"path": str(data_path), "resolution": resolution}, seed=derived_seed(SEED, "data", 0))
    device, scaling = torch.device("cpu"), pipe.vae.config.scaling_factor
    losses = []
    rp.train()
    for step in range(steps):
        batch = collate([data[step]], resolution=resolution)
        generator = torch.Generator().manual_seed(derived_seed(SEED, 0, step, 0, 0))
        with torch.no_grad():
            latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.sample(generator) * scaling
            text = pipe.encode_prompt(batch["captions"], device, 1, False)[0]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        condition, _ = rp.encode(batch["references"], prompts=batch["captions"])
        with rp.bind(condition):
            prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=text).sample
        loss = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    rp.eval()
    output.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*built in memory.*")
        rp.save(output / "model.safetensors")
    rp.detach()
    return losses


# -- the worker: a fresh process that alternates the variants ----------------------------------------


def memory_status() -> dict[str, int]:
    with open("/proc/self/status") as status:
        text = status.read()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def settle() -> dict[str, int]:
    """Free what can be freed and reset the kernel's high-water mark of the RSS to the RSS now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return memory_status()


def run_variant(variant: str, pipe: Any, setting: str, steps: int, data: Path, output: Path) -> tuple[list[float], list[float]]:
    """One training run of ``steps`` steps: its losses, and the step times the trainer wrote in ``metrics.jsonl``."""
    resolution = SETTINGS[setting]["resolution"]
    shutil.rmtree(output, ignore_errors=True)
    if variant == "hand":
        return hand_loop(pipe, data, resolution, steps, output), []
    from refcond.training import train

    train(train_config(data, resolution, steps, output), pipeline=pipe, progress=False)
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in metrics], [1 / m["samples_per_second"] for m in metrics]  # batch 1, one process


def worker(args: dict[str, Any]) -> dict[str, Any]:
    """Build the pipeline once; run the variants in ``order``, reversed every other round.

    The first run is the process's first training: its peak memory is measured (the later runs
    reuse memory the earlier ones freed, so only the first is clean).
    """
    import accelerate  # noqa: F401  (imported before the baseline in every variant: an import is not training memory)
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import refcond.training.trainer  # noqa: F401

    setting, order, steps, rounds = args["setting"], args["order"], args["steps"], args["rounds"]
    data, root = Path(args["data"]), Path(args["output"])
    pipe = build_pipeline(setting)
    stamps: list[tuple[float, float]] = []
    at_last_step: dict[str, int] = {}

    def stamp(optimizer: Any, a: Any, k: Any) -> None:
        stamps.append((time.perf_counter(), time.process_time()))
        if len(stamps) == steps and not at_last_step:
            at_last_step.update(memory_status())

    register_optimizer_step_post_hook(stamp)
    before = settle()
    runs = []
    for r in range(rounds):
        for variant in order if r % 2 == 0 else order[::-1]:
            stamps.clear()
            start = time.perf_counter()
            losses, reported = run_variant(variant, pipe, setting, steps, data, root / f"{r}-{variant}")
            end = time.perf_counter()
            run = {
                "variant": variant,
                "round": r,
                "step_seconds": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])],
                "step_cpu_seconds": [b[1] - a[1] for a, b in zip(stamps, stamps[1:])],
                "until_first_step_seconds": stamps[0][0] - start,
                "after_last_step_seconds": end - stamps[-1][0],
                "losses": losses,
                "metrics_jsonl_step_seconds": reported,
            }
            if not runs:
                run.update(peak_steps_bytes=at_last_step["VmHWM"] - before["VmRSS"], peak_run_bytes=memory_status()["VmHWM"] - before["VmRSS"])
            runs.append(run)
    return {"runs": runs, "rss_before_bytes": before["VmRSS"], "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()), "threads": torch.get_num_threads()}


def run_worker(setting: str, order: list[str], tmp_path: Path, data: Path, name: str) -> dict[str, Any]:
    config = SETTINGS[setting]
    result_file = tmp_path / f"{name}.json"
    args = {"setting": setting, "order": order, "steps": config["steps"], "rounds": config["rounds"], "data": str(data), "output": str(tmp_path / name), "result": str(result_file)}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, __file__, "worker", json.dumps(args)], env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(result_file.read_text())


# -- the tests ----------------------------------------------------------------------------------------


def _merge(section: str, key: str, report: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing.setdefault(section, {})[key] = report
    existing.update(machine=platform.processor() or platform.machine(), cpus=os.cpu_count())
    RESULTS.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "n": len(values)}


def trainer_against_hand_loop(setting: str, tmp_path: Path) -> dict[str, Any]:
    """Two workers, one starting with the trainer and one with the hand loop (each first run's peak memory is clean)."""
    config = SETTINGS[setting]
    data = write_data(tmp_path / "data", config["resolution"])
    variants = ["trainer", "hand"]
    workers = [run_worker(setting, order, tmp_path, data, f"worker{i}") for i, order in enumerate((variants, ["hand", "trainer", *variants[2:]]))]
    runs = [run for w in workers for run in w["runs"]]
    hand_losses = next(run["losses"] for run in runs if run["variant"] == "hand")
    for run in runs:
        same = all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(run["losses"], hand_losses, strict=True))
        assert same, f"{run['variant']} and the hand loop do not compute the same losses: {run['losses'][:4]} vs {hand_losses[:4]}"

    warm = config["warmup"]
    first = {w["runs"][0]["variant"]: w["runs"][0] for w in workers}
    report: dict[str, Any] = {
        "setting": setting,
        **config,
        "unet_parameters": workers[0]["unet_parameters"],
        "threads": workers[0]["threads"],
        "rss_before_mib": [w["rss_before_bytes"] / 2**20 for w in workers],
        "losses_equal": True,
        "variants": {},
        "ratios": {},
    }
    for variant in variants:
        mine = [run for run in runs if run["variant"] == variant]
        report["variants"][variant] = {
            "step_seconds": _summary([s for run in mine for s in run["step_seconds"][warm:]]),
            "step_cpu_seconds": _summary([s for run in mine for s in run["step_cpu_seconds"][warm:]]),
            "run_medians_seconds": [statistics.median(run["step_seconds"][warm:]) for run in mine],
            "until_first_step_seconds": _summary([run["until_first_step_seconds"] for run in mine]),
            "after_last_step_seconds": _summary([run["after_last_step_seconds"] for run in mine]),
        }
        reported = [s for run in mine for s in run["metrics_jsonl_step_seconds"][warm + 1 :]]  # its first entry is the first step
        if reported:
            report["variants"][variant]["metrics_jsonl_step_seconds"] = _summary(reported)
        if variant in first:
            report["variants"][variant].update(peak_steps_mib=first[variant]["peak_steps_bytes"] / 2**20, peak_run_mib=first[variant]["peak_run_bytes"] / 2**20)
    hand = report["variants"]["hand"]
    for variant in variants[:1] + variants[2:]:
        mine = report["variants"][variant]
        # Paired: each run against the hand-loop run next to it in the same worker and round.
        pairs = [
            statistics.median(run["step_cpu_seconds"][warm:]) / statistics.median(other["step_cpu_seconds"][warm:])
            for w in workers
            for run in w["runs"]
            if run["variant"] == variant
            for other in w["runs"]
            if other["variant"] == "hand" and other["round"] == run["round"]
        ]
        report["ratios"][variant] = {
            "time_median": mine["step_seconds"]["median"] / hand["step_seconds"]["median"],
            "time_min": mine["step_seconds"]["min"] / hand["step_seconds"]["min"],
            "cpu_median": mine["step_cpu_seconds"]["median"] / hand["step_cpu_seconds"]["median"],
            "cpu_min": mine["step_cpu_seconds"]["min"] / hand["step_cpu_seconds"]["min"],
            "cpu_paired_median": statistics.median(pairs),
            "cpu_paired": pairs,
        }
    t = report["variants"]["trainer"]
    report["ratios"]["trainer"].update(peak_steps=t["peak_steps_mib"] / hand["peak_steps_mib"], peak_run=t["peak_run_mib"] / hand["peak_run_mib"])
    return report


def _print_training(report: dict[str, Any]) -> None:
    name, t, h = report["setting"], report["variants"]["trainer"], report["variants"]["hand"]
    print(f"\n[training] {name} ({report['resolution']} px, batch 1, {report['threads']} thread(s)), per step after the warm-up, median (fastest):")
    for variant, v in report["variants"].items():
        ratio = report["ratios"].get(variant)
        vs = f"; /hand: time {ratio['time_median']:.3f} ({ratio['time_min']:.3f}), CPU {ratio['cpu_median']:.3f} ({ratio['cpu_min']:.3f}), CPU paired {ratio['cpu_paired_median']:.3f}" if ratio else ""
        print(
            f"  {variant}: {v['step_seconds']['median'] * 1e3:.1f} ms ({v['step_seconds']['min'] * 1e3:.1f}), "
            f"CPU {v['step_cpu_seconds']['median'] * 1e3:.1f} ms ({v['step_cpu_seconds']['min'] * 1e3:.1f}){vs}"
            + (f"; metrics.jsonl {v['metrics_jsonl_step_seconds']['median'] * 1e3:.1f} ms" if "metrics_jsonl_step_seconds" in v else "")
        )
    ratio = report["ratios"]["trainer"]
    print(
        f"  peak RSS added: at the last step trainer +{t['peak_steps_mib']:.0f} MiB, hand +{h['peak_steps_mib']:.0f} MiB ({ratio['peak_steps']:.3f}); "
        f"whole run +{t['peak_run_mib']:.0f} / +{h['peak_run_mib']:.0f} MiB ({ratio['peak_run']:.3f})\n"
        f"  setup to the end of the first step {t['until_first_step_seconds']['median']:.2f} s / {h['until_first_step_seconds']['median']:.2f} s, "
        f"after the last step {t['after_last_step_seconds']['median']:.2f} s / {h['after_last_step_seconds']['median']:.2f} s (trainer / hand)"
    )


try:
    import pytest
except ImportError:  # pragma: no cover - the worker does not need pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.mark.parametrize("setting", SELECTED)
    def test_trainer_against_hand_loop(benchmark: Any, setting: str, tmp_path: Path, capsys: Any) -> None:
        reports: list[dict[str, Any]] = []
        benchmark.pedantic(lambda: reports.append(trainer_against_hand_loop(setting, tmp_path)), rounds=1, iterations=1)
        report = reports[0]
        benchmark.extra_info.update(suite="training", training=report)
        _merge("trainer_vs_hand", setting, report)
        with capsys.disabled():
            _print_training(report)

    @pytest.mark.parametrize("setting", PROCESS_SELECTED)
    def test_processes_samples_per_second(benchmark: Any, setting: str, tmp_path: Path, capsys: Any) -> None:
        reports: list[dict[str, Any]] = []
        benchmark.pedantic(lambda: reports.append(processes(setting, tmp_path)), rounds=1, iterations=1)
        report = reports[0]
        benchmark.extra_info.update(suite="training-processes", processes=report)
        _merge("processes", setting, report)
        with capsys.disabled():
            _print_processes(report)


# -- processes ------------------------------------------------------------------------------------------

#: Launches by name, "<processes>x<threads per process>"; REFCOND_BENCH_TRAINING_LAUNCHES selects them.
#: "1x1+1x1" runs two independent one-process trainings at once: what two processes get from this
#: machine (its cores, its other load) without data parallelism, the reference for "2x1".
LAUNCHES = [name for name in os.environ.get("REFCOND_BENCH_TRAINING_LAUNCHES", "1x1,2x1,1x1+1x1").split(",") if re.fullmatch(r"[12]x[12]|1x1\+1x1", name)]


def _toml(config: dict[str, Any]) -> str:
    stage = config["stages"][0]
    lines = [f'composition = "{config["composition"]}"', f'model = "{config["model"]}"', f'output = "{config["output"]}"', f"seed = {config['seed']}", ""]
    lines += ["[data]", f'path = "{config["data"]["path"]}"', f"resolution = {config['data']['resolution']}", ""]
    lines += ["[[stages]]", f'name = "{stage["name"]}"', f"train = {json.dumps(stage['train'])}", f"steps = {stage['steps']}", f"batch_size = {stage['batch_size']}"]
    lines += [f"max_grad_norm = {stage['max_grad_norm']}", f"checkpoint_every = {stage['checkpoint_every']}"]
    lines += [f"optimizer = {{ learning_rate = {stage['optimizer']['learning_rate']} }}", "dropout = { references = 0.0, text = 0.0, both = 0.0 }"]
    lines += [f"cache_encodings = {'true' if stage['cache_encodings'] else 'false'}"] if "cache_encodings" in stage else []
    lines += [""]
    return "\n".join(lines)


def cli_with_stamps(stamps_file: str, config_file: str) -> None:
    """``refcond train CONFIG --quiet`` (the CLI's own entry point) with the optimizer-step stamps written per process at exit."""
    import atexit

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from refcond.cli import main

    stamps: list[tuple[float, float]] = []
    register_optimizer_step_post_hook(lambda optimizer, a, k: stamps.append((time.perf_counter(), time.process_time())))
    atexit.register(lambda: Path(f"{stamps_file}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(stamps), encoding="utf-8"))
    main(["train", config_file, "--quiet"])


def processes(setting: str, tmp_path: Path) -> dict[str, Any]:
    steps, warm, rounds = PROCESS_SETTINGS[setting]
    resolution = SETTINGS[setting]["resolution"]
    data = write_data(tmp_path / "data", resolution)
    model = tmp_path / "model"
    build_pipeline(setting).save_pretrained(model)
    keys = ("samples_per_second", "round_medians", "wall_seconds", "cpu_step_seconds", "wall_step_seconds")
    measured: dict[str, dict[str, list[float]]] = {name: {key: [] for key in keys} for name in LAUNCHES}
    for r in range(rounds):
        for name in LAUNCHES if r % 2 == 0 else LAUNCHES[::-1]:
            copies = name.split("+")
            nproc, threads = map(int, copies[0].split("x"))
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
            launched = []
            start = time.perf_counter()
            for copy in range(len(copies)):
                output = tmp_path / f"run{r}-{name}-{copy}"
                config_file = output.with_suffix(".toml")
                config_file.write_text(_toml({**train_config(data, resolution, steps, output), "model": str(model)}), encoding="utf-8")
                stamps = tmp_path / f"run{r}-{name}-{copy}-stamps"
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), __file__, "cli", str(stamps), str(config_file)]
                process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                launched.append((process, output, stamps))
            rate = 0.0
            for process, output, stamps in launched:
                _, stderr = process.communicate(timeout=1800)
                if process.returncode != 0:
                    raise RuntimeError(f"{name} failed:\n{stderr[-4000:]}")
                rates = [json.loads(line)["samples_per_second"] for line in (output / "metrics.jsonl").read_text().splitlines()][warm:]
                measured[name]["samples_per_second"] += rates if len(copies) == 1 else []
                rate += statistics.median(rates)
                for rank in range(nproc):
                    stamp = json.loads(Path(f"{stamps}.rank{rank}.json").read_text())
                    measured[name]["wall_step_seconds"] += [b[0] - a[0] for a, b in zip(stamp, stamp[1:])][warm:]
                    measured[name]["cpu_step_seconds"] += [b[1] - a[1] for a, b in zip(stamp, stamp[1:])][warm:]
            measured[name]["wall_seconds"].append(time.perf_counter() - start)
            measured[name]["round_medians"].append(rate)  # independent runs: the sum of their rates
            if len(copies) > 1:
                measured[name]["samples_per_second"].append(rate)
    report: dict[str, Any] = {"setting": setting, "steps": steps, "warmup": warm, "rounds": rounds, "resolution": resolution, "cpus": os.cpu_count(), "launches": {}}
    for name, values in measured.items():
        cpu, wall = statistics.median(values["cpu_step_seconds"]), statistics.median(values["wall_step_seconds"])
        report["launches"][name] = {
            "samples_per_second": _summary(values["samples_per_second"]),
            "round_medians": values["round_medians"],
            "wall_seconds": _summary(values["wall_seconds"]),
            "process_cpu_seconds_per_step": cpu,
            "process_wall_seconds_per_step": wall,
            "cpu_share": cpu / wall,  # of one core, per process: below 1 when the process waits (other processes, the allreduce)
        }
    rate = {name: report["launches"][name]["samples_per_second"]["median"] for name in LAUNCHES}
    pairs = [("2x1", "1x1"), ("1x2", "1x1"), ("2x1", "1x2"), ("1x1+1x1", "1x1"), ("2x1", "1x1+1x1")]
    report["ratios"] = {f"{a} / {b}": rate[a] / rate[b] for a, b in pairs if a in rate and b in rate}
    for other in ("2x1", "1x1+1x1"):
        if other in LAUNCHES and "1x1" in LAUNCHES:
            one, two = report["launches"]["1x1"], report["launches"][other]
            report["ratios"][f"CPU per step, {other} / 1x1"] = two["process_cpu_seconds_per_step"] / one["process_cpu_seconds_per_step"]
    return report


def _print_processes(report: dict[str, Any]) -> None:
    parts = [
        f"{name}: {v['samples_per_second']['median']:.2f} samples/s, per process {v['process_cpu_seconds_per_step'] * 1e3:.0f} ms CPU in "
        f"{v['process_wall_seconds_per_step'] * 1e3:.0f} ms per step (share of a core {v['cpu_share']:.2f}), launch {v['wall_seconds']['median']:.1f} s"
        for name, v in report["launches"].items()
    ]
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items())
    print(f"\n[training] {report['setting']} torchrun, {report['cpus']} CPUs, batch 1 per process, <processes>x<threads>:\n  " + "\n  ".join(parts) + f"\n[training] {ratios}")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    sys.path.insert(0, str(Path(__file__).parent))
    arguments = json.loads(sys.argv[2])
    Path(arguments["result"]).write_text(json.dumps(worker(arguments)), encoding="utf-8")
elif __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "cli":
    cli_with_stamps(sys.argv[2], sys.argv[3])
