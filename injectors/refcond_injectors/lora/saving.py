"""Writing and reading tuned LoRA files.

A tuned LoRA is an ordinary diffusers LoRA file: the keys and metadata are those
``StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=get_peft_model_state_dict(unet),
unet_lora_adapter_metadata=unet.peft_config[name].to_dict())`` writes (PEFT layout,
``unet.<module>.lora_A.weight`` / ``.lora_B.weight``; the ``LoraConfig`` as JSON under
``lora_adapter_metadata``, so ``pipe.load_lora_weights(path)`` honours alpha). One more metadata
entry, ``refcond_lora_tuning``, records how far tuning got (the step count, for resuming and
caching) and what it was tuned on; diffusers ignores it. Files are written atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft.utils import get_peft_model_state_dict

from refcond import CheckpointError, ConfigError, IncompatibleBackboneError
from refcond import read_checkpoint, read_metadata, write_safetensors

#: Metadata key of refcond's own record in a tuned LoRA file.
TUNING_METADATA_KEY = "refcond_lora_tuning"
#: The key prefix diffusers' LoRA loader reads UNet weights from.
UNET_PREFIX = "unet."
_FORMAT = 1


@dataclass
class TuningRecord:
    """What a tuned LoRA file says about its tuning (stored as JSON in the file's metadata).

    :ivar step: optimizer steps done; the file is complete when ``step == steps``.
    :ivar key: the cache key of the tuning inputs (references, prompts, config, base model).
    """

    step: int
    steps: int
    backbone: str
    key: str
    adapter_name: str
    rank: int
    alpha: float
    target_modules: list[str]
    losses: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    format: int = _FORMAT

    @property
    def complete(self) -> bool:
        return self.step >= self.steps

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], where: str) -> TuningRecord | None:
        """The record in a file's metadata, or ``None`` if the file was not written by ``tune_lora``."""
        raw = metadata.get(TUNING_METADATA_KEY)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise CheckpointError(f"{where}: its {TUNING_METADATA_KEY!r} metadata is damaged ({exc}).") from None


def lora_state_dict(unet: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights under the keys diffusers' ``save_lora_weights`` writes (``unet.`` + PEFT keys)."""
    return {f"{UNET_PREFIX}{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()}


def adapter_metadata(lora_config: Any) -> dict[str, str]:
    """The safetensors metadata diffusers writes for a UNet ``LoraConfig``: ``format`` and ``lora_adapter_metadata``.

    diffusers turns sets (``target_modules``) into lists in set order; they are sorted here so the
    same tuning writes the same bytes in every process (string hashing is randomised per process).
    """
    packed = {f"{UNET_PREFIX}{k}": sorted(v) if isinstance(v, set) else v for k, v in lora_config.to_dict().items()}
    return {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def save_tuned_lora(path: str | Path, unet: Any, adapter_name: str, record: TuningRecord) -> Path:
    """Write the adapter ``adapter_name`` of ``unet`` and ``record`` to ``path`` atomically."""
    metadata = adapter_metadata(unet.peft_config[adapter_name])
    metadata[TUNING_METADATA_KEY] = record.to_json()
    return write_safetensors(path, lora_state_dict(unet, adapter_name), metadata)


def read_record(path: str | Path) -> TuningRecord | None:
    """The tuning record of a LoRA file (its header only), or ``None`` if it has none."""
    return TuningRecord.from_metadata(read_metadata(path), where=f"LoRA file {str(path)!r}")


def complete_record(path: Path, key: str) -> TuningRecord | None:
    """The record of ``path`` if it is a finished tuning of the inputs ``key`` names; else ``None``.

    An unreadable, foreign or unfinished (interrupted) file is not a cache hit: tuning runs again
    and replaces it.
    """
    if not path.is_file():
        return None
    try:
        record = read_record(path)
    except CheckpointError:
        return None
    if record is None or record.key != key or not record.complete:
        return None
    return record


def load_for_resume(
    path: str | Path,
    unet: Any,
    adapter_name: str,
    *,
    rank: int,
    alpha: float,
    target_modules: list[str],
    backbone: str,
) -> TuningRecord:
    """Copy a tuned LoRA file's weights into the freshly added adapter ``adapter_name``.

    The file must have been written by ``tune_lora`` (it records the step to continue from), with
    the same rank, alpha and target modules, for a UNet of this layout: otherwise a
    :class:`ConfigError` or :class:`IncompatibleBackboneError` names the difference (for a shape,
    the key and both shapes).
    """
    where = f"resume_from {str(path)!r}"
    state, metadata = read_checkpoint(path)
    record = TuningRecord.from_metadata(metadata, where)
    if record is None:
        raise ConfigError(
            f"{where} was not written by tune_lora (it has no {TUNING_METADATA_KEY!r} metadata with the step to "
            "continue from). Resume from a file tune_lora saved, or start afresh without resume_from."
        )
    if record.rank != rank:
        raise ConfigError(f"{where} is a rank-{record.rank} LoRA but config.rank is {rank}: resume with rank={record.rank}.")
    if float(record.alpha) != float(alpha):
        raise ConfigError(f"{where} was tuned with alpha {record.alpha} but config.alpha is {alpha}: resume with alpha={record.alpha}.")
    expected = lora_state_dict(unet, adapter_name)
    for key in sorted(set(state) & set(expected)):
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise IncompatibleBackboneError(
                f"{where}: {key} has shape {tuple(state[key].shape)} in the file but this UNet's LoRA needs "
                f"{tuple(expected[key].shape)}. The file was tuned on a {record.backbone} UNet, this pipeline is "
                f"{backbone}: resume on the pipeline it was tuned on."
            )
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        if sorted(record.target_modules) != sorted(target_modules):
            raise ConfigError(
                f"{where} was tuned with target_modules {record.target_modules} but config.target_modules is "
                f"{list(target_modules)}: resume with the same target modules."
            )
        raise IncompatibleBackboneError(
            f"{where} does not fit this UNet ({backbone}; the file was tuned on {record.backbone}): "
            f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}."
        )
    with torch.no_grad():
        for key, tensor in expected.items():  # state_dict tensors share storage with the parameters
            tensor.copy_(state[key])
    return record
