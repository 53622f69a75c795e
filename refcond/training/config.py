"""The configuration of a training run: what to train it on, and one or more stages.

A run (:class:`TrainConfig`) names the composition (a registered name, a file, a dict, or the
checkpoint it starts ``from``), the backbone ``model``, the ``data`` and its ``stages``. A stage
(:class:`StageConfig`) says which parameters train — by checkpoint role and part, as
:meth:`refcond.RefcondPipeline.named_parameters` names them — and how: optimizer, schedule, steps,
batch, accumulation, clipping, conditioning dropout, the loss, validation and checkpoints.
Everything not selected stays frozen, and every field is bounded and validated before anything
loads. Recipes (``refcond_register_recipes``) are partial run configs that plugins ship.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from refcond.config import ComponentConfig, check_values, validate_config
from refcond.errors import ConfigError
from refcond.training.data import DataConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_STEPS = 10_000_000
MAX_BATCH = 1024
#: Learning-rate schedules, by diffusers' ``get_scheduler`` names.
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
#: Largest run-config file read.
MAX_CONFIG_BYTES = 1 << 20


class OptimizerConfig(ComponentConfig):
    """AdamW, as EasyRef's and IP-Adapter's own training use it."""

    name: Literal["adamw", "adamw-8bit"] = Field(default="adamw", description="'adamw' (torch), or 'adamw-8bit' (bitsandbytes, an optional extra).")
    learning_rate: float = Field(default=1e-4, gt=0, le=1, description="Peak learning rate (official EasyRef: 1e-4, 4e-5, 2e-5 for stages 1-3).")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="Adam's betas, each in [0, 1).")
    epsilon: float = Field(default=1e-8, gt=0, le=1, description="Adam's epsilon.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"betas must each lie in [0, 1), got {value}")
        return value


class DropoutConfig(ComponentConfig):
    """Conditioning dropout, as the official EasyRef training: per sample, exclusive events."""

    references: float = Field(default=0.05, ge=0, le=1, description="Probability of training on the encoder's unconditional input instead of the references.")
    text: float = Field(default=0.05, ge=0, le=1, description="Probability of an empty caption.")
    both: float = Field(default=0.05, ge=0, le=1, description="Probability of dropping both.")

    @model_validator(mode="after")
    def _total(self) -> DropoutConfig:
        if self.references + self.text + self.both > 1:
            raise ValueError(f"the dropout probabilities add up to {self.references + self.text + self.both:g}, more than 1")
        return self


class LossConfig(ComponentConfig):
    """The denoising loss: MSE against the scheduler's target (noise, or velocity for v-prediction)."""

    snr_gamma: float | None = Field(default=None, gt=0, le=1000, description="Min-SNR weighting with this gamma (5.0 is common); None = plain MSE.")
    noise_offset: float = Field(default=0.0, ge=0, le=1, description="Offset noise strength (0 = none).")


class ValidationConfig(ComponentConfig):
    """Images rendered while training, to see what the composition learns."""

    every: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Render every this many steps (and at the stage's end); None = never.")
    prompts: list[str] = Field(default=[], max_length=64, description="One prompt per image.")
    references: list[list[str]] = Field(default=[], max_length=64, description="One reference group (image paths) per prompt, or one for all.")
    num_inference_steps: int = Field(default=20, ge=1, le=1000, description="Denoising steps of each validation image.")
    guidance_scale: float = Field(default=5.0, ge=0, le=100, description="Classifier-free guidance of each validation image.")


class EncoderLoraConfig(ComponentConfig):
    """A LoRA trained in the encoder instead of the encoder itself (PEFT), merged into it when the stage ends."""

    rank: int = Field(ge=1, le=1024, description="Rank of every LoRA update.")
    alpha: float | None = Field(default=None, gt=0, le=1e6, description="LoRA alpha (the update is scaled by alpha / rank); None = the rank.")
    targets: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        max_length=64,
        description="The encoder's linear layers to adapt, as PEFT's target_modules: name suffixes (the default: the MLLM's "
        "attention and MLP projections), or one regular expression matched against the whole module name.",
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input.")


class StageConfig(ComponentConfig):
    """One stage of training: what trains and how."""

    name: str = Field(default="stage", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="Names the stage's outputs.")
    train: list[str] = Field(
        min_length=1,
        max_length=64,
        description="What trains, by parameter name prefix as rp.named_parameters() names them: 'aggregator', "
        "'injector.0.projector', 'injector.0.layers', 'injector.1' (a lora injector's layers), 'encoder' (the whole MLLM). "
        "An injector may be named instead of numbered ('injector.cross-attention.projector'). Everything else is frozen.",
    )
    steps: int = Field(ge=1, le=MAX_STEPS, description="Optimizer steps of the stage.")
    batch_size: int = Field(default=1, ge=1, le=MAX_BATCH, description="Samples per process and micro-batch.")
    gradient_accumulation: int = Field(default=1, ge=1, le=MAX_BATCH, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, le=1e6, description="Clip the gradients' global norm to this; None = no clipping.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="The optimizer.")
    lr_schedule: Literal[SCHEDULES] = Field(default="constant_with_warmup", description="Learning-rate schedule (diffusers' get_scheduler names).")  # type: ignore[valid-type]
    warmup_steps: int = Field(default=0, ge=0, le=MAX_STEPS, description="Warm-up steps of the schedule.")
    ema_decay: float | None = Field(default=None, gt=0, lt=1, description="Keep an exponential moving average of the trained weights with this decay (saved beside them); None = none.")
    encoder_lora: EncoderLoraConfig | None = Field(
        default=None,
        description="Train a LoRA of the encoder instead of the encoder (which must then not be in 'train'); merged into the encoder's weights "
        "when the stage ends, so the checkpoint holds a fine-tuned encoder. None = the encoder trains only if 'train' names it.",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass (less memory, more time): the UNet's, and the components' that offer it (the MLLM)."
    )
    dropout: DropoutConfig = Field(default_factory=DropoutConfig, description="Conditioning dropout.")
    loss: LossConfig = Field(default_factory=LossConfig, description="The denoising loss.")
    data: dict[str, Any] = Field(default={}, description="Settings of the run's data that this stage changes (e.g. {truncate_rate = 0.4}).")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Validation images.")
    checkpoint_every: int = Field(default=500, ge=1, le=MAX_STEPS, description="Save the training state every this many steps (resumable).")
    keep_last: int = Field(default=2, ge=1, le=1000, description="Training states kept on disk (older ones are removed).")
    cache_encodings: bool = Field(
        default=True,
        description="While this stage leaves the encoder frozen, keep its encodings in the run's encoding_cache folder, keyed by content, "
        "so later epochs and runs skip the encoder (see docs/training.md). Ignored when the stage trains the encoder.",
    )

    @field_validator("train")
    @classmethod
    def _selectors(cls, value: list[str]) -> list[str]:
        for selector in value:
            if not selector or selector.startswith(".") or selector.endswith(".") or ".." in selector:
                raise ValueError(f"{selector!r} is not a parameter name prefix such as 'aggregator' or 'injector.0.projector'")
        return value


class TrainConfig(ComponentConfig):
    """A training run."""

    composition: str | dict[str, Any] | None = Field(
        default=None, description="A registered composition, a .toml/.json composition file, or a table; None = the one the 'from' checkpoint stores."
    )
    from_checkpoint: str | None = Field(
        default=None, alias="from", description="A checkpoint to start from: a refcond checkpoint (its composition too) or an official file."
    )
    roles: dict[str, Any] = Field(default={}, description="Role overrides of the composition, as refcond.from_pipe takes them (e.g. the encoder's model).")
    model: str | None = Field(default=None, description="Hub id or local folder of the diffusers pipeline to train on.")
    data: DataConfig = Field(description="The training data.")
    stages: list[StageConfig] = Field(min_length=1, max_length=64, description="The stages, run in order; each starts from the previous one's weights.")
    output: str = Field(default="refcond-training", min_length=1, description="Folder of checkpoints, states, metrics and validation images.")
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seeds fresh weights, data order, noise and dropout.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(default="no", description="accelerate's mixed precision.")
    export: list[str] = Field(default=[], max_length=8, description="Checkpoint formats to write the result in too ('ip-adapter', 'easyref').")
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default=[], description="accelerate trackers to log to (optional extras).")
    encoding_cache: str | None = Field(
        default=None,
        min_length=1,
        description="Folder of the frozen encoders' cached encodings (see the stages' cache_encodings); None = <output>/encoding-cache. "
        "Runs that name the same folder share it: an encoding is only read back for the same encoder weights, config and sample.",
    )

    model_config = {**ComponentConfig.model_config, "populate_by_name": True}

    @model_validator(mode="after")
    def _something_to_build(self) -> TrainConfig:
        if self.composition is None and self.from_checkpoint is None:
            raise ValueError("name a composition (e.g. 'ip-adapter'), or a checkpoint to start from ('from')")
        names = [stage.name for stage in self.stages]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"stage names must be distinct, but {repeated} is used more than once")
        return self


def read_train_file(path: str | Path) -> dict[str, Any]:
    """The table of a ``.toml`` training config, its data path resolved against the file's folder."""
    path = Path(path)
    where = str(path)
    if path.suffix.lower() != ".toml":
        raise ConfigError(f"training config {where!r} must be a .toml file.")
    try:
        if not path.is_file():
            raise ConfigError(f"training config {where!r} is not a file.")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"training config {where!r} is larger than {MAX_CONFIG_BYTES} bytes.")
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read training config {where!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"training config {where!r} is not UTF-8 text.") from None
    except (tomllib.TOMLDecodeError, RecursionError, ValueError) as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    table = data.get("data")
    if isinstance(table, dict) and isinstance(table.get("path"), str) and not Path(table["path"]).is_absolute():
        table["path"] = str((path.parent / table["path"]).resolve())
    return data


def set_field(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data``'s field at a dotted path, numbers indexing lists (``stages.0.steps``); missing tables are created."""
    parts = dotted.split(".")
    target: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(target, list):
            if not part.isdigit() or int(part) >= len(target):
                raise ConfigError(f"{dotted!r}: {'.'.join(parts[:i]) or 'the config'} is a list of {len(target)}; {part!r} is not an index in it.")
            if last:
                target[int(part)] = value
            else:
                target = target[int(part)]
        elif isinstance(target, dict):
            if last:
                target[part] = value
            else:
                target = target.setdefault(part, {})
        else:
            raise ConfigError(f"{dotted!r}: {'.'.join(parts[:i])!r} is a value, not a table or a list.")


def load_train_config(source: str | Path | Mapping[str, Any] | TrainConfig, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a TOML file, a mapping or itself, with ``overrides`` (nested) merged in."""
    from refcond.config import merge_nested

    if isinstance(source, TrainConfig):
        data, where = source.model_dump(by_alias=True), "the training config"
    elif isinstance(source, Mapping):
        data, where = dict(source), "the training config"
    else:
        data, where = read_train_file(source), str(source)
    if overrides:
        data = merge_nested(data, overrides)
    check_values(data, where)
    return validate_config(TrainConfig, data, where=where)  # type: ignore[return-value]
