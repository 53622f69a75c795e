"""Training compositions: ``refcond train`` and :func:`refcond.train` (see docs/training.md).

- :func:`train` runs a :class:`TrainConfig` (stages of :class:`StageConfig`) on accelerate;
- :class:`DataConfig` and :class:`TrainingData` read the training data (JSONL, or the official
  EasyRef JSON);
- recipes (partial configs) are registered by plugins through ``refcond_register_recipes``;
- :func:`launch_config` gives the accelerate configs refcond ships (DeepSpeed ZeRO-2, FSDP).
"""

from pathlib import Path

from refcond.training.config import (
    DropoutConfig,
    LossConfig,
    OptimizerConfig,
    StageConfig,
    TrainConfig,
    ValidationConfig,
    load_train_config,
    read_train_file,
    set_field,
)
from refcond.training.data import DataConfig, TrainingData
from refcond.errors import ConfigError
from refcond.training.trainer import StageResult, TrainResult, train

#: The accelerate configs shipped with refcond, by name.
LAUNCH_CONFIGS = ("deepspeed-zero2", "fsdp")


def launch_config(name: str) -> Path:
    """The path of a shipped accelerate config: ``accelerate launch --config_file PATH -m refcond train ...``.

    :param name: ``"deepspeed-zero2"`` (DeepSpeed ZeRO stage 2, bf16) or ``"fsdp"`` (FSDP ``SHARD_GRAD_OP``, bf16).
    """
    if name not in LAUNCH_CONFIGS:
        raise ConfigError(f"no shipped accelerate config {name!r}; there are: {', '.join(LAUNCH_CONFIGS)}.")
    return Path(__file__).with_name("launch_configs") / f"{name}.yaml"

__all__ = [
    "LAUNCH_CONFIGS",
    "DataConfig",
    "DropoutConfig",
    "LossConfig",
    "OptimizerConfig",
    "StageConfig",
    "StageResult",
    "TrainConfig",
    "TrainResult",
    "TrainingData",
    "ValidationConfig",
    "load_train_config",
    "read_train_file",
    "set_field",
    "launch_config",
    "train",
]
