"""The ``mllm`` encoder: Qwen2-VL reads all references of a group and an instruction in one sequence.

This is EasyRef's reference encoder (arXiv 2412.09618, official code ``TempleX98/EasyRef``): the
references and the instruction form one user turn of Qwen2-VL's chat template; every image goes
through the vision tower on its own; the decoder runs all its layers but the last, and its final
RMSNorm is applied. The last decoder layer is not run here: it belongs to the aggregator
(``reference-tokens`` in ``refcond-easyref``), which takes it over through :meth:`MllmEncoder.final_layer`,
so Qwen2-VL is read from disk once and its last layer is held once.

Behaviours kept from the official code on purpose (each has a test):

* the final norm *is* applied to the trunk output (the official ``multimodal_llm.norm = Identity()``
  sets an unused attribute, so ``model.norm`` still runs);
* positions are plain 1-D (``0..L-1`` on all three M-RoPE axes), not Qwen2-VL's image-aware M-RoPE,
  because the official forward passes no ``image_grid_thw`` / ``position_ids`` to the decoder;
* attention is causal, so the encoding depends on the order of the references.

Padding: groups of different sizes are padded on the left (the Qwen2-VL tokenizer's batching
convention), and positions count from each row's first real token, so a group encodes exactly as it
would alone: the official code only ever encodes one reference set at a time at inference.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.utils.checkpoint
from PIL.Image import Image
from pydantic import Field, model_validator
from transformers import AutoTokenizer, DynamicCache, Qwen2VLForConditionalGeneration

from refcond import (
    MIXED_SOURCE,
    BorrowedWeights,
    BuildContext,
    ComponentConfig,
    ConfigError,
    DeviceName,
    ReferenceEncoding,
    ReferenceImageError,
    check_device,
    load_pretrained,
    weights_fingerprint,
)

from refcond_encoders.mllm_caches import Prefix, PrefixCache, VisionCache, image_key

try:  # transformers >= 5: the PIL backend works without torchvision
    from transformers import Qwen2VLImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import Qwen2VLImageProcessor as _ImageProcessor

#: The instruction EasyRef was trained with; the prompt, if any, follows it.
EASYREF_INSTRUCTION = "Visualize a scene that closely resembles the provided images, capturing the essence and details described in this prompt:\n"

#: Qwen2-VL's chat template, used when a tokenizer comes without one.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_PATCH, _MERGE = (
    14,
    2,
)  # Qwen2-VL's ViT patch and merge sizes: one LLM token per 28x28 pixels
#: The official ``cond_image_size=336`` rule: about 12x12 LLM tokens per reference.
OFFICIAL_MIN_PIXELS = ((336 // 28 - 1) ** 2) * 28 * 28
OFFICIAL_MAX_PIXELS = ((336 // 28) ** 2 + 1) * 28 * 28
#: The image of the unconditional branch: a black 512x512 RGB image.
UNCONDITIONAL_SIZE = 512
#: The bound of ``min_pixels`` and ``max_pixels``: 4096 MLLM tokens per reference (about
#: 1792x1792 pixels), 28 times the official size and few enough that the attention over several
#: references fits in memory.
MAX_PIXELS = 4096 * 28 * 28
#: The most elongated reference Qwen2-VL's image processor takes (its ``smart_resize`` refuses a
#: longer side more than 200 times the shorter one); :meth:`MllmEncoder.inputs` refuses such a
#: reference before anything runs.
MAX_ASPECT_RATIO = 200

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class MllmEncoderConfig(ComponentConfig):
    """Options of the ``mllm`` encoder."""

    model: str | None = Field(
        default="Qwen/Qwen2-VL-2B-Instruct",
        description="Hub id or local folder of a Qwen2-VL model (weights, tokenizer, image processor). "
        "None only with MllmEncoder.from_model, which is given the model object.",
    )
    instruction: str = Field(
        default=EASYREF_INSTRUCTION,
        description="Text after the images in the user turn (EasyRef's template). Prompts given to encode(..., prompts=) follow it.",
    )
    append_prompt: bool = Field(
        default=True,
        description="Let the MLLM read the generation prompt after the instruction, as the official EasyRef does (its training "
        "text is template + caption, and the released weights were trained so). False reads the instruction alone: faster, "
        "since one encoding then serves every prompt over the same references.",
    )
    min_pixels: int = Field(
        default=OFFICIAL_MIN_PIXELS,
        gt=0,
        le=MAX_PIXELS,
        description=f"Fewest pixels a reference is resized to (aspect kept); at most {MAX_PIXELS}.",
    )
    max_pixels: int = Field(
        default=OFFICIAL_MAX_PIXELS,
        gt=0,
        le=MAX_PIXELS,
        description=f"Most pixels a reference is resized to (aspect kept); at most {MAX_PIXELS} (4096 MLLM tokens per reference).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16",
        description="Weights and activations dtype (official: bfloat16).",
    )
    device: DeviceName | None = Field(
        default=None,
        description="Device of the model, e.g. 'cuda', 'cuda:1', 'cpu'; None = the backbone's device (or the model's own).",
    )
    vision_cache_mb: float = Field(
        default=256,
        ge=0,
        le=2**20,
        description="Megabytes of vision-tower outputs kept per image (on the encoder's device), so a group sharing images with an "
        "earlier one runs the vision tower for its new images only; 0 turns the cache off. Not used while the encoder trains.",
    )
    prefix_cache_mb: float = Field(
        default=512,
        ge=0,
        le=2**20,
        description="Megabytes of decoder keys/values kept for the part of the sequence before the prompt (system, images, "
        "instruction), so a new prompt over the same references runs only its own tokens; 0 turns the cache off. "
        "Not used while the encoder trains.",
    )

    @model_validator(mode="after")
    def _pixel_range(self) -> MllmEncoderConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})"
            )
        return self


class MllmEncoder(torch.nn.Module):
    """Qwen2-VL over all references and an instruction at once: vision tower, all decoder layers but the last, final norm.

    Returns one row per group: the normed hidden states of the whole chat sequence ``[B, L, hidden]``
    (source -1: tokens mix references and text), left-padded. Its weights (vision tower, token
    embeddings, decoder layers ``0..n-2``, final norm) are submodules, borrowed from the Qwen2-VL it
    was loaded from (:meth:`borrowed_weights`): frozen when built, and left out of checkpoints
    unless a training stage unfreezes and fine-tunes them. The last decoder layer is held outside
    the module tree until :meth:`final_layer` hands it to the aggregator.

    In inference it keeps what a next call can reuse (:mod:`refcond_encoders.mllm_caches`): the
    vision tower's output per image, and the decoder's keys and values for the sequence before the
    prompt; a new prompt over the same references then runs only the prompt's tokens through the
    decoder. Results equal a full recomputation up to rounding (float32: 1e-5).
    """

    #: Every token mixes references (all images are read in one sequence): per-reference aggregators cannot read it.
    mixes_references = True

    def __init__(
        self,
        model: Qwen2VLForConditionalGeneration,
        image_processor: Any,
        tokenizer: Any,
        config: MllmEncoderConfig,
    ):
        super().__init__()
        language_model = _language_model(model)
        if len(language_model.layers) < 2:
            raise ConfigError(
                f"encoder 'mllm' needs a Qwen2-VL with at least 2 decoder layers (the last goes to the aggregator); got {len(language_model.layers)}."
            )
        self.config = config
        self.model_config = model.config
        # The modules are shared with ``model`` (no copy); ``model`` itself is left unchanged.
        self.visual = model.model.visual
        self.embed_tokens = language_model.embed_tokens
        self.layers = torch.nn.ModuleList(list(language_model.layers)[:-1])
        self.norm = language_model.norm
        # Outside the module tree, like the last layer: its float32 frequencies must not be cast by .to(dtype).
        self.__dict__["rotary_emb"] = language_model.rotary_emb
        self.__dict__["_last_layer"] = language_model.layers[
            -1
        ]  # not a submodule: the aggregator owns its copy
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = (
            getattr(tokenizer, "chat_template", None) or QWEN2VL_CHAT_TEMPLATE
        )
        self.embedding_dim = int(self.norm.weight.shape[0])
        self.image_token_id = int(model.config.image_token_id)
        self.source = config.model or getattr(model, "name_or_path", None) or None
        self._check_pieces()
        self._unconditional: tuple[Any, torch.Tensor] | None = None
        self.vision_cache = VisionCache(config.vision_cache_mb)
        self.prefix_cache = PrefixCache(config.prefix_cache_mb)
        self._cached_weights: tuple[Any, Any] | None = None  # the weights the caches' entries were computed with
        # Everything besides the pixels that the vision tower's output depends on: the resize rule and the processor.
        processor = image_processor.to_dict() if callable(getattr(image_processor, "to_dict", None)) else repr(image_processor)
        self._resize = json.dumps([config.min_pixels, config.max_pixels, processor], sort_keys=True, default=str)
        #: Recompute the decoder layers' activations in the backward pass (training only); see gradient_checkpointing_enable.
        self.gradient_checkpointing = False

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls, config: MllmEncoderConfig, context: BuildContext
    ) -> MllmEncoder:
        """Load ``config.model`` (hub id or folder): model, tokenizer and image processor, once."""
        if config.model is None:
            raise ConfigError(
                "encoder 'mllm': config model is None. Set it to a Qwen2-VL hub id or folder, e.g. model='Qwen/Qwen2-VL-2B-Instruct', "
                "or build the encoder in code with MllmEncoder.from_model(model, image_processor, tokenizer)."
            )
        who = "encoder 'mllm'"
        if config.device is not None:
            check_device(config.device, f"{who}: config device")
        model = load_pretrained(
            Qwen2VLForConditionalGeneration, config.model, who, dtype=_DTYPES[config.dtype], attn_implementation="sdpa"
        )
        tokenizer = load_pretrained(AutoTokenizer, config.model, who)
        image_processor = load_pretrained(_ImageProcessor, config.model, who)
        return cls.from_model(model, image_processor, tokenizer, config, context)

    @classmethod
    def from_model(
        cls,
        model: Qwen2VLForConditionalGeneration,
        image_processor: Any,
        tokenizer: Any,
        config: MllmEncoderConfig | None = None,
        context: BuildContext | None = None,
    ) -> MllmEncoder:
        """Build around an already loaded model (tests, or code that loaded Qwen2-VL itself).

        The model is cast to ``config.dtype`` and moved to ``config.device`` (or the backbone's device).
        """
        if config is None:  # keep the model's dtype
            dtype = next(
                (name for name, value in _DTYPES.items() if value == model.dtype),
                "float32",
            )
            config = MllmEncoderConfig(model=None, dtype=dtype)
        if not isinstance(model, Qwen2VLForConditionalGeneration):
            raise ConfigError(
                f"encoder 'mllm' needs a Qwen2VLForConditionalGeneration, got {type(model).__name__}."
            )
        backbone = context.backbone if context is not None else None
        device = config.device or (
            getattr(backbone, "device", None) if backbone is not None else None
        )
        encoder = cls(model, image_processor, tokenizer, config)
        encoder.to(dtype=_DTYPES[config.dtype])
        encoder.final_layer_source().to(dtype=_DTYPES[config.dtype])
        if device is not None:
            encoder.to(device)
            encoder.final_layer_source().to(device)
        return encoder

    def _check_pieces(self) -> None:
        vision = self.model_config.vision_config
        processor = self.image_processor
        for name, expected in (
            ("patch_size", vision.patch_size),
            ("merge_size", vision.spatial_merge_size),
            ("temporal_patch_size", vision.temporal_patch_size),
        ):
            got = getattr(processor, name, None)
            if got != expected:
                raise ConfigError(
                    f"encoder 'mllm': the image processor's {name} is {got}, but the model's vision tower expects {expected}. Load both from the same model."
                )
        image_token = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        if image_token != self.image_token_id:
            raise ConfigError(
                f"encoder 'mllm': the tokenizer's <|image_pad|> id is {image_token}, but the model's image_token_id is {self.image_token_id}. "
                "Load the tokenizer from the same model."
            )

    def borrowed_weights(self) -> list[BorrowedWeights]:
        """All of this module's weights are Qwen2-VL's: a checkpoint names them unless they were fine-tuned."""
        return [BorrowedWeights(module=self, source=self.source, prefix="")]

    def gradient_checkpointing_enable(self) -> None:
        """Trade compute for memory while training: the vision tower and the decoder layers recompute their activations in the backward pass."""
        self.gradient_checkpointing = True
        self.visual.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def gradient_checkpointing_disable(self) -> None:
        """Keep activations again (the default)."""
        self.gradient_checkpointing = False
        self.visual.gradient_checkpointing_disable()

    # -- parts for the aggregator -----------------------------------------------------------------

    def final_layer_source(self) -> torch.nn.Module:
        """The model's last decoder layer itself (not run by this encoder), until :meth:`final_layer` hands it over."""
        layer = self.__dict__["_last_layer"]
        if layer is None:
            raise ConfigError(
                "encoder 'mllm': the last decoder layer was handed to the aggregator built from this encoder, and the encoder "
                "keeps no second copy of it. Build another encoder (load the model again) for another 'reference-tokens' aggregator."
            )
        return layer

    def final_layer(self) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        """``(last decoder layer, final norm, rotary embedding)`` for EasyRef's aggregator, once, on the encoder's device and dtype.

        The aggregator runs its reference tokens through these and trains them. They are copies, so
        the model the encoder was built from and the encoder's own final norm stay as they were; and
        the encoder lets go of the last layer it held, so only the aggregator's copy stays in memory.

        :raises ConfigError: the layer was handed over already (build another encoder).
        """
        source = self.final_layer_source()
        parameter = self.norm.weight
        layer = copy.deepcopy(source).to(device=parameter.device, dtype=parameter.dtype)
        self.__dict__["_last_layer"] = None
        return (
            layer,
            copy.deepcopy(self.norm),
            copy.deepcopy(self.__dict__["rotary_emb"]),
        )

    # -- encoding ---------------------------------------------------------------------------------

    @property
    def reads_prompt(self) -> bool:
        """Whether the pipeline should pass the prompt to :meth:`encode` (``config.append_prompt``)."""
        return self.config.append_prompt

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def encode(
        self,
        references: Sequence[Sequence[Image]],
        prompts: Sequence[str] | None = None,
    ) -> ReferenceEncoding:
        """Encode each group with the instruction (plus ``prompts[b]``, if given) in one chat sequence."""
        groups = _check_groups(references)
        if prompts is not None and len(prompts) != len(groups):
            raise ConfigError(
                f"encoder 'mllm': got {len(prompts)} prompts for {len(groups)} reference groups; give one per group."
            )
        texts = [
            self.config.instruction + (prompts[b] if prompts is not None else "")
            for b in range(len(groups))
        ]
        return self._encode(groups, texts)

    def encode_unconditional(
        self, encoding: ReferenceEncoding, references: Sequence[Sequence[Image]]
    ) -> ReferenceEncoding:
        """EasyRef's "no reference": one black 512x512 image with the instruction, computed once and repeated per group.

        Its length differs from the conditional encoding's (it has one image); like it, every token is
        source -1. Recomputed only when the weights change (:func:`refcond.weights_fingerprint`'s layout
        and values: a frozen encoder keeps it across optimizer steps), device or dtype included. While
        the encoder itself trains, it is computed at each call with autograd, so the "no reference"
        rows of a batch train the encoder too, as in the official training.
        """
        from PIL import Image as PILImage

        black = PILImage.new("RGB", (UNCONDITIONAL_SIZE, UNCONDITIONAL_SIZE))
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            tokens = self._encode([[black]], [self.config.instruction]).tokens[0]
        else:
            _, layout, values = weights_fingerprint([self])
            if self._unconditional is None or self._unconditional[0] != (layout, values):
                self._unconditional = (
                    (layout, values),
                    self._encode([[black]], [self.config.instruction]).tokens[0].detach(),
                )
            tokens = self._unconditional[1]
        if tokens.is_inference() and not torch.is_inference_mode_enabled():
            tokens = (
                tokens.clone()
            )  # usable by autograd-tracked code (an aggregator in training)
        batch, length = encoding.batch_size, tokens.shape[0]
        return ReferenceEncoding(
            tokens[None].expand(batch, -1, -1),
            torch.ones(batch, length, dtype=torch.bool, device=tokens.device),
            torch.full(
                (batch, length), MIXED_SOURCE, dtype=torch.long, device=tokens.device
            ),
        )

    def inputs(
        self, groups: Sequence[Sequence[Image]], texts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """The model inputs of the groups: ``input_ids`` / ``attention_mask`` (left-padded), ``pixel_values``, ``image_grid_thw``.

        What the official ``processor(text=..., images=..., padding=True)`` produces, built from the
        tokenizer and image processor (transformers 5's processor needs torchvision for its video part).

        :raises ReferenceImageError: a reference the image processor would refuse for its size (an
            aspect ratio over :data:`MAX_ASPECT_RATIO`, or a size the installed processor's resize
            rule rejects), checked before anything runs.
        """
        self._check_sizes(groups)
        flat = [image for group in groups for image in group]
        size = {
            "shortest_edge": self.config.min_pixels,
            "longest_edge": self.config.max_pixels,
        }
        vision = self.image_processor(images=flat, size=size, return_tensors="pt")
        tokens_per_image = (
            vision["image_grid_thw"].prod(-1)
            // self.model_config.vision_config.spatial_merge_size**2
        ).tolist()
        prompts, start = [], 0
        for group, text in zip(groups, texts):
            prompts.append(self.render(tokens_per_image[start : start + len(group)], text))
            start += len(group)
        text_inputs = self.tokenizer(
            prompts, padding=True, padding_side="left", return_tensors="pt"
        )
        return {
            "input_ids": text_inputs["input_ids"],
            "attention_mask": text_inputs["attention_mask"],
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }

    def render(self, tokens_per_image: Sequence[int], text: str) -> str:
        """The chat sequence of one group as text: images (each as its count of ``<|image_pad|>``), then ``text``."""
        content = [{"type": "image"} for _ in tokens_per_image] + [{"type": "text", "text": text}]
        chat = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
        pieces = chat.split("<|image_pad|>")
        if len(pieces) != len(tokens_per_image) + 1:
            raise ConfigError(
                f"encoder 'mllm': the chat template rendered {len(pieces) - 1} image placeholders for {len(tokens_per_image)} images."
            )
        return pieces[0] + "".join("<|image_pad|>" * n + piece for n, piece in zip(tokens_per_image, pieces[1:]))

    def _check_sizes(self, groups: Sequence[Sequence[Image]]) -> None:
        """Refuse a reference Qwen2-VL's image processor would refuse for its size, naming it, the limit and the fix."""
        probe = getattr(self.image_processor, "get_number_of_image_patches", None)  # the installed processor's own resize rule
        bounds = {"min_pixels": self.config.min_pixels, "max_pixels": self.config.max_pixels}
        for b, group in enumerate(groups):
            for i, image in enumerate(group):
                width, height = image.size
                where = f"encoder 'mllm': reference {i} of group {b}{_source(image)}"
                if width < 1 or height < 1:
                    raise ReferenceImageError(f"{where} has no pixels ({width} wide, {height} high). Pass an image at least 1 pixel wide and high.")
                ratio = max(width, height) / min(width, height)
                if ratio > MAX_ASPECT_RATIO:
                    raise ReferenceImageError(
                        f"{where} is {width}x{height} pixels, an aspect ratio of {ratio:.4g}:1, but Qwen2-VL's image processor takes at most "
                        f"{MAX_ASPECT_RATIO}:1. Crop the image, or pad it to a less elongated shape (PIL.ImageOps.pad)."
                    )
                if probe is not None:
                    try:
                        probe(height, width, images_kwargs=bounds)
                    except ValueError as exc:
                        raise ReferenceImageError(
                            f"{where} is {width}x{height} pixels, a size Qwen2-VL's image processor refuses ({exc}). Resize or crop the image."
                        ) from None

    def image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> torch.Tensor:
        """``[tokens, hidden]``: every image through the vision tower on its own (as the official code), in order."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.visual.dtype)
        grid = image_grid_thw.to(self.device)
        bounds = [0, *grid.prod(-1).cumsum(0).tolist()]
        features = [
            self.visual(
                pixel_values[bounds[i] : bounds[i + 1]], grid_thw=grid[i : i + 1]
            ).pooler_output
            for i in range(grid.shape[0])
        ]
        return torch.cat(features)

    def trunk(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, L, hidden]``: decoder layers ``0..n-2`` and the final norm over the embedded sequence, padding zeroed."""
        input_ids = inputs["input_ids"].to(self.device)
        mask = inputs["attention_mask"].to(self.device).bool()
        embeds = self.embed_tokens(input_ids)
        image_mask = input_ids == self.image_token_id
        features = self.image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        if features.shape[0] != int(image_mask.sum()):
            raise ConfigError(
                f"encoder 'mllm': {features.shape[0]} image features for {int(image_mask.sum())} image tokens in the sequence."
            )
        embeds = embeds.masked_scatter(image_mask[..., None], features.to(embeds.dtype))
        hidden = run_decoder(
            self.layers,
            self.__dict__["rotary_emb"],
            embeds,
            mask,
            causal=True,
            checkpointing=self.gradient_checkpointing and self.training,
        )
        return self.norm(hidden) * mask[..., None].to(hidden.dtype)

    def _encode(self, groups: list[list[Image]], texts: Sequence[str]) -> ReferenceEncoding:
        if self._reusing():
            return self._encode_reusing(groups, texts)
        inputs = self.inputs(groups, texts)
        mask = inputs["attention_mask"].to(self.device).bool()
        tokens = self.trunk(inputs)
        return ReferenceEncoding(
            tokens,
            mask,
            torch.full(mask.shape, MIXED_SOURCE, dtype=torch.long, device=self.device),
        )

    # -- reusing earlier work (inference) ---------------------------------------------------------

    def _reusing(self) -> bool:
        """Whether this call reads and fills the caches: in inference only, not while the encoder trains or a weight of it takes gradients."""
        if self.training or not (self.vision_cache.enabled or self.prefix_cache.enabled):
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))

    def clear_caches(self) -> None:
        """Forget every cached vision output and prefix (weight changes are noticed without it)."""
        self.vision_cache.clear()
        self.prefix_cache.clear()

    def _encode_reusing(self, groups: list[list[Image]], texts: Sequence[str]) -> ReferenceEncoding:
        """:meth:`_encode` through the caches: one group at a time, each exactly as it would be encoded alone."""
        self._check_sizes(groups)
        _, layout, values = weights_fingerprint([self])
        if self._cached_weights != (layout, values):
            self.clear_caches()
            self._cached_weights = (layout, values)
        keys, features = self._cached_image_features(groups)
        rows = [self._row(group_keys, group_features, text) for group_keys, group_features, text in zip(keys, features, texts)]
        longest = max(row.shape[0] for row in rows)
        tokens = rows[0].new_zeros(len(rows), longest, rows[0].shape[-1])
        mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=tokens.device)
        for b, row in enumerate(rows):  # left-padded, as the batched path
            tokens[b, longest - row.shape[0] :] = row
            mask[b, longest - row.shape[0] :] = True
        return ReferenceEncoding(tokens, mask, torch.full(mask.shape, MIXED_SOURCE, dtype=torch.long, device=tokens.device))

    def _cached_image_features(self, groups: list[list[Image]]) -> tuple[list[list[str]], list[list[torch.Tensor]]]:
        """Every image's key and vision-tower output ``[tokens, hidden]``; the tower runs for the images the cache lacks only."""
        keys = [[image_key(image, self._resize) for image in group] for group in groups]
        found: dict[str, torch.Tensor | None] = {}
        missing: dict[str, Image] = {}
        for group, group_keys in zip(groups, keys):
            for image, key in zip(group, group_keys):
                if key not in found:
                    found[key] = self.vision_cache.get(key)
                    if found[key] is None:
                        missing[key] = image
        if missing:
            size = {"shortest_edge": self.config.min_pixels, "longest_edge": self.config.max_pixels}
            vision = self.image_processor(images=list(missing.values()), size=size, return_tensors="pt")
            counts = (vision["image_grid_thw"].prod(-1) // self.model_config.vision_config.spatial_merge_size**2).tolist()
            computed = self.image_features(vision["pixel_values"], vision["image_grid_thw"]).split(counts)
            for key, features in zip(missing, computed):
                found[key] = features.clone()  # its own storage: the cache counts (and keeps) this image's bytes only
                self.vision_cache.put(key, found[key])
        return keys, [[found[key] for key in group_keys] for group_keys in keys]  # type: ignore[misc]

    def _row(self, keys: list[str], features: list[torch.Tensor], text: str) -> torch.Tensor:
        """``[L, hidden]``: one group's trunk output; the part before the prompt from the prefix cache when it holds it."""
        counts = [int(f.shape[0]) for f in features]
        ids = self._token_ids(self.render(counts, text))
        split = _common_length(ids, self._token_ids(self._prefix_text(counts))) if self.prefix_cache.enabled else 0
        input_ids = torch.tensor([ids], device=self.device)
        image_mask = input_ids == self.image_token_id
        flat = torch.cat(features)
        if flat.shape[0] != int(image_mask.sum()):
            raise ConfigError(f"encoder 'mllm': {flat.shape[0]} image features for {int(image_mask.sum())} image tokens in the sequence.")
        embeds = self.embed_tokens(input_ids)
        embeds = embeds.masked_scatter(image_mask[..., None], flat.to(embeds.dtype))
        rotary = self.__dict__["rotary_emb"]
        prefix: Prefix | None = None
        if split:
            key = (tuple(keys), tuple(ids[:split]))
            prefix = self.prefix_cache.get(key)
            if prefix is None:
                cache = DynamicCache()
                prefix = Prefix.from_cache(cache, self.norm(continue_decoder(self.layers, rotary, embeds[:, :split], cache))[0])
                self.prefix_cache.put(key, prefix)
            if split == len(ids):
                return prefix.hidden
        rest = self.norm(continue_decoder(self.layers, rotary, embeds[:, split:], None if prefix is None else prefix.cache()))[0]
        return rest if prefix is None else torch.cat([prefix.hidden, rest])

    def _prefix_text(self, tokens_per_image: Sequence[int]) -> str:
        """The chat sequence up to the end of the instruction: what every prompt over these images shares ("" if the template hides it)."""
        marker = "\ue000"  # a private-use character: no template or instruction contains it
        rendered = self.render(tokens_per_image, marker)
        return rendered[: rendered.index(marker)] + self.config.instruction if marker in rendered else ""

    def _token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def continue_decoder(
    layers: Sequence[torch.nn.Module],
    rotary_emb: torch.nn.Module,
    hidden: torch.Tensor,
    cache: DynamicCache | None,
) -> torch.Tensor:
    """Run Qwen2-VL decoder layers over one unpadded row ``hidden [1, S, D]`` that follows the tokens ``cache`` holds.

    With ``P`` tokens in ``cache`` (0 for an empty one, or ``None``), the new tokens take 1-D
    positions ``P..P+S-1`` and attend causally to the cached tokens and to each other, so the
    result equals rows ``P..P+S-1`` of :func:`run_decoder` over the whole sequence (up to rounding).
    ``cache`` gets the new tokens' keys and values appended.
    """
    past = 0 if cache is None else cache.get_seq_length()
    length = hidden.shape[1]
    positions = torch.arange(past, past + length, device=hidden.device)[None]
    position_embeddings = rotary_emb(hidden, positions[None].expand(3, -1, -1))
    allowed = torch.ones(length, past + length, dtype=torch.bool, device=hidden.device).tril(diagonal=past)
    bias = torch.zeros(1, 1, length, past + length, dtype=hidden.dtype, device=hidden.device).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
    for layer in layers:
        hidden = layer(hidden, attention_mask=bias, position_embeddings=position_embeddings, **{_cache_argument(layer): cache})
    return hidden


def _cache_argument(layer: torch.nn.Module) -> str:
    """The name a decoder layer takes its key/value cache by: ``cache`` (newer transformers) or ``past_key_values`` (earlier)."""
    return _cache_argument_of(type(layer))


@functools.cache
def _cache_argument_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def run_decoder(
    layers: Sequence[torch.nn.Module],
    rotary_emb: torch.nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    causal: bool = True,
    checkpointing: bool = False,
) -> torch.Tensor:
    """Run Qwen2-VL decoder layers over ``hidden [B, L, D]`` with 1-D positions, as the official EasyRef forward.

    Positions count ``0, 1, ...`` from each row's first real token (``mask [B, L]`` bool), on all
    three M-RoPE axes; for an unpadded row that is ``arange(L)``. Real tokens attend to real tokens
    (earlier ones only when ``causal``); a padding query attends to itself only, so nothing is NaN.
    With ``checkpointing`` (and gradients enabled) each layer's activations are recomputed in the
    backward pass instead of kept.
    """
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    position_embeddings = rotary_emb(hidden, positions[None].expand(3, -1, -1))
    length = hidden.shape[1]
    allowed = mask[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        allowed = (
            allowed
            & torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        )
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=hidden.device)
    # An additive float mask: read the same way by the sdpa and eager attention implementations.
    bias = torch.zeros(
        allowed.shape, dtype=hidden.dtype, device=hidden.device
    ).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
    recompute = checkpointing and torch.is_grad_enabled()
    for layer in layers:
        if recompute:
            hidden = torch.utils.checkpoint.checkpoint(
                layer, hidden, attention_mask=bias, position_embeddings=position_embeddings, use_reentrant=False
            )
        else:
            hidden = layer(hidden, attention_mask=bias, position_embeddings=position_embeddings)
    return hidden


def _language_model(model: Qwen2VLForConditionalGeneration) -> torch.nn.Module:
    """The decoder (embed_tokens, layers, norm, rotary_emb): ``model.model.language_model`` in transformers 5."""
    inner = model.model
    language_model = getattr(inner, "language_model", None)
    if (
        language_model is None
    ):  # pragma: no cover - transformers 4.x: the decoder is model.model itself
        raise ConfigError(
            "encoder 'mllm' needs transformers >= 5 (Qwen2VLModel.language_model); upgrade transformers."
        )
    return language_model


def _check_groups(references: Sequence[Sequence[Image]]) -> list[list[Image]]:
    groups = [list(group) for group in references]
    if not groups:
        raise ConfigError(
            "encoder 'mllm': no reference groups given; pass a list of groups, each a list of images."
        )
    for b, group in enumerate(groups):
        if not group:
            raise ConfigError(
                f"encoder 'mllm': reference group {b} is empty; every group needs at least one image."
            )
        for i, image in enumerate(group):
            if not hasattr(image, "convert") or not hasattr(image, "size"):
                raise ConfigError(
                    f"encoder 'mllm': reference {i} of group {b} is a {type(image).__name__}, not a PIL image; load it with refcond.images.load_references."
                )
    return [
        [image if image.mode == "RGB" else image.convert("RGB") for image in group]
        for group in groups
    ]  # RGB images as they are: they keep the filename an error names


def _source(image: Image) -> str:
    """`` ('path')`` for an image read from a file (Pillow's and refcond's loaders set ``filename``), else nothing."""
    filename = getattr(image, "filename", None)
    return f" ({filename!r})" if isinstance(filename, str) and filename else ""
