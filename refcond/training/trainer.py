"""The training loop: one trainer for every composition, on accelerate, in one process or several.

:func:`train` builds the composition on the backbone (seeded), then runs each stage: it freezes
everything but the stage's selection, prepares the :class:`~refcond.training.objective.Objective`,
the optimizer and the schedule with accelerate (DDP across processes; DeepSpeed or FSDP through an
accelerate config), and steps. Every sample, noise draw and dropout decision comes from the run's
seed, the stage, the step and the process, never from hidden state, so a run killed at any moment
and resumed from its last state (``resume="latest"``) ends with the same weights as one that was
never interrupted. Only the main process writes: states every K steps, the metrics JSONL,
validation grids, and at each stage's end a refcond checkpoint (plus formats named in ``export``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from refcond.building import build, derive_seed
from refcond.config import merge_nested
from refcond.errors import ConfigError
from refcond.files import write_image, write_json
from refcond.plugins import Plugins, get_plugins
from refcond.training.config import StageConfig, TrainConfig, load_train_config
from refcond.training.data import DataConfig, TrainingData, make_loader
from refcond.training.encoder_lora import add_encoder_lora, merge_encoder_lora
from refcond.training.encoding_cache import stage_cache
from refcond.training.objective import DROPOUT_KINDS, Objective, restore_trained_weights, trained_weights
from refcond.training.states import Position, find_state, list_states, read_position, save_state

METRICS = "metrics.jsonl"


@dataclass
class StageResult:
    """One finished stage: its name, steps, last loss, the checkpoint written, and the samples skipped."""

    name: str
    steps: int
    loss: float
    checkpoint: Path | None
    skipped: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class TrainResult:
    """A finished run: the output folder, the final refcond checkpoint, each stage, and exports by format."""

    output: Path
    checkpoint: Path | None
    stages: list[StageResult]
    exports: dict[str, Path] = field(default_factory=dict)


def train(
    config: str | Path | Mapping[str, Any] | TrainConfig,
    *,
    overrides: Mapping[str, Any] | None = None,
    resume: str | None = None,
    pipeline: Any = None,
    plugins: Plugins | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a composition; see the module docstring and docs/training.md.

    :param config: a ``.toml`` file, a dict or a :class:`TrainConfig`.
    :param overrides: nested settings merged into ``config`` (what ``--set`` and the CLI's flags give).
    :param resume: ``"latest"`` or a state folder: continue where that state left off.
    :param pipeline: a diffusers pipeline to train on instead of loading ``config.model``; it is
        left as it was when training ends (load the result with ``refcond.load(path, pipeline)``).
    """
    run = load_train_config(config, overrides)
    plugins = plugins or get_plugins()
    output = Path(run.output)
    state = find_state(output, resume) if resume is not None else None
    position = read_position(state) if state is not None else None
    _check_stages(run, plugins)
    return _Run(run, plugins, output, pipeline, progress).execute(state, position)


def _check_stages(run: TrainConfig, plugins: Plugins) -> None:
    """Validate each stage's data settings, and read and check its data file, before any model loads."""
    for i, stage in enumerate(run.stages):
        TrainingData(stage_data(run, stage, where=f"stages[{i}] ({stage.name!r})"), seed=0)


def stage_data(run: TrainConfig, stage: StageConfig, where: str = "stage") -> DataConfig:
    """The run's data config with the stage's changes merged in."""
    if not stage.data:
        return run.data
    from refcond.config import validate_config

    return validate_config(DataConfig, merge_nested(run.data.model_dump(), stage.data), where=f"{where} data")  # type: ignore[return-value]


class _Run:
    def __init__(self, run: TrainConfig, plugins: Plugins, output: Path, pipeline: Any, progress: bool):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        self.run, self.plugins, self.output, self.given_pipeline, self.show = run, plugins, output, pipeline, progress
        # find_unused_parameters: with conditioning dropout, some steps leave trained parts unused.
        try:
            self.accelerator = Accelerator(
                # Several processes without a GPU (torchrun / accelerate launch on CPUs): accelerate's multi-CPU (gloo) mode.
                cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
                mixed_precision=run.mixed_precision,
                log_with=list(run.trackers) or None,
                project_dir=str(output),
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                # One schedule step per optimizer step; a prepared schedule would otherwise step once per process.
                step_scheduler_with_optimizer=False,
            )
        except (ValueError, ImportError) as exc:  # fp16 without a GPU, a tracker that is not installed
            raise ConfigError(f"accelerate cannot run this configuration (mixed_precision {run.mixed_precision!r}, trackers {run.trackers}): {exc}") from None
        self.main = self.accelerator.is_main_process
        self.stop: str | None = None
        # DeepSpeed and FSDP shard the weights: their states are accelerate's own layout, not the trained weights alone.
        self.sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if self.sharded and len(run.stages) > 1:
            raise ConfigError(
                f"a run under {self.accelerator.distributed_type.value} has one stage, this one has {len(run.stages)}: "
                "run each stage as its own run, starting from the previous one's output (--from)."
            )

    # -- the run ----------------------------------------------------------------------------------

    def execute(self, state: Path | None, position: Position | None) -> TrainResult:
        run, accelerator = self.run, self.accelerator
        if self.main:
            self.output.mkdir(parents=True, exist_ok=True)
            write_json(self.output / "config.json", run.model_dump(mode="json", by_alias=True))
        if run.trackers:
            accelerator.init_trackers("refcond", config={"seed": run.seed, "stages": len(run.stages)})
        rp = self._build()
        results: list[StageResult] = []
        first = position.stage if position is not None else 0
        try:
            with self._signals():
                for index, stage in enumerate(run.stages):
                    if index < first:
                        results.append(StageResult(stage.name, stage.steps, math.nan, self._stage_checkpoint(stage)))
                        continue
                    resume_here = (state, position) if index == first and position is not None else (None, None)
                    results.append(self._stage(rp, index, stage, *resume_here))
                    rp.adopt_trained_weights()
            final = self._final(rp, results)
            exports = self._exports(rp)
        finally:
            if self.given_pipeline is not None:
                rp.detach()
            if run.trackers:
                accelerator.end_training()
        return TrainResult(self.output, final, results, exports)

    def _build(self) -> Any:
        from refcond.pipeline import RefcondPipeline

        run = self.run
        device = self.accelerator.device
        roles = dict(run.roles)
        if self.given_pipeline is not None:
            self.given_pipeline.to(device)
        else:
            if run.model is None:
                raise ConfigError("the training config names no model: set model (a hub id or folder of a diffusers pipeline), or pass pipeline=.")
            backbone = dict(roles.pop("backbone", {}) or {})
            config = {**backbone.get("config", {}), "model": run.model, "device": str(device)}
            roles["backbone"] = {**backbone, "config": config}
        composition = run.composition
        if composition is None and run.from_checkpoint is None:  # pragma: no cover - the config refuses it
            raise ConfigError("nothing to train: name a composition or a checkpoint to start from.")
        if self.given_pipeline is None and "name" not in roles["backbone"]:
            from refcond.cli.generate import backbone_for_model

            roles["backbone"]["name"] = backbone_for_model(run.model, self.plugins.registry)  # type: ignore[arg-type]
        built = build(composition, self.plugins, pipeline=self.given_pipeline, checkpoint=run.from_checkpoint, overrides=roles, seed=run.seed)
        rp = RefcondPipeline(built, self.plugins)
        rp.pipeline.set_progress_bar_config(disable=True)
        return rp

    # -- one stage ---------------------------------------------------------------------------------

    def _stage(self, rp: Any, index: int, stage: StageConfig, state: Path | None, position: Position | None) -> StageResult:
        from diffusers.optimization import get_scheduler

        accelerator, run = self.accelerator, self.run
        trainable = select_trainable(rp, stage.train)
        if stage.encoder_lora is not None:
            trainable += _add_encoder_lora(rp, stage, derive_seed(run.seed, "encoder-lora", index))
        objective = Objective(rp, stage.dropout, stage.loss, stage_cache(rp, run, stage))  # after the selection: it reads requires_grad
        optimizer = make_optimizer(stage, [p for _, p in trainable])
        schedule = get_scheduler(stage.lr_schedule, optimizer, num_warmup_steps=stage.warmup_steps, num_training_steps=stage.steps)
        if stage.gradient_checkpointing:
            set_gradient_checkpointing(rp, True)
        ema = EMA([p for _, p in trainable], stage.ema_decay) if stage.ema_decay is not None else None
        accelerator.gradient_accumulation_steps = stage.gradient_accumulation
        accelerator.step = 0  # accelerate counts micro-batches to know when to synchronise; each stage starts at 0
        self._configure_deepspeed(stage)
        prepared, optimizer, schedule = accelerator.prepare(objective, optimizer, schedule)
        self._state_hooks(rp)
        if ema is not None:
            accelerator.register_for_checkpointing(ema)
        start, skipped = 0, 0
        if state is not None and position is not None:
            accelerator.load_state(str(state))
            start, skipped = position.step, position.skipped
        data = TrainingData(stage_data(run, stage), seed=derive_seed(run.seed, "data", index))
        world, rank = accelerator.num_processes, accelerator.process_index
        loader = make_loader(data, stage.batch_size, start=start * stage.gradient_accumulation * stage.batch_size, rank=rank, world=world)
        batches = iter(loader)
        if self.main:
            self._trim_metrics(index, start)
        rp.train()
        bar = tqdm(total=stage.steps, initial=start, desc=stage.name, disable=not (self.show and self.main), dynamic_ncols=True)
        loss_value, dropped, seen = math.nan, dict.fromkeys(DROPOUT_KINDS, 0), []
        started = time.perf_counter()
        try:
            for step in range(start, stage.steps):
                total, samples = 0.0, 0
                for micro in range(stage.gradient_accumulation):
                    batch = next(batches)
                    skipped += len(batch["skipped"])
                    for reason in batch["skipped"]:
                        warnings.warn(f"training data: skipped a sample: {reason}", RuntimeWarning, stacklevel=1)
                    seen.extend(batch["numbers"])
                    generator = torch.Generator().manual_seed(derive_seed(run.seed, index, step, micro, rank))
                    # accelerate skips the gradient synchronisation until the last micro-batch and scales the loss.
                    with accelerator.accumulate(prepared):
                        loss, stats = prepared(batch, generator)
                        accelerator.backward(loss)
                        objective.release()
                    total += float(loss.detach()) / stage.gradient_accumulation
                    samples += stats["samples"]
                    for kind in DROPOUT_KINDS:
                        dropped[kind] += stats[kind]
                if stage.max_grad_norm is not None:
                    accelerator.clip_grad_norm_([p for _, p in trainable], stage.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update()
                loss_value = total
                done = step + 1
                rate = samples * world / max(time.perf_counter() - started, 1e-9)
                started = time.perf_counter()
                self._log(index, stage, done, loss_value, schedule.get_last_lr()[0], rate, skipped)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}", samples_s=f"{rate:.1f}")
                if done % stage.checkpoint_every == 0 or done == stage.steps or self.stop:
                    self._save_state(Position(index, stage.name, done, skipped), stage.keep_last)
                if stage.validation.every and (done % stage.validation.every == 0 or done == stage.steps):
                    self._validate(rp, stage, index, done)
                if self.stop:
                    raise (KeyboardInterrupt() if self.stop == "SIGINT" else SystemExit(128 + signal.SIGTERM))
        finally:
            objective.release()
            bar.close()
            rp.eval()
            if stage.gradient_checkpointing:
                set_gradient_checkpointing(rp, False)
        if stage.encoder_lora is not None:
            merge_encoder_lora(rp.encoder)
            rp.encoder.requires_grad_(True)  # the stage fine-tuned it: the checkpoint stores it, later stages keep it
        self._record_processes(index, seen, rp)
        checkpoint = self._stage_checkpoint(stage)
        if self.main:
            _quiet_save(rp, checkpoint)
            if ema is not None:
                with ema.swapped():
                    _quiet_save(rp, checkpoint.with_name(f"{stage.name}-ema.safetensors"))
        accelerator.wait_for_everyone()
        accelerator.free_memory()
        return StageResult(stage.name, stage.steps, loss_value, checkpoint, skipped, dropped)

    # -- outputs ------------------------------------------------------------------------------------

    def _stage_checkpoint(self, stage: StageConfig) -> Path:
        return self.output / f"{stage.name}.safetensors"

    def _final(self, rp: Any, results: list[StageResult]) -> Path | None:
        final = self.output / "model.safetensors"
        if self.main:
            _quiet_save(rp, final)
            write_json(self.output / "result.json", {"stages": [{"name": r.name, "steps": r.steps, "loss": None if math.isnan(r.loss) else r.loss, "skipped": r.skipped, "dropped": r.dropped} for r in results]})
        self.accelerator.wait_for_everyone()
        return final

    def _exports(self, rp: Any) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for name in self.run.export:
            entry = self.plugins.registry.get("checkpoint_format", name)
            save = getattr(entry.obj, "save", None)
            if not callable(save):
                raise ConfigError(f"export {name!r}: the {name} checkpoint format reads files but does not write them.")
            path = self.output / "exports" / f"{name}.safetensors"
            if self.main:
                out[name] = Path(save(rp, path))
        self.accelerator.wait_for_everyone()
        return out

    def _configure_deepspeed(self, stage: StageConfig) -> None:
        """DeepSpeed takes the micro-batch, the accumulation and the clipping from its config: the stage's."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            return
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = stage.batch_size
        plugin.deepspeed_config["gradient_accumulation_steps"] = stage.gradient_accumulation
        plugin.deepspeed_config["gradient_clipping"] = stage.max_grad_norm or 0.0

    def _state_hooks(self, rp: Any) -> None:
        """States hold the trained weights only, not the backbone the Objective also holds (accelerate's public hooks)."""
        from safetensors.torch import load_file

        if self.sharded:
            return

        def save(models: list[Any], weights: list[dict[str, torch.Tensor]], folder: str) -> None:
            weights[:] = [trained_weights(rp)]

        def load(models: list[Any], folder: str) -> None:
            restore_trained_weights(rp, load_file(str(Path(folder) / "model.safetensors")))
            models.clear()  # loaded: accelerate must not load the whole Objective

        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = [self.accelerator.register_save_state_pre_hook(save), self.accelerator.register_load_state_pre_hook(load)]

    def _save_state(self, position: Position, keep_last: int) -> None:
        accelerator = self.accelerator

        def write(folder: Path) -> None:
            accelerator.save_state(str(folder), safe_serialization=True)

        if accelerator.num_processes == 1:
            save_state(self.output, position, write, keep_last)
            return
        # Every process writes its own random states into the folder the main process renames.
        folder = self.output / "states" / f".{position.folder_name()}.shared.tmp"
        accelerator.save_state(str(folder), safe_serialization=True)
        accelerator.wait_for_everyone()
        if self.main:
            save_state(self.output, position, lambda tmp: folder.rename(tmp), keep_last)
        accelerator.wait_for_everyone()

    def _log(self, index: int, stage: StageConfig, step: int, loss: float, lr: float, rate: float, skipped: int) -> None:
        record = {"stage": index, "stage_name": stage.name, "step": step, "loss": loss, "lr": lr, "samples_per_second": rate, "skipped": skipped}
        if self.run.trackers:
            self.accelerator.log({"loss": loss, "lr": lr}, step=step)
        if self.main:
            with open(self.output / METRICS, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def _trim_metrics(self, index: int, start: int) -> None:
        """On resume, drop the metrics of steps the killed run made after its last state (they are redone)."""
        path = self.output / METRICS
        if not path.is_file():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and _before(json.loads(line), index, start)]
        from refcond.files import atomic_write

        atomic_write(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8"))

    def _validate(self, rp: Any, stage: StageConfig, index: int, step: int) -> None:
        if not self.main or not stage.validation.prompts:
            return
        from diffusers.utils import make_image_grid

        validation = stage.validation
        groups = validation.references or [[]]
        rp.eval()
        images = []
        for i, prompt in enumerate(validation.prompts):
            group = groups[i] if len(groups) > 1 else groups[0]
            kwargs = {"references": group} if rp.encoder is not None or group else {}
            result = rp(
                prompt,
                num_inference_steps=validation.num_inference_steps,
                guidance_scale=validation.guidance_scale,
                generator=torch.Generator().manual_seed(derive_seed(self.run.seed, "validation", i)),
                **kwargs,
            )
            images.append(result.images[0])
        rp.train()
        write_image(self.output / "validation" / f"{index:02d}-{stage.name}-step-{step:08d}.png", make_image_grid(images, rows=1, cols=len(images)))

    def _record_processes(self, index: int, seen: list[int], rp: Any) -> None:
        """Which samples each process saw and a hash of its weights: different samples, the same weights."""
        digest = hashlib.sha256()
        for key, value in sorted(rp.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().float().cpu().numpy().tobytes())
        mine = {"process": self.accelerator.process_index, "samples": len(seen), "first_samples": seen[:16], "weights_sha256": digest.hexdigest()}
        from accelerate.utils import gather_object

        everyone = gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]
        if self.main:
            write_json(self.output / f"processes-{index:02d}.json", everyone)

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM finish the current step, save the state, then stop the run."""

        def stop(signum: int, frame: Any) -> None:
            self.stop = signal.Signals(signum).name

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _before(record: Mapping[str, Any], stage: int, step: int) -> bool:
    return (int(record.get("stage", 0)), int(record.get("step", 0))) <= (stage, step)


def _quiet_save(rp: Any, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*built in memory.*")
        return rp.save(path)


def select_trainable(rp: Any, selectors: list[str]) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything, then unfreeze the parameters each selector names; refuse a selector that names none."""
    pipe = rp.pipeline
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
    named = list(rp.named_parameters())
    for _, parameter in named:
        parameter.requires_grad_(False)
    injector_names = [spec.name for spec in rp.composition.injectors]
    chosen: dict[str, torch.nn.Parameter] = {}
    for selector in selectors:
        prefix = _numbered(selector, injector_names)
        matched = [(n, p) for n, p in named if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            roots = sorted({".".join(n.split(".")[: 3 if n.startswith("injector.") else 2]) for n, _ in named})
            raise ConfigError(f"train selector {selector!r} names no parameter of this composition. Parameters start with: {', '.join(roots[:20])}.")
        chosen.update(matched)
    for parameter in chosen.values():
        parameter.requires_grad_(True)
    return list(chosen.items())


def _add_encoder_lora(rp: Any, stage: StageConfig, seed: int) -> list[tuple[str, torch.nn.Parameter]]:
    if rp.encoder is None or not isinstance(rp.encoder, torch.nn.Module):
        raise ConfigError(f"stage {stage.name!r}: encoder_lora needs a composition with a torch encoder; this one has {type(rp.encoder).__name__}.")
    if any(p.requires_grad for p in rp.encoder.parameters()):
        raise ConfigError(
            f"stage {stage.name!r}: 'train' names the encoder and encoder_lora trains a LoRA of it: choose one "
            "(remove 'encoder' from train for the LoRA, or encoder_lora for full fine-tuning)."
        )
    return [(f"encoder.{name}", parameter) for name, parameter in add_encoder_lora(rp.encoder, stage.encoder_lora, seed)]  # type: ignore[arg-type]


def set_gradient_checkpointing(rp: Any, enabled: bool) -> None:
    """Recompute activations in the backward pass: the UNet's, and those of every component that offers it.

    A component offers it as transformers' models do, with ``gradient_checkpointing_enable()`` and
    ``gradient_checkpointing_disable()`` methods (the ``mllm`` encoder does).
    """
    unet = rp.pipeline.unet
    unet.enable_gradient_checkpointing() if enabled else unet.disable_gradient_checkpointing()
    for component in rp.components().values():
        method = getattr(component, "gradient_checkpointing_enable" if enabled else "gradient_checkpointing_disable", None)
        if callable(method):
            method()


def _numbered(selector: str, injector_names: list[str]) -> str:
    """``injector.cross-attention.projector`` -> ``injector.0.projector``."""
    parts = selector.split(".")
    if parts[0] == "injector" and len(parts) > 1 and not parts[1].isdigit():
        if parts[1] not in injector_names:
            raise ConfigError(f"train selector {selector!r}: the composition has no injector {parts[1]!r}; its injectors are {injector_names}.")
        if injector_names.count(parts[1]) > 1:
            raise ConfigError(f"train selector {selector!r}: several injectors are named {parts[1]!r}; number them (injector.0, injector.1).")
        parts[1] = str(injector_names.index(parts[1]))
    return ".".join(parts)


def make_optimizer(stage: StageConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    config = stage.optimizer
    options = {"lr": config.learning_rate, "weight_decay": config.weight_decay, "betas": config.betas, "eps": config.epsilon}
    if config.name == "adamw-8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optimizer 'adamw-8bit' needs bitsandbytes: pip install bitsandbytes (or use 'adamw').") from None
        return bnb.optim.AdamW8bit(parameters, **options)
    return torch.optim.AdamW(parameters, **options)


class EMA:
    """An exponential moving average of some parameters, saved with the training state."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        self.parameters, self.decay = parameters, decay
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, parameter in zip(self.shadow, self.parameters):
            shadow.mul_(self.decay).add_(parameter.detach(), alpha=1 - self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The averaged weights in place of the trained ones, for the length of the block."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.parameters]
            for shadow, parameter in zip(self.shadow, self.parameters):
                parameter.copy_(shadow)
            try:
                yield
            finally:
                for value, parameter in zip(saved, self.parameters):
                    parameter.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for shadow, value in zip(self.shadow, state["shadow"]):
            shadow.copy_(value)


__all__ = ["StageResult", "TrainResult", "derive_seed", "select_trainable", "train"]

