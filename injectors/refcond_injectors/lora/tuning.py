"""Tune a LoRA on one reference group: the tuning-based baseline EasyRef compares against.

DreamBooth-LoRA style: a PEFT LoRA on the UNet's attention projections is fine-tuned with the
noise-prediction loss on the references (each with its caption, or one instance prompt), the text
encoders, the VAE and the UNet's own weights frozen. The result is an ordinary diffusers LoRA
file (``pipe.load_lora_weights(path)`` loads it), cached by the content of the references, the
prompts, the config and the base model, so a second prompt over the same references costs nothing.

>>> from refcond_injectors.lora.tuning import TuningConfig, tune_lora
>>> result = tune_lora(pipe, [image_a, image_b], config=TuningConfig(steps=400))  # doctest: +SKIP
>>> pipe.load_lora_weights(result.path, adapter_name=result.adapter_name)  # doctest: +SKIP

The pipeline is left exactly as it was: the adapter tuned here lives in the UNet only while
tuning, and is removed (with its PEFT wrappers) when :func:`tune_lora` returns or raises.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import reprlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator, model_validator
from tqdm.auto import tqdm

from refcond import (
    ComponentConfig,
    ConfigError,
    IncompatibleBackboneError,
    RefcondError,
    ReferenceImageError,
    compat,
    did_you_mean,
    load_references,
)
from refcond_injectors.lora.saving import (
    TuningRecord,
    complete_record,
    load_for_resume,
    save_tuned_lora,
)

#: Gradients are clipped to this norm, as DreamBooth's training scripts do by default.
MAX_GRAD_NORM = 1.0
#: AdamW's weight decay (DreamBooth's default).
WEIGHT_DECAY = 1e-2
#: Images the VAE encodes at once (class images can be many, at 1024 px for SDXL).
_VAE_CHUNK = 4
#: The adapter's name in the UNet while tuning: the same for every group, so a compiled UNet reuses its graphs.
TRAINING_ADAPTER = "refcond_tuning"
_KEY_FORMAT = "refcond-lora-tuning/1"


#: Upper bounds of the tuning options: far above DreamBooth-LoRA's usual values (rank 4-64,
#: 400-2000 steps, batch 1-4, 512 or 1024 pixels, learning rate 1e-4), and low enough that no
#: single one exhausts memory or runs for days on its own.
MAX_TUNING_RANK = 1024
MAX_TUNING_ALPHA = 65536.0
MAX_LEARNING_RATE = 1.0
MAX_STEPS = 100_000
MAX_BATCH_SIZE = 64
MAX_RESOLUTION = 2048
MAX_CLASS_IMAGES = 1000
MAX_LOSS_WEIGHT = 1000.0
MAX_MODULES = 64
#: torch's generators take seeds in [-2**63, 2**64).
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
#: The longest file or folder name file systems take (NAME_MAX), in bytes.
MAX_NAME_BYTES = 255


def check_file_name(value: str | None) -> str | None:
    """Refuse a path no file system holds: a NUL character, or a name longer than :data:`MAX_NAME_BYTES`."""
    if value is None:
        return value
    if "\x00" in value:
        raise ValueError("a path cannot hold a NUL character")
    for part in value.replace("\\", "/").split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise ValueError(f"the name {part[:40]!r}... is {len(part.encode('utf-8', 'surrogatepass'))} bytes long; file systems take names of at most {MAX_NAME_BYTES}")
    return value


class TuningConfig(ComponentConfig):
    """Options of :func:`tune_lora`. Invalid values raise :class:`refcond.ConfigError` naming the field."""

    rank: int = Field(
        default=4, ge=1, le=MAX_TUNING_RANK, description=f"Rank of the LoRA matrices (lora_A is rank x in, lora_B out x rank), 1 to {MAX_TUNING_RANK}."
    )
    alpha: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TUNING_ALPHA,
        description=f"LoRA alpha: the update is scaled by alpha / rank. None = rank (scale 1). At most {MAX_TUNING_ALPHA:g}.",
    )
    learning_rate: float = Field(
        default=1e-4, gt=0, le=MAX_LEARNING_RATE, description=f"AdamW learning rate of the LoRA parameters, above 0 and at most {MAX_LEARNING_RATE:g}."
    )
    steps: int = Field(
        default=400, ge=1, le=MAX_STEPS, description=f"Optimizer steps in all (a resumed run counts the steps already done), 1 to {MAX_STEPS}."
    )
    batch_size: int = Field(
        default=1,
        ge=1,
        le=MAX_BATCH_SIZE,
        description=f"References per step (plus as many class images with prior preservation), 1 to {MAX_BATCH_SIZE}.",
    )
    resolution: int | None = Field(
        default=None,
        ge=8,
        le=MAX_RESOLUTION,
        description=f"Side in pixels the references are resized and centre-cropped to; a multiple of 8, at most {MAX_RESOLUTION}. "
        "None = the pipeline's default image size (unet.config.sample_size * vae_scale_factor).",
    )
    instance_prompt: str = Field(
        default="a photo of sks", description="Prompt of every reference when no per-reference captions are given."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        min_length=1,
        max_length=MAX_MODULES,
        description="UNet modules (name suffixes, as PEFT matches them) that get a LoRA: the attention projections by default "
        f"(at most {MAX_MODULES}).",
    )
    seed: int = Field(
        default=0, ge=MIN_SEED, le=MAX_SEED, description="Seed of the LoRA initialisation, data order, noise and timesteps (-2**63 to 2**64 - 1)."
    )
    prior_preservation: bool = Field(
        default=False, description="Also train on class images the un-adapted pipeline generates from class_prompt (DreamBooth)."
    )
    class_prompt: str | None = Field(
        default=None, description="Prompt of the class images (e.g. 'a photo of a dog'); required with prior_preservation."
    )
    num_class_images: int = Field(
        default=8, ge=1, le=MAX_CLASS_IMAGES, description=f"Class images to generate for prior preservation, 1 to {MAX_CLASS_IMAGES}."
    )
    prior_loss_weight: float = Field(
        default=1.0, ge=0, le=MAX_LOSS_WEIGHT, description=f"Weight of the class images' loss, 0 to {MAX_LOSS_WEIGHT:g}."
    )
    save_every: int = Field(
        default=100, ge=1, le=MAX_STEPS, description=f"Save the LoRA every this many steps (and at the end), to resume from; 1 to {MAX_STEPS}."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="no", description="accelerate's mixed precision: 'fp16' needs a GPU; LoRA weights stay float32."
    )
    output_dir: str | None = Field(
        default=None,
        description="Folder of the cache of tuned LoRAs. None = $REFCOND_CACHE/lora-tuning, or "
        "~/.cache/refcond/lora-tuning ($XDG_CACHE_HOME is honoured).",
    )

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:  # a refcond error, as for every other bad input
            raise ConfigError(_describe(exc, fields=list(type(self).model_fields))) from None

    @field_validator("output_dir")
    @classmethod
    def _a_folder_name(cls, value: str | None) -> str | None:
        return check_file_name(value)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            low = value - value % 8
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8); got {value}, use {low} or {low + 8}")
        return value

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError("module names must not be empty")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a module twice: {value}")
        return value

    @model_validator(mode="after")
    def _class_prompt_for_prior(self) -> TuningConfig:
        if self.prior_preservation and not (self.class_prompt or "").strip():
            raise ValueError("prior_preservation=True needs a class_prompt (e.g. 'a photo of a dog') to generate the class images")
        return self

    @property
    def lora_alpha(self) -> float:
        """The alpha in effect: ``alpha``, or ``rank`` when unset."""
        return float(self.alpha if self.alpha is not None else self.rank)


def _describe(exc: ValidationError, fields: list[str]) -> str:
    lines = ["invalid TuningConfig:"]
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"]) or "(root)"
        if error["type"] == "extra_forbidden":
            lines.append(f"  - unknown field {loc!r}.{did_you_mean(loc, fields)} Valid fields: {', '.join(fields)}.")
        elif error["type"] == "value_error":  # our validators' messages say what was given
            lines.append(f"  - {loc}: {error['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  - {loc}: {error['msg']} (got {_short_repr(error.get('input'))})")
    return "\n".join(lines)


def _short_repr(value: Any) -> str:
    """A bounded repr for messages: a value too long or too deep (or an integer Python cannot print) does not break them."""
    limits = reprlib.Repr()
    limits.maxlevel, limits.maxstring, limits.maxother = 3, 60, 60
    if isinstance(value, int) and value.bit_length() > 256:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    try:
        return limits.repr(value)
    except Exception:  # noqa: BLE001 - e.g. huge integers nested in a list
        return f"<a {type(value).__name__}>"


@dataclass(frozen=True)
class TuningResult:
    """What :func:`tune_lora` produced.

    :ivar path: the LoRA file (diffusers format; ``pipe.load_lora_weights(path)`` loads it).
    :ivar adapter_name: a name for the adapter derived from the inputs (stable across runs).
    :ivar steps: optimizer steps the file holds (``config.steps`` unless interrupted).
    :ivar losses: the training loss of every step, those of resumed runs included.
    :ivar interrupted: tuning stopped early (Ctrl-C); the file holds the last state.
    :ivar cached: the file already existed for these inputs; nothing was tuned.
    """

    path: Path
    adapter_name: str
    steps: int
    losses: list[float]
    interrupted: bool
    cached: bool


@dataclass(frozen=True)
class TuningStep:
    """One optimizer step of :func:`tune_lora`, as its ``on_step`` callback sees it.

    The loss is the one computed before the step's update, from these draws:
    ``noisy = DDPMScheduler.add_noise(latents, noise, timesteps)`` (a DDPM scheduler built from
    the pipeline's scheduler config), the UNet's prediction of ``noise`` (or of the velocity, for a
    ``v_prediction`` scheduler), the mean squared error averaged over the references (plus
    ``prior_loss_weight`` times its average over the class images, which follow the references
    in the batch, with prior preservation).

    :ivar step: the step's index, from 0 (a resumed run continues the count).
    :ivar loss: the step's training loss (``TuningResult.losses[step]``).
    :ivar latents: the clean latents trained on, ``[B, C, h, w]``: samples of the VAE's latent
        distributions of the step's references, scaled by ``vae.config.scaling_factor``.
    :ivar noise: the noise added to them, same shape.
    :ivar timesteps: the training timestep of each example, ``[B]``.
    """

    step: int
    loss: float
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def default_output_dir() -> Path:
    """The folder tuned LoRAs are cached in when ``config.output_dir`` is unset."""
    if os.environ.get("REFCOND_CACHE"):
        return Path(os.environ["REFCOND_CACHE"]).expanduser() / "lora-tuning"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "refcond" / "lora-tuning"


def tune_lora(
    pipeline: Any,
    references: Sequence[PIL.Image.Image],
    *,
    config: TuningConfig | Mapping[str, Any],
    captions: Sequence[str] | None = None,
    output: str | Path | None = None,
    resume_from: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[TuningStep], object] | None = None,
) -> TuningResult:
    """Fine-tune a LoRA on the UNet of ``pipeline`` so that it reproduces ``references``.

    :param pipeline: a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (or a
        refcond pipeline / backbone wrapping one). It is left exactly as it was.
    :param references: the reference group (PIL images; paths and arrays are accepted too).
    :param config: a :class:`TuningConfig` or a dict of its fields.
    :param captions: one caption per reference; ``None`` uses ``config.instance_prompt`` for all.
    :param output: the ``.safetensors`` file to write; ``None`` = a file in the cache folder named
        by a hash of the references' content, the prompts, the config and the base model. If the
        file is already a finished tuning of the same inputs it is returned with ``cached=True``.
    :param resume_from: a file an earlier (interrupted) tuning saved: tuning continues from the step
        it records, with the same data order, noise and timesteps; the optimizer state restarts.
    :param progress: show a tqdm progress bar with the loss.
    :param on_step: called after every optimizer step with its :class:`TuningStep` (the loss and
        the latents, noise and timesteps it was computed from): to log or plot the loss live, or to
        check it against an independent computation.
    :raises KeyboardInterrupt: on Ctrl-C, after saving the LoRA tuned so far (the message says
        where; the exception's ``result`` attribute is the :class:`TuningResult`).
    """
    config = _config(config)
    pipeline, kind = _diffusers_pipeline(pipeline)
    images = load_references(list(references) if references is not None else None)
    prompts = _prompts(captions, len(images), config)
    resolution = _resolution(pipeline, config)
    key = _cache_key(pipeline, kind, images, prompts, config, resolution)
    run = _Run(pipeline.unet, kind, config, key, _output_path(output, config, kind, key))

    cached = complete_record(run.path, key)
    if cached is not None:
        return TuningResult(run.path, cached.adapter_name, cached.step, list(cached.losses), interrupted=False, cached=True)

    _check_precision(config, pipeline.unet.device)
    snapshot = _UNetSnapshot(pipeline.unet)
    try:
        # Gradients are needed even when the caller runs under no_grad (a generation) or inference_mode.
        with torch.inference_mode(False), torch.enable_grad(), _accelerator(config.mixed_precision, pipeline.unet.device) as accelerator:
            try:
                klass = None
                if config.prior_preservation:
                    class_images = _class_images(pipeline, config, resolution)
                    klass = _examples(pipeline, kind, class_images, [config.class_prompt or ""] * len(class_images), resolution)
                instance = _examples(pipeline, kind, images, prompts, resolution)
                run.training_name = _free_adapter_name(pipeline.unet, TRAINING_ADAPTER)
                params = _add_adapter(pipeline.unet, config, run.training_name)
                if resume_from is not None:
                    run.resume(resume_from)
                run.train(_Trainer(pipeline, config, instance, klass, params, accelerator), progress, on_step)
            except KeyboardInterrupt:
                raise run.interrupted(resume_from) from None
    finally:
        snapshot.restore(run.training_name)
    return TuningResult(run.path, run.adapter_name, run.step, run.losses, interrupted=False, cached=False)


def reference_loss(
    pipeline: Any,
    references: Sequence[PIL.Image.Image],
    *,
    config: TuningConfig | Mapping[str, Any] | None = None,
    captions: Sequence[str] | None = None,
    samples: int = 8,
    seed: int = 0,
) -> float:
    """The noise-prediction loss of the pipeline's UNet (with whatever LoRA is active) on a reference group.

    Deterministic: the latents are the VAE's means, and every reference is noised at ``samples``
    evenly spaced timesteps with noise drawn from ``seed``. Lower means the UNet reproduces the
    references better, so it measures what :func:`tune_lora` optimises: compare it before and
    after loading a tuned LoRA. ``config`` gives the resolution and prompts (default
    :class:`TuningConfig`'s).
    """
    config = _config(config or {})
    pipeline, kind = _diffusers_pipeline(pipeline)
    images = load_references(list(references) if references is not None else None)
    data = _examples(pipeline, kind, images, _prompts(captions, len(images), config), _resolution(pipeline, config))
    scheduler = _noise_scheduler(pipeline)
    generator = torch.Generator().manual_seed(seed)
    count = len(images)
    total = 0.0
    with torch.no_grad():
        for k in range(samples):
            t = int((k + 0.5) * scheduler.config.num_train_timesteps / samples)
            noise = torch.randn(data.mean.shape, generator=generator)
            timesteps = torch.full((count,), t, dtype=torch.long)
            losses = _denoising_loss(pipeline.unet, scheduler, data, data.mean, noise, timesteps)
            total += float(losses.mean())
    return total / samples


# -- inputs ---------------------------------------------------------------------------------------


def _config(config: TuningConfig | Mapping[str, Any]) -> TuningConfig:
    if isinstance(config, TuningConfig):
        return config
    if isinstance(config, Mapping):
        return TuningConfig(**config)
    raise ConfigError(f"config must be a TuningConfig or a dict of its fields, not a {type(config).__name__}.")


def _diffusers_pipeline(pipeline: Any) -> tuple[Any, str]:
    """The diffusers pipeline (unwrapping a refcond pipeline or backbone) and its kind, ``sd15`` or ``sdxl``."""
    from diffusers import UNet2DConditionModel

    inner = pipeline
    if not isinstance(getattr(inner, "unet", None), UNet2DConditionModel) and hasattr(inner, "pipeline"):
        inner = inner.pipeline
    unet = getattr(inner, "unet", None)
    if not isinstance(unet, UNet2DConditionModel) or getattr(inner, "vae", None) is None or not hasattr(inner, "encode_prompt"):
        raise IncompatibleBackboneError(
            f"tune_lora tunes Stable Diffusion pipelines (a UNet2DConditionModel, a VAE and text encoders); got a "
            f"{type(pipeline).__name__}. Pass a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline."
        )
    xl = unet.config.addition_embed_type == "text_time"
    if xl and getattr(inner, "text_encoder_2", None) is None:
        raise IncompatibleBackboneError(
            f"the {type(inner).__name__}'s UNet takes SDXL's added text-and-time conditions, which need text_encoder_2; "
            "this pipeline has none (an SDXL refiner?). Tune on the SDXL base pipeline."
        )
    return inner, "sdxl" if xl else "sd15"


def _prompts(captions: Sequence[str] | None, count: int, config: TuningConfig) -> list[str]:
    if captions is None:
        return [config.instance_prompt] * count
    if isinstance(captions, str):
        raise ReferenceImageError("captions must be a list with one caption per reference, not one string.")
    captions = list(captions)
    if len(captions) != count:
        raise ReferenceImageError(
            f"got {len(captions)} captions for {count} references: give one caption per reference, in the same order, "
            "or none (every reference then gets config.instance_prompt)."
        )
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise ReferenceImageError(f"caption {i} is a {type(caption).__name__}, not a string.")
    return captions


def _vae_scale_factor(pipeline: Any) -> int:
    return int(getattr(pipeline, "vae_scale_factor", 2 ** (len(pipeline.vae.config.block_out_channels) - 1)))


def _resolution(pipeline: Any, config: TuningConfig) -> int:
    factor = _vae_scale_factor(pipeline)
    resolution = config.resolution or int(pipeline.unet.config.sample_size) * factor
    if resolution % factor:
        raise ConfigError(f"resolution {resolution} is not a multiple of this pipeline's VAE scale factor {factor}.")
    return resolution


def _output_path(output: str | Path | None, config: TuningConfig, kind: str, key: str) -> Path:
    if output is None:
        folder = Path(config.output_dir).expanduser() if config.output_dir else default_output_dir()
        return folder / f"{kind}-{key}.safetensors"
    path = Path(output).expanduser()
    if path.suffix != ".safetensors" or path.is_dir():
        raise ConfigError(f"output {str(output)!r} must be a .safetensors file path (the tuned LoRA is written there).")
    return path


def _check_precision(config: TuningConfig, device: torch.device) -> None:
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"mixed_precision='fp16' needs the pipeline on a CUDA GPU; it is on {device.type}. "
            "Use mixed_precision='bf16' or 'no' on this device."
        )


# -- caching --------------------------------------------------------------------------------------


def _image_digest(image: PIL.Image.Image) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.digest()


def _fingerprint(module: Any) -> str | None:
    """A cheap content hash of a model: its class, config, dtype and strided samples of 8 base weights.

    LoRA weights and attention processors are left out: they come and go on a shared UNet, and
    tuning runs on the base weights. A fine-tune changes (nearly) every weight, so samples catch it.
    """
    if module is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    h.update(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if isinstance(config, Mapping):  # diffusers models; "_"-keys hold paths, versions and set-ordered lists
        h.update(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str).encode())
    params = [(n.replace(".base_layer", ""), p) for n, p in module.named_parameters() if "lora_" not in n and ".processor." not in n]
    count = len(params)
    for i in sorted({round(j * (count - 1) / 7) for j in range(8)} if count else set()):
        name, p = params[i]
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 65536)].to("cpu").contiguous()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_key(pipeline: Any, kind: str, images: list[PIL.Image.Image], prompts: list[str], config: TuningConfig, resolution: int) -> str:
    """A hash of everything the tuned weights depend on (not of where or how often they are saved)."""
    payload = {
        "format": _KEY_FORMAT,
        "backbone": kind,
        "resolution": resolution,
        "prompts": prompts,
        "config": config.model_dump(mode="json", exclude={"output_dir", "save_every"}),
        "scheduler": {k: v for k, v in pipeline.scheduler.config.items() if not k.startswith("_")},
        "models": {name: _fingerprint(getattr(pipeline, name, None)) for name in ("unet", "vae", "text_encoder", "text_encoder_2")},
    }
    h = hashlib.blake2b(json.dumps(payload, sort_keys=True, default=str).encode(), digest_size=16)
    for image in images:
        h.update(_image_digest(image))
    return h.hexdigest()


# -- data -----------------------------------------------------------------------------------------


@dataclass
class _Examples:
    """Cached training examples: VAE latent distributions and prompt embeddings, one row each."""

    mean: torch.Tensor  # [N, C, h, w], scaled latents
    std: torch.Tensor
    embeds: torch.Tensor  # [N, L, D]
    pooled: torch.Tensor | None  # SDXL: [N, P]
    time_ids: torch.Tensor | None  # SDXL: [N, 6]

    def __len__(self) -> int:
        return self.mean.shape[0]

    def take(self, index: torch.Tensor) -> _Examples:
        pick = lambda t: None if t is None else t[index.to(t.device)]
        return _Examples(pick(self.mean), pick(self.std), pick(self.embeds), pick(self.pooled), pick(self.time_ids))

    def concat(self, other: _Examples) -> _Examples:
        join = lambda a, b: None if a is None else torch.cat([a, b])
        return _Examples(*(join(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)))


def _center_crop(image: PIL.Image.Image, resolution: int) -> tuple[PIL.Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to ``resolution`` and crop the centre square.

    :returns: the square, the original ``(height, width)`` and the crop's ``(top, left)`` (SDXL's
        added time conditions).
    """
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    resized = image.resize((new_w, new_h), PIL.Image.BILINEAR)
    top, left = round((new_h - resolution) / 2), round((new_w - resolution) / 2)
    return resized.crop((left, top, left + resolution, top + resolution)), (height, width), (top, left)


def _examples(pipeline: Any, kind: str, images: list[PIL.Image.Image], prompts: list[str], resolution: int) -> _Examples:
    """Encode the images (VAE) and prompts (text encoders) once."""
    device = pipeline.unet.device
    crops = [_center_crop(image, resolution) for image in images]
    pixels = torch.stack([torch.from_numpy(np.asarray(c[0], dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1) for c in crops])
    mean, std = _encode_images(pipeline.vae, pixels)
    embeds, pooled = _encode_prompts(pipeline, kind, prompts, device)
    time_ids = None
    if kind == "sdxl":
        time_ids = torch.tensor([[*size, *corner, resolution, resolution] for _, size, corner in crops], dtype=torch.float32)
    to = lambda t: None if t is None else t.to(device)
    return _Examples(to(mean), to(std), to(embeds), to(pooled), to(time_ids))


@torch.no_grad()
def _encode_images(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaled latent distributions (mean, std) of ``pixels`` in [-1, 1], in float32."""
    dtype = vae.dtype
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))  # SDXL's VAE overflows in fp16
    means, stds = [], []
    try:
        if upcast:
            vae.to(torch.float32)
        weight = next(vae.parameters())
        for chunk in pixels.split(_VAE_CHUNK):
            dist = vae.encode(chunk.to(weight.device, weight.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    finally:
        if upcast:
            vae.to(dtype)  # float16 -> float32 -> float16 gives back the same weights
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = vae.config.scaling_factor
    return (torch.cat(means) - shift) * scale, torch.cat(stds) * scale


@torch.no_grad()
def _encode_prompts(pipeline: Any, kind: str, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    unique = list(dict.fromkeys(prompts))
    if kind == "sdxl":
        embeds, _, pooled, _ = pipeline.encode_prompt(prompt=unique, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    else:
        embeds, _ = pipeline.encode_prompt(unique, device, 1, False)
        pooled = None
    index = torch.tensor([unique.index(p) for p in prompts])
    return embeds.float()[index.to(embeds.device)], None if pooled is None else pooled.float()[index.to(pooled.device)]


@torch.no_grad()
def _class_images(pipeline: Any, config: TuningConfig, resolution: int) -> list[PIL.Image.Image]:
    """DreamBooth's class images: generated once by the un-adapted pipeline from ``class_prompt``.

    The pipeline's scheduler (whose state a generation changes) and progress-bar settings are put
    back afterwards.
    """
    generator = torch.Generator().manual_seed(_derive_seed(config.seed, "class-images"))
    scheduler = pipeline.scheduler
    images: list[PIL.Image.Image] = []
    try:
        pipeline.scheduler = type(scheduler).from_config(scheduler.config)
        with compat.progress_bar_disabled(pipeline):
            while len(images) < config.num_class_images:
                count = min(_VAE_CHUNK, config.num_class_images - len(images))
                out = pipeline(
                    config.class_prompt, num_images_per_prompt=count, height=resolution, width=resolution, generator=generator, output_type="pil"
                )
                images.extend(out.images)
    finally:
        pipeline.scheduler = scheduler
    return images


# -- training -------------------------------------------------------------------------------------


def _derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one use (``"init"``, ``("step", 12)``): independent streams, resumable at any step."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _noise_scheduler(pipeline: Any) -> Any:
    from diffusers import DDPMScheduler

    accepted = inspect.signature(DDPMScheduler.__init__).parameters  # the pipeline's scheduler may be of another class
    return DDPMScheduler.from_config({k: v for k, v in pipeline.scheduler.config.items() if k in accepted})


def _denoising_loss(unet: Any, scheduler: Any, batch: _Examples, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-example noise-prediction loss (epsilon or v-prediction, as the scheduler says), float32."""
    device, dtype = unet.device, unet.dtype
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    added = None
    if batch.pooled is not None:
        added = {"text_embeds": batch.pooled.to(dtype), "time_ids": batch.time_ids.to(dtype)}
    prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states=batch.embeds.to(dtype), added_cond_kwargs=added).sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ConfigError(f"cannot tune a UNet whose scheduler predicts {kind!r}; tune_lora supports 'epsilon' and 'v_prediction'.")
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


class _Trainer:
    """One optimizer step at a time, every random draw derived from ``(seed, step)``.

    The data order is a permutation per epoch and each step's noise, timesteps and latent samples
    come from a generator seeded by the step's number, so a run resumed at step ``s`` sees exactly
    what an uninterrupted run sees from step ``s`` on.
    """

    def __init__(
        self,
        pipeline: Any,
        config: TuningConfig,
        instance: _Examples,
        klass: _Examples | None,
        params: list[torch.nn.Parameter],
        accelerator: Any,
    ):
        self.unet = pipeline.unet
        self.scheduler = _noise_scheduler(pipeline)
        self.config = config
        self.instance, self.klass = instance, klass
        self.params = params
        self.accelerator = accelerator
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY, eps=1e-8)
        self.optimizer = accelerator.prepare(optimizer)
        self._length = max(len(instance), len(klass) if klass is not None else 0)
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(_derive_seed(self.config.seed, "epoch", epoch))
            self._orders = {epoch: torch.randperm(self._length, generator=generator)}
        return self._orders[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """Positions in the (instance, class) pairing that step ``step`` trains on."""
        first = step * self.config.batch_size
        positions = range(first, first + self.config.batch_size)
        return torch.stack([self._order(p // self._length)[p % self._length] for p in positions])

    def step(self, step: int) -> TuningStep:
        """One optimizer step; returns its loss and the draws it came from."""
        generator = torch.Generator().manual_seed(_derive_seed(self.config.seed, "step", step))
        index = self.indices(step)
        batch = self.instance.take(index % len(self.instance))
        if self.klass is not None:  # instance examples first, then as many class examples
            batch = batch.concat(self.klass.take(index % len(self.klass)))
        latents = batch.mean + batch.std * torch.randn(batch.mean.shape, generator=generator).to(batch.mean.device)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(batch),), generator=generator)

        self.optimizer.zero_grad(set_to_none=True)
        with self.accelerator.autocast():
            losses = _denoising_loss(self.unet, self.scheduler, batch, latents, noise, timesteps)
        instance_count = len(index)
        loss = losses[:instance_count].mean()
        if self.klass is not None:
            loss = loss + self.config.prior_loss_weight * losses[instance_count:].mean()
        value = float(loss.detach())
        if not math.isfinite(value) and self.config.mixed_precision != "fp16":  # fp16's loss scaler skips such steps
            raise RefcondError(
                f"the tuning loss is {value} at step {step + 1}: tuning diverged. Lower learning_rate (now {self.config.learning_rate})."
            )
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        return TuningStep(step, value, latents.detach(), noise, timesteps)


@contextmanager
def _accelerator(mixed_precision: str, device: torch.device) -> Iterator[Any]:
    """An ``accelerate.Accelerator`` for one tuning run, leaving accelerate's process-wide state as it was.

    accelerate keeps one state per process and refuses a second Accelerator with another
    mixed-precision setting; a library function must neither trip over the caller's state nor
    leave its own behind, so the shared state is set aside during tuning and put back after
    (:func:`refcond.compat.separate_accelerate_state`).
    """
    from accelerate import Accelerator

    with compat.separate_accelerate_state() as caller_processes:
        if caller_processes > 1:
            raise ConfigError("tune_lora tunes in one process; call it outside a multi-process (accelerate launch / torchrun) run.")
        yield Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


def _free_adapter_name(unet: Any, name: str) -> str:
    taken = set(getattr(unet, "peft_config", {}) or {})
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _add_adapter(unet: Any, config: TuningConfig, name: str) -> list[torch.nn.Parameter]:
    """Add a fresh LoRA (PEFT gaussian init from ``config.seed``) as the only active adapter; returns its parameters.

    Its parameters are float32 (AdamW state and fp16 loss scaling need it) whatever the UNet's dtype.
    Adapters already in the UNet are switched off while tuning: the LoRA is tuned on the base UNet.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora_config = LoraConfig(
        r=config.rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian", target_modules=list(config.target_modules)
    )
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Already found a peft_config attribute": intended with several adapters
            unet.add_adapter(lora_config, adapter_name=name)
    except ValueError as exc:
        raise ConfigError(f"cannot add a LoRA on target_modules {list(config.target_modules)}: {exc}") from None
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(True)  # the new adapter must run even where the user disabled adapters
    generator = torch.Generator().manual_seed(_derive_seed(config.seed, "init"))
    params = []
    with torch.no_grad():
        for param_name, param in sorted(unet.named_parameters(), key=lambda item: item[0]):
            if f".{name}." not in param_name or ".lora_" not in param_name:
                continue
            param.data = param.data.float()
            if ".lora_A." in param_name:  # PEFT's "gaussian" init: A ~ N(0, 1/r), B = 0
                param.copy_(torch.randn(param.shape, generator=generator) / config.rank)
            else:
                param.zero_()
            param.requires_grad_(True)
            params.append(param)
    for param in unet.parameters():
        if not any(param is p for p in params):
            param.requires_grad_(False)
    return params



@dataclass
class _Run:
    """One call's tuning: how far it got, and how to save it at any moment (every ``save_every``, at the end, on Ctrl-C)."""

    unet: Any
    kind: str
    config: TuningConfig
    key: str
    path: Path
    training_name: str | None = None  # the adapter's name in the UNet while tuning
    step: int = 0
    done: int = 0  # steps done by this call (not counting a resumed file's)
    losses: list[float] = field(default_factory=list)

    @property
    def adapter_name(self) -> str:
        """The name the result suggests for loading the file: the same for the same inputs."""
        return f"tuned_{self.key[:12]}"

    def record(self) -> TuningRecord:
        config = self.config
        return TuningRecord(
            step=self.step,
            steps=config.steps,
            backbone=self.kind,
            key=self.key,
            adapter_name=self.adapter_name,
            rank=config.rank,
            alpha=config.lora_alpha,
            target_modules=list(config.target_modules),
            losses=self.losses[: self.step],
            config=config.model_dump(mode="json"),
        )

    def save(self) -> None:
        assert self.training_name is not None
        save_tuned_lora(self.path, self.unet, self.training_name, self.record())

    def resume(self, resume_from: str | Path) -> None:
        """Load a saved tuning into the fresh adapter and continue from its step."""
        assert self.training_name is not None
        config = self.config
        resumed = load_for_resume(
            resume_from,
            self.unet,
            self.training_name,
            rank=config.rank,
            alpha=config.lora_alpha,
            target_modules=list(config.target_modules),
            backbone=self.kind,
        )
        if resumed.step > config.steps:
            raise ConfigError(
                f"resume_from {str(resume_from)!r} already holds {resumed.step} steps, more than config.steps={config.steps}: "
                "raise steps to continue it."
            )
        self.step, self.losses = resumed.step, list(resumed.losses[: resumed.step])

    def train(self, trainer: _Trainer, progress: bool, on_step: Callable[[TuningStep], object] | None = None) -> None:
        """Step up to ``config.steps``, saving every ``save_every`` steps and at the end."""
        config = self.config
        with tqdm(total=config.steps, initial=self.step, disable=not progress, desc="tuning LoRA", unit="step") as bar:
            while self.step < config.steps:
                done = trainer.step(self.step)
                loss = done.loss
                self.losses.append(loss)
                self.step += 1
                self.done += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if on_step is not None:  # after the bookkeeping: a Ctrl-C inside it saves this step too
                    on_step(done)
                if self.step % config.save_every == 0 and self.step < config.steps:
                    self.save()
        self.save()

    def interrupted(self, resume_from: str | Path | None) -> KeyboardInterrupt:
        """Save what was tuned (if anything new) and build the KeyboardInterrupt to re-raise."""
        steps = self.config.steps
        if self.training_name is not None and (self.done > 0 or (resume_from is not None and Path(resume_from) != self.path)):
            self.save()
            saved = self.path
            message = (
                f"LoRA tuning interrupted at step {self.step}/{steps}; the LoRA tuned so far is saved in {str(saved)!r}. "
                f"Continue with tune_lora(..., resume_from={str(saved)!r})."
            )
        elif resume_from is not None:
            saved = Path(resume_from)
            message = f"LoRA tuning interrupted before any new step; {str(saved)!r} is unchanged (step {self.step}/{steps})."
        else:
            saved = self.path
            message = "LoRA tuning interrupted before the first step; nothing was saved."
        error = KeyboardInterrupt(message)
        result = TuningResult(saved, self.adapter_name, self.step, self.losses[: self.step], interrupted=True, cached=False)
        error.result = result  # type: ignore[attr-defined]
        return error


class _UNetSnapshot:
    """What tuning changes in a UNet, recorded to put back exactly.

    PEFT wraps the target modules, adds the adapter's config, switches which adapters are active
    and changes ``requires_grad`` everywhere; :meth:`restore` deletes the adapter, unwraps the
    modules it wrapped, and puts back active adapters, flags and attributes as they were.
    """

    #: The UNet's attributes PEFT adds or changes (the private ones are listed in refcond.compat).
    _UNET_ATTRS = ("peft_config", *compat.PEFT_MODEL_ATTRIBUTES)

    def __init__(self, unet: Any):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.unet = unet
        self.requires_grad = [(p, p.requires_grad) for p in unet.parameters()]
        self.tuner_layers = {  # active adapter(s) and the disabled flag of every PEFT layer
            name: (_copied(module.active_adapter), bool(module.disable_adapters))
            for name, module in unet.named_modules()
            if isinstance(module, BaseTunerLayer)
        }
        self.attrs = compat.instance_attributes(unet, self._UNET_ATTRS)
        self.adapters = list(getattr(unet, "peft_config", {}) or {})
        self.training = unet.training

    def restore(self, adapter_name: str | None) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        unet = self.unet
        for name, module in list(unet.named_modules()):
            if not isinstance(module, BaseTunerLayer):
                continue
            if adapter_name is not None and adapter_name not in self.adapters:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "Adapter ... was active which is now deleted"
                    module.delete_adapter(adapter_name)
            if name not in self.tuner_layers:  # wrapped for this tuning only: put the original module back
                parent, _, child = name.rpartition(".")
                setattr(unet.get_submodule(parent) if parent else unet, child, module.get_base_layer())
                continue
            active, disabled = self.tuner_layers[name]
            module.set_adapter(_copied(active))  # changes requires_grad, put back below
            if bool(module.disable_adapters) != disabled:
                module.enable_adapters(not disabled)
        config = getattr(unet, "peft_config", None)
        if isinstance(config, dict) and adapter_name is not None and adapter_name not in self.adapters:
            config.pop(adapter_name, None)
        compat.restore_instance_attributes(unet, self.attrs)
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        unet.train(self.training)


def _copied(active: str | list[str]) -> str | list[str]:
    """A PEFT layer's ``active_adapter`` (a name or a list of names), copied."""
    return active if isinstance(active, str) else list(active)
