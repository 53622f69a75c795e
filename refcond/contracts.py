"""The typed contracts between stages: what flows between encoder, aggregator and injectors.

Tensors keep a leading batch axis ``B`` of reference *groups*: one group conditions one image.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from PIL.Image import Image

#: ``source`` value of a token that mixes references or carries text.
MIXED_SOURCE = -1


@dataclass(frozen=True)
class _TokenSequence:
    tokens: torch.Tensor
    mask: torch.Tensor
    source: torch.Tensor

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.tokens.ndim != 3:
            raise ValueError(f"{name}.tokens must be [batch, length, dim], got shape {tuple(self.tokens.shape)}")
        expected = tuple(self.tokens.shape[:2])
        for attr in ("mask", "source"):
            value = getattr(self, attr)
            if tuple(value.shape) != expected:
                raise ValueError(f"{name}.{attr} must have shape {expected} (batch, length), got {tuple(value.shape)}")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"{name}.mask must be a bool tensor, got {self.mask.dtype}; build it with dtype=torch.bool")
        if self.source.dtype.is_floating_point or self.source.dtype == torch.bool:
            raise ValueError(f"{name}.source must hold reference indices as torch.long, got {self.source.dtype}")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    def repeat_interleave(self, repeats: int) -> Any:
        """Repeat every group ``repeats`` times along the batch (``num_images_per_prompt``)."""
        if repeats == 1:
            return self
        return type(self)(*(t.repeat_interleave(repeats, dim=0) for t in (self.tokens, self.mask, self.source)))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
        """Move to a device and cast the tokens (mask and source keep their dtypes)."""
        return type(self)(self.tokens.to(device=device, dtype=dtype), self.mask.to(device), self.source.to(device))

    @classmethod
    def concat_batches(cls, items: Sequence[Any]) -> Any:
        """Stack several sequences along the batch, padding lengths (padding is masked out)."""
        if not items:
            raise ValueError(f"{cls.__name__}.concat_batches needs at least one item")
        dims = {item.dim for item in items}
        if len(dims) != 1:
            raise ValueError(f"{cls.__name__}.concat_batches needs one token size, got {sorted(dims)}")
        length = max(item.tokens.shape[1] for item in items)

        def pad(t: torch.Tensor, value: Any) -> torch.Tensor:
            extra = length - t.shape[1]
            if extra == 0:
                return t
            shape = (t.shape[0], extra, *t.shape[2:])
            return torch.cat([t, t.new_full(shape, value)], dim=1)

        return cls(
            torch.cat([pad(i.tokens, 0) for i in items]),
            torch.cat([pad(i.mask, False) for i in items]),
            torch.cat([pad(i.source, MIXED_SOURCE) for i in items]),
        )


@dataclass(frozen=True)
class ReferenceEncoding(_TokenSequence):
    """What an encoder produces for a batch of reference groups.

    :ivar tokens: ``[B, L, D]`` features.
    :ivar mask: ``[B, L]`` bool, ``True`` for real tokens, ``False`` for padding (groups of
        different sizes in one batch).
    :ivar source: ``[B, L]`` long, the index of the reference a token came from, or
        :data:`MIXED_SOURCE` (-1) for tokens that mix references or carry text.
    """

    @classmethod
    def from_references(cls, features: torch.Tensor, counts: Sequence[int]) -> ReferenceEncoding:
        """Lay out per-reference features as one padded row per group.

        :param features: ``[M, T, D]``, the ``T`` tokens of each of the ``M`` references of all
            groups, group after group (for an encoder that reads each reference on its own).
        :param counts: how many references each group has (summing to ``M``).
        """
        if sum(counts) != features.shape[0]:
            raise ValueError(f"counts {list(counts)} add up to {sum(counts)}, but there are features for {features.shape[0]} references")
        per_reference = features.shape[1]
        rows, start = [], 0
        for count in counts:
            tokens = features[start : start + count].reshape(1, count * per_reference, -1)
            source = torch.arange(count, device=features.device).repeat_interleave(per_reference)[None]
            rows.append(cls(tokens, torch.ones_like(source, dtype=torch.bool), source))
            start += count
        return cls.concat_batches(rows)


@dataclass(frozen=True)
class Condition(_TokenSequence):
    """What an aggregator produces: the tokens the injectors feed into the UNet.

    Same fields as :class:`ReferenceEncoding`. ``source`` is kept so that projectors which work per
    reference (IP-Adapter Plus' resampler) can tell concatenated references apart.
    """


@dataclass
class BuildContext:
    """What a factory may use while building a component: the parts built before it.

    Built in order backbone, encoder, aggregator, injectors; a field not yet built is ``None``.
    """

    backbone: Backbone | None = None
    encoder: Encoder | None = None
    aggregator: Aggregator | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BorrowedWeights:
    """Pretrained weights a component uses but does not own: checkpoints name them instead of storing them.

    A component lists them in an optional ``borrowed_weights()`` method. refcond freezes them when
    the composition is built (``requires_grad = False``); a checkpoint then records their source
    and a content hash and leaves their tensors out. Once they are trained (any parameter requires
    grad when saving) or were loaded from a checkpoint that carried them (a fine-tuned copy), they
    count as the component's own and are stored like the rest.

    :ivar module: the module holding the weights (the component itself, a submodule, or a model
        kept outside the component's module tree, such as a pipeline's image encoder).
    :ivar source: where they came from: a Hugging Face hub id or a local folder, as the user gave it.
    :ivar prefix: where they sit in the component's ``state_dict()``: ``""`` for all of it,
        ``"visual."`` for one part, ``None`` when they are not in it at all (a model the component
        only reads, outside its module tree).
    """

    module: torch.nn.Module
    source: str | None
    prefix: str | None = ""


@runtime_checkable
class Backbone(Protocol):
    """A diffusers text-to-image pipeline and the facts about its UNet that the core and injectors need.

    Built by a factory registered with ``refcond_register_backbones``. Every member below is read
    by the core: ``device`` and ``dtype`` place fresh components, ``model_id`` is recorded in
    checkpoints so :func:`refcond.load` can rebuild without a pipeline, and ``accepts`` (also
    looked up on the registered factory) lets refcond infer the backbone of a pipeline.
    :func:`refcond.testing.check_backbone` checks them.
    """

    name: str
    pipeline: DiffusionPipeline

    @property
    def unet(self) -> UNet2DConditionModel:
        """The pipeline's denoising UNet."""
        ...

    @property
    def cross_attention_dim(self) -> int:
        """Size of the text tokens the UNet's cross-attention reads."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the UNet's weights are: fresh components are built there."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's weights dtype: fresh components are built in it."""
        ...

    @property
    def model_id(self) -> str | None:
        """Hub id or local folder the pipeline was loaded from; ``None`` for a pipeline built in memory."""
        ...

    def accepts(self, pipeline: Any) -> bool:
        """Whether this kind of backbone can drive ``pipeline`` (define it on the factory class too)."""
        ...


@runtime_checkable
class Encoder(Protocol):
    """Turns reference groups into features.

    ``embedding_dim`` is the feature size ``D`` of the encoding it returns. An encoder that reads
    the prompt together with the references (an MLLM given an instruction) sets ``reads_prompt =
    True``; the pipeline then calls ``encode(references, prompts=[...])`` with one prompt per group
    and caches the condition by references and prompt. Other encoders set it ``False`` and are
    called without ``prompts`` (an encoder written before ``reads_prompt`` existed is read as
    ``False``).

    ``mixes_references`` says whether its tokens mix references (source -1 everywhere, as an MLLM
    that reads all references in one sequence produces); components that need per-reference
    tokens (the ``mean`` aggregator, the resampler projector) refuse such an encoder when the
    composition is built. Read as ``False`` when absent.
    """

    embedding_dim: int
    reads_prompt: bool
    mixes_references: bool

    def encode(self, references: Sequence[Sequence[Image]], prompts: Sequence[str] | None = None) -> ReferenceEncoding:
        """Encode a batch of reference groups (each a non-empty list of RGB PIL images).

        :param prompts: one prompt per group; passed only when ``reads_prompt`` is true.
        """
        ...

    def encode_unconditional(self, encoding: ReferenceEncoding, references: Sequence[Sequence[Image]]) -> ReferenceEncoding:
        """The encoding of "no reference" used by the unconditional branch of classifier-free guidance.

        It has the same structure as ``encoding`` (the conditional encoding of ``references``): the
        same shape, mask and source. An encoding whose tokens all mix references (source -1, an MLLM
        that reads them at once) has no per-reference layout to keep; its unconditional encoding has
        the same batch and token size and all sources -1, but may have another length.
        """
        ...


@runtime_checkable
class Aggregator(Protocol):
    """Turns a :class:`ReferenceEncoding` into a :class:`Condition`."""

    def output_dim(self, input_dim: int) -> int:
        """The token size of the condition, given the encoder's ``embedding_dim``."""
        ...

    def __call__(self, encoding: ReferenceEncoding, weights: torch.Tensor | None = None) -> Condition:
        """Aggregate. ``weights`` (``[B, N]``, optional) weigh the references of each group."""
        ...


@runtime_checkable
class Attachment(Protocol):
    """An injector attached to one UNet."""

    def condition(
        self,
        condition: Condition | None,
        unconditional: Condition | None,
        scale: float | dict[str, Any] | None = None,
    ) -> AbstractContextManager[None]:
        """Feed a condition to the UNet for the duration of a ``with`` block (one generation).

        ``unconditional`` is the condition of the classifier-free-guidance negative branch. Both are
        ``None`` when the composition has no encoder; an injector that needs them then refuses to build.
        Work that depends only on the condition is done here, once, not at every denoising step.
        """
        ...

    def detach(self) -> None:
        """Remove the injector, restoring the UNet exactly as it was before ``attach``."""
        ...


@runtime_checkable
class ReferenceAdapter(Protocol):
    """An :class:`Attachment` that learns from the references themselves before generating.

    The tuning-based baseline (a LoRA fine-tuned on each reference group) is one. The pipeline calls
    :meth:`adapt` before binding the condition; an implementation should cache its result by
    reference content so a second prompt over the same references costs nothing.
    """

    def adapt(self, references: Sequence[Image], captions: Sequence[str] | None = None) -> None:
        """Adapt to one reference group (RGB PIL images), with an optional caption per reference."""
        ...


@runtime_checkable
class Injector(Protocol):
    """Changes a UNet so that it reads a :class:`Condition`."""

    def attach(self, unet: UNet2DConditionModel) -> Attachment:
        """Attach to ``unet`` and return the handle that conditions and detaches it."""
        ...


@dataclass
class ImportedCheckpoint:
    """A foreign checkpoint translated into refcond's terms.

    :ivar composition: settings the file implies, as a partial composition dict (for example
        ``{"encoder": {"config": {"output": "hidden_states"}}}``); they override the recipe's defaults
        and are overridden by the caller's.
    :ivar state_dict: weights keyed by role: ``encoder.*``, ``aggregator.*``, ``injector.<i>.*``.
    :ivar source: where the weights came from, for error messages.
    :ivar optional_roles: roles the file may hold no weights for; they keep the weights they were
        built with. Weights a component declares as :class:`BorrowedWeights` may be absent anyway.
    :ivar recipe: the registered composition the file is made for (``"ip-adapter"``), so that
        ``refcond.load(path, pipe)`` can build it without being told; ``None`` when ``composition``
        is complete (refcond's own checkpoints) or the file fits several recipes.
    """

    composition: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    source: str = ""
    optional_roles: frozenset[str] = frozenset()
    recipe: str | None = None


@runtime_checkable
class CheckpointFormat(Protocol):
    """Recognises and converts one checkpoint layout."""

    def detect(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
        """Whether the file is in this format (judged from its keys and metadata only)."""
        ...

    def convert(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], backbone: Backbone | None) -> ImportedCheckpoint:
        """Translate the file; raise :class:`refcond.CheckpointError` naming key and shape on mismatch."""
        ...

    # Optional: a format that can also write its layout defines
    #     save(self, pipeline: RefcondPipeline, path: str | Path) -> Path
    # raising refcond.ConfigError when the composition has no such layout; `refcond train`'s
    # `export = ["<format name>"]` calls it when a run ends.


@runtime_checkable
class Metric(Protocol):
    """Scores generated images, one value per image: what a factory registered with ``refcond_register_metrics`` returns.

    A call scores a batch of generated images. The three arguments are parallel lists with one
    entry per generated image: ``images[i]`` was generated from the reference group
    ``references[i]`` and the prompt ``prompts[i]`` (the same group or prompt object may serve
    several images). A metric reads the arguments it needs and ignores the others.

    The result maps each measure the metric reports (one name or several, such as ``"clip-i"``)
    to a list of ``len(images)`` floats, ``result[name][i]`` scoring ``images[i]``. Averaging,
    confidence intervals and tables are the evaluation harness's work, not the metric's. Bad
    input (empty or unequal lists, an empty group, something that is not an image) raises
    :class:`refcond.ConfigError` or :class:`refcond.ReferenceImageError` naming its position.
    """

    def __call__(
        self,
        images: Sequence[Image],
        references: Sequence[Sequence[Image]],
        prompts: Sequence[str],
    ) -> dict[str, list[float]]:
        """Score every image: ``{measure: [value of images[0], value of images[1], ...]}``."""
        ...
