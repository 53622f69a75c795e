"""Conformance checks: run tiny CPU tensors through a component and assert refcond's contracts.

A plugin author calls them from their own tests, with the component their factory builds::

    from refcond.testing import check_aggregator, check_backbone, check_encoder, check_injector

    def test_my_aggregator_conforms():
        check_aggregator(MyAggregator(), fixed_length=4)

Each check raises :class:`AssertionError` with a message naming the component, what the contract
asks and what the component did, so a failure reads as a to-do item. Each returns what it produced
(an encoder's :class:`ReferenceEncoding`, an aggregator's :class:`Condition`), so checks chain:
``check_aggregator(agg, check_encoder(enc))``. The checks are generic: they use only the
protocols of :mod:`refcond.contracts`, never a particular implementation.

Each check's docstring states the inputs it uses by default (the plugin author guide tabulates
them, in docs/plugin-author-guide.md, section "Tests").

"The same result" means ``torch.allclose`` with ``atol=1e-5, rtol=1e-4`` (``check_injector`` on a
float16 or bfloat16 UNet: 1e-2); the output of an injector at ``reference_scale = 0`` and after
``detach()`` must be bit-identical (``torch.equal``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from PIL.Image import Image

from refcond.contracts import (
    MIXED_SOURCE,
    Aggregator,
    Backbone,
    Condition,
    Encoder,
    Injector,
    ReferenceEncoding,
)
from refcond.errors import RefcondError
from refcond.testing.images import reference_images

#: Tolerances for "the same result" where floating-point reordering is legitimate (float32).
ATOL = 1e-5
RTOL = 1e-4
#: The same for half-precision UNets (float16, bfloat16).
HALF_TOL = 1e-2
#: Magnitude of the values :func:`make_condition` writes into padding (mask ``False``): large, so an
#: injector that reads padding changes its output visibly, yet finite in float16.
PADDING_GARBAGE = 1e3

__all__ = ["check_aggregator", "check_backbone", "check_encoder", "check_injector", "make_condition", "make_encoding"]
# -- inputs ---------------------------------------------------------------------------------------


def make_encoding(
    reference_counts: Sequence[int] = (3, 1),
    *,
    tokens_per_reference: int = 2,
    dim: int = 8,
    mixed: bool = False,
    seed: int = 0,
) -> ReferenceEncoding:
    """A random encoding with one row per group, padded to the longest group.

    :param reference_counts: how many references each group has.
    :param tokens_per_reference: tokens each reference contributes.
    :param mixed: mark every token :data:`MIXED_SOURCE` (as an encoder that reads all references
        at once does) instead of giving it its reference's index.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for count in reference_counts:
        length = count * tokens_per_reference
        tokens = torch.randn(1, length, dim, generator=generator)
        source = torch.arange(count).repeat_interleave(tokens_per_reference)[None]
        if mixed:
            source = torch.full_like(source, MIXED_SOURCE)
        rows.append(ReferenceEncoding(tokens, torch.ones(1, length, dtype=torch.bool), source))
    return ReferenceEncoding.concat_batches(rows)


def make_condition(
    batch: int = 1,
    length: int = 4,
    dim: int = 32,
    *,
    seed: int = 0,
    valid: Sequence[int] | None = None,
) -> Condition:
    """A random condition of ``batch`` rows, ``length`` tokens of size ``dim``, source -1.

    :param valid: how many tokens of each row are real (one number per row, each 1..``length``);
        the rest of the row is padding: ``mask`` False, and tokens filled with large random values
        (magnitude :data:`PADDING_GARBAGE`), not zeros, so that a component that reads padding
        shows it. Default: every token is real.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, dim, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if valid is not None:
        if len(valid) != batch or not all(1 <= int(v) <= length for v in valid):
            raise ValueError(f"valid must give 1..{length} real tokens for each of the {batch} rows, got {list(valid)}")
        for b, count in enumerate(valid):
            mask[b, int(count) :] = False
    return _fill_padding(Condition(tokens, mask, torch.full((batch, length), MIXED_SOURCE)), seed=seed)


def _fill_padding(condition: Condition, seed: int) -> Condition:
    """``condition`` with garbage in every padding position (mask False)."""
    if bool(condition.mask.all()):
        return condition
    generator = torch.Generator().manual_seed(seed + 1000)
    garbage = PADDING_GARBAGE * torch.randn(condition.tokens.shape, generator=generator).to(condition.tokens)
    tokens = torch.where(condition.mask[..., None], condition.tokens, garbage)
    return Condition(tokens, condition.mask, condition.source)


#: What :func:`check_encoder` asks an encoder with ``reads_prompt = True`` to read, and then the
#: different prompts that must change its encoding (cycled over the groups).
DEFAULT_PROMPTS = ("a photo of a dog on a sunny beach", "a watercolour of a red house by a lake")
OTHER_PROMPTS = ("a pencil sketch of a cat in the snow at night", "a neon city street in the rain")


# -- encoder --------------------------------------------------------------------------------------


def check_encoder(
    encoder: Encoder,
    references: Sequence[Sequence[Image]] | None = None,
    prompts: Sequence[str] | None = None,
) -> ReferenceEncoding:
    """Check an :class:`refcond.Encoder` on a batch of reference groups; return its encoding.

    It asserts that ``embedding_dim`` is a positive int and ``reads_prompt`` a bool; that
    ``mixes_references`` (optional, read as False) is a bool that is True exactly when every token
    has source -1; that ``encode`` returns a :class:`ReferenceEncoding` with one row per group, tokens of size
    ``embedding_dim``, finite values, sources within range (a reference index or -1), and that each
    group encodes the same in the batch as alone (padding is masked and groups do not leak into
    each other); that ``encode_unconditional`` returns the same structure (for an encoding whose
    tokens all mix references, source -1: the same batch and token size, any length, all source
    -1); and, when the encoder has trainable parameters, that gradients reach them (no
    ``torch.no_grad`` inside the component).

    ``reads_prompt = False``: ``encode(references)`` is called without prompts, as the pipeline
    calls it. ``reads_prompt = True``: ``encode(references, prompts=[...])`` is called with one
    prompt per group (each group alone with its own prompt, too), and a second call with other
    prompts must change every group's encoding.

    Defaults: ``references`` are two groups of :func:`refcond.testing.reference_images` (2 and 1
    images, 48x48 RGB), so the shorter row needs padding; ``prompts`` (used only when
    ``reads_prompt`` is true) cycle through :data:`DEFAULT_PROMPTS`, and the other prompts through
    :data:`OTHER_PROMPTS`. Tolerance: ``atol=1e-5, rtol=1e-4``.

    :param references: the groups to encode, each a non-empty list of RGB PIL images.
    :param prompts: one prompt per group, for an encoder with ``reads_prompt = True``.
    """
    who = _name(encoder)
    groups = [list(group) for group in references] if references is not None else [reference_images(2, seed=1), reference_images(1, seed=2)]
    if not groups or any(not group for group in groups):
        raise ValueError("check_encoder needs at least one group, and every group at least one image.")

    dim = getattr(encoder, "embedding_dim", None)
    _require(isinstance(dim, int) and dim > 0, who, f"embedding_dim must be a positive int (the feature size D of its encodings), got {dim!r}.")
    reads_prompt = _reads_prompt(encoder, who)
    if reads_prompt:
        prompts = list(prompts) if prompts is not None else [DEFAULT_PROMPTS[b % len(DEFAULT_PROMPTS)] for b in range(len(groups))]
        if len(prompts) != len(groups):
            raise ValueError(f"check_encoder needs one prompt per group: got {len(prompts)} prompts for {len(groups)} groups.")
    elif prompts is not None:
        raise ValueError("check_encoder: prompts are only given to an encoder with reads_prompt = True; this one has reads_prompt = False.")

    def encode(batch: list[list[Image]], texts: list[str] | None) -> ReferenceEncoding:
        if texts is None:
            return encoder.encode(batch)
        try:
            return encoder.encode(batch, prompts=texts)  # type: ignore[call-arg]
        except TypeError as exc:
            raise AssertionError(
                f"{who}: reads_prompt is True, so the pipeline calls encode(references, prompts=[one per group]), "
                f"but that call raised TypeError: {exc}. Accept a `prompts` keyword argument (a list of str, one per group), "
                "or set reads_prompt = False."
            ) from exc

    with torch.enable_grad():  # the caller may be inside no_grad; the gradient check needs a graph
        encoding = encode(groups, prompts)
    method = "encode(references, prompts=...)" if reads_prompt else "encode()"
    _check_sequence(encoding, ReferenceEncoding, who, method, [len(g) for g in groups])
    _require(
        encoding.dim == dim,
        who,
        f"{method} returned tokens of size {encoding.dim}, but embedding_dim is {dim}. "
        "Aggregators and injectors are built from embedding_dim, so the two must agree.",
    )

    _require_mixes_references(encoder, encoding, who, method)

    with torch.no_grad():
        for b, group in enumerate(groups):
            alone = encode([group], None if prompts is None else [prompts[b]])
            _require_same_row(encoding, b, alone, who, method)
        if reads_prompt:
            assert prompts is not None
            others = [OTHER_PROMPTS[b % len(OTHER_PROMPTS)] for b in range(len(groups))]
            others = [p if p != prompts[b] else p + ", in the style of an old postcard" for b, p in enumerate(others)]
            changed = encode(groups, others)
            _check_sequence(changed, ReferenceEncoding, who, method, [len(g) for g in groups])
            for b in range(len(groups)):
                _require(
                    not _same_row(encoding, b, changed, b),
                    who,
                    f"reads_prompt is True, but group {b} encodes the same with the prompt {prompts[b]!r} as with {others[b]!r}: "
                    "the prompt does not reach the encoding. Read prompts[b] together with group b in encode(), "
                    "or set reads_prompt = False (the pipeline then encodes once per reference group, whatever the prompt).",
                )

        unconditional = encoder.encode_unconditional(encoding, groups)
    _check_sequence(unconditional, ReferenceEncoding, who, "encode_unconditional()", [len(g) for g in groups])
    if _all_mixed(encoding):
        # Tokens that mix references (an MLLM reading them all at once) have no per-reference layout
        # to keep: the "no reference" sequence may have another length, but must be mixed as well.
        _require(
            unconditional.dim == encoding.dim and _all_mixed(unconditional),
            who,
            "encode_unconditional() must return tokens of the same size as encode() "
            f"({unconditional.dim} for {encoding.dim}), every one of source -1 like the conditional encoding's.",
        )
    else:
        _require_same_structure(encoding, unconditional, who)

    _require_gradients(encoder, encoding.tokens[encoding.mask], who, method)
    return encoding


def _reads_prompt(encoder: Any, who: str) -> bool:
    missing = object()
    value = getattr(encoder, "reads_prompt", missing)
    _require(
        value is not missing,
        who,
        "declares no reads_prompt. Add the class attribute `reads_prompt = False` when encode() does not read the prompt, "
        "or `reads_prompt = True` when the pipeline must call encode(references, prompts=[one per group]) "
        "(an encoder that reads the prompt with the references, such as an MLLM given an instruction).",
    )
    _require(
        isinstance(value, bool),
        who,
        f"reads_prompt must be a bool (True or False), got {value!r} of type {type(value).__name__}. "
        "The pipeline decides from it whether to pass prompts to encode().",
    )
    return bool(value)


def _require_mixes_references(encoder: Any, encoding: ReferenceEncoding, who: str, method: str) -> None:
    """``mixes_references`` (optional, read as False) must say whether every token has source -1."""
    declared = getattr(encoder, "mixes_references", None)
    _require(
        declared is None or isinstance(declared, bool),
        who,
        f"mixes_references must be a bool, got {declared!r} of type {type(declared).__name__}.",
    )
    mixed = _all_mixed(encoding)
    if declared is None:
        _require(
            not mixed,
            who,
            f"every token {method} returned has source -1 (tokens that mix references), but the encoder does not declare "
            "mixes_references = True: refcond reads it as False and lets per-reference components (the mean aggregator, "
            "the resampler projector) be built on it. Add the class attribute `mixes_references = True`.",
        )
    else:
        _require(
            declared == mixed,
            who,
            f"mixes_references is {declared}, but {method} returned "
            + ("tokens that all have source -1 (they mix references)." if mixed else "tokens with reference indices as source.")
            + " Declare mixes_references = True exactly when every token mixes references (source -1).",
        )


def _all_mixed(encoding: ReferenceEncoding) -> bool:
    return bool((encoding.source[encoding.mask] == MIXED_SOURCE).all())


def _require_same_structure(encoding: ReferenceEncoding, unconditional: ReferenceEncoding, who: str) -> None:
    _require(
        unconditional.tokens.shape == encoding.tokens.shape
        and torch.equal(unconditional.mask, encoding.mask)
        and torch.equal(unconditional.source.cpu(), encoding.source.cpu()),
        who,
        "encode_unconditional() must return the same structure as encode() (tokens shape, mask and source): "
        f"got tokens {tuple(unconditional.tokens.shape)} for {tuple(encoding.tokens.shape)}"
        + ("" if torch.equal(unconditional.mask, encoding.mask) else ", and a different mask")
        + ". Classifier-free guidance runs both through the same aggregator and injectors.",
    )

# -- aggregator -----------------------------------------------------------------------------------


def check_aggregator(aggregator: Aggregator, encoding: ReferenceEncoding | None = None, fixed_length: int | None = None) -> Condition:
    """Check an :class:`refcond.Aggregator` on an encoding; return the condition it made.

    Defaults: the encoding is :func:`make_encoding` (groups of 3 and 1 references, 2 tokens each,
    size 8), on the device and dtype of the aggregator's weights; tolerance ``atol=1e-5,
    rtol=1e-4``. It asserts that the aggregator returns a :class:`Condition` with one row per group,
    tokens of size ``output_dim(encoding.dim)``, finite values and at least one valid token per row;
    that each group aggregates the same in the batch as alone (padding is ignored); and that
    gradients flow from the condition back to the encoding (and to its own trainable parameters).

    :param fixed_length: the number of condition tokens the aggregator promises whatever the
        number of references; checked with 1, 2 and 5 references laid out like ``encoding``.
    """
    who = _name(aggregator)
    encoding = encoding if encoding is not None else _on_parameters_device(make_encoding(), aggregator)
    counts = [_reference_count(encoding, b) for b in range(encoding.batch_size)]

    expected_dim = aggregator.output_dim(encoding.dim)
    _require(isinstance(expected_dim, int) and expected_dim > 0, who, f"output_dim({encoding.dim}) must be a positive int, got {expected_dim!r}.")

    with torch.enable_grad():
        leaf = encoding.tokens.detach().clone().requires_grad_(True)
        condition = aggregator(ReferenceEncoding(leaf, encoding.mask, encoding.source))
    _check_sequence(condition, Condition, who, "__call__()", counts)
    _require(
        condition.dim == expected_dim,
        who,
        f"returned condition tokens of size {condition.dim}, but output_dim({encoding.dim}) is {expected_dim}. "
        "Injectors size their projections from output_dim, so the two must agree.",
    )

    with torch.no_grad():
        for b in range(encoding.batch_size):
            _require_same_row(condition, b, aggregator(_row(encoding, b)), who, "__call__()")

    _require(
        condition.tokens.requires_grad,
        who,
        "the condition carries no gradient back to the encoding: is __call__ wrapped in torch.no_grad, "
        "or does it .detach() the tokens? Training an encoder through this aggregator would silently stop.",
    )
    (grad,) = torch.autograd.grad(condition.tokens[condition.mask].sum(), leaf, allow_unused=True, retain_graph=True)
    _require(grad is not None and bool(grad.abs().sum() > 0), who, "the condition does not depend on the encoding's tokens (zero gradient).")
    _require_gradients(aggregator, condition.tokens[condition.mask], who, "__call__()")

    if fixed_length is not None:
        tokens_per_reference = _tokens_per_reference(encoding)
        mixed = bool((encoding.source[encoding.mask] == MIXED_SOURCE).all())
        lengths = {}
        with torch.no_grad():
            for n in (1, 2, 5):
                sample = make_encoding([n], tokens_per_reference=tokens_per_reference, dim=encoding.dim, mixed=mixed, seed=n)
                sample = sample.to(encoding.tokens.device, encoding.tokens.dtype)
                lengths[n] = int(aggregator(sample).tokens.shape[1])
        _require(
            all(length == fixed_length for length in lengths.values()),
            who,
            f"promised {fixed_length} condition tokens whatever the number of references, but returned "
            + ", ".join(f"{length} for {n} reference(s)" for n, length in lengths.items())
            + ".",
        )
    return condition


# -- backbone -------------------------------------------------------------------------------------


def check_backbone(backbone: Backbone, pipeline: Any = None) -> None:
    """Check a :class:`refcond.Backbone`: every member the core reads is there and tells the truth.

    It reads each member of the protocol and asserts that ``name`` is a non-empty str;
    ``pipeline`` is the diffusers pipeline (``pipeline`` itself when given: refcond conditions the
    user's pipeline in place, never a copy) and ``unet`` is that pipeline's UNet, a
    ``torch.nn.Module``; ``cross_attention_dim`` is an int equal to
    ``unet.config.cross_attention_dim``; ``device`` is a ``torch.device`` and ``dtype`` a
    ``torch.dtype``, both those of the UNet's parameters (fresh components are built there);
    ``model_id`` is a non-empty str or ``None``; ``accepts(backbone.pipeline)`` returns ``True``, on
    the instance and on its class (refcond asks the registered class to infer the backbone of a
    pipeline, so it is a classmethod or staticmethod); and ``accepts`` answers ``False``, without
    raising, for an object that is no pipeline (refcond asks every registered backbone).

    Defaults: none; it runs no model, so it takes milliseconds.

    :param pipeline: the pipeline the backbone was built from (``context.extras["pipeline"]``),
        when it was built from one.
    """
    who = _name(backbone)

    def member(attr: str, hint: str) -> Any:
        try:
            return getattr(backbone, attr)
        except AttributeError as exc:
            raise AssertionError(f"{who}: the Backbone member `{attr}` is missing ({exc}). {hint}") from exc
        except Exception as exc:  # a property that fails is as good as missing, but says why
            raise AssertionError(f"{who}: reading the Backbone member `{attr}` raised {type(exc).__name__}: {exc}. {hint}") from exc

    name = member("name", "Set `name` to the name the backbone is registered under, e.g. name = 'sd15'.")
    _require(
        isinstance(name, str) and bool(name),
        who,
        f"`name` must be a non-empty str (the name it is registered under, e.g. 'sd15'), got {name!r}.",
    )

    pipe = member("pipeline", "Keep the diffusers pipeline the factory received (context.extras['pipeline']) or loaded as `self.pipeline`.")
    _require(pipe is not None, who, "`pipeline` is None: keep the diffusers pipeline the backbone drives as `self.pipeline`.")
    if pipeline is not None:
        _require(
            pipe is pipeline,
            who,
            f"`pipeline` is a {type(pipe).__name__} other than the pipeline it was built from: keep the very object the factory "
            "received in context.extras['pipeline'] (refcond changes the user's pipeline in place and detach() gives it back), never a copy.",
        )

    unet = member("unet", "Add a property `unet` returning self.pipeline.unet.")
    _require(
        isinstance(unet, torch.nn.Module) and hasattr(unet, "config"),
        who,
        f"`unet` must be the pipeline's UNet (a torch.nn.Module with a diffusers config), got {type(unet).__name__}.",
    )
    _require(
        unet is getattr(pipe, "unet", None),
        who,
        "`unet` is not `pipeline.unet`: injectors attach to backbone.unet while the pipeline denoises with pipeline.unet, "
        "so the two must be the same object. Return self.pipeline.unet.",
    )
    parameter = next((p for p in unet.parameters() if p.is_floating_point()), None)
    _require(parameter is not None, who, "the UNet has no floating-point parameters to read its device and dtype from.")
    assert parameter is not None

    dim = member("cross_attention_dim", "Add a property `cross_attention_dim` returning the UNet config's cross_attention_dim as an int.")
    expected_dim = _cross_attention_dim(unet)
    _require(
        isinstance(dim, int) and not isinstance(dim, bool) and dim == expected_dim,
        who,
        f"`cross_attention_dim` must be the int unet.config.cross_attention_dim ({expected_dim}): the size of the text tokens "
        f"the UNet's cross-attention reads, from which injectors size their projections; got {dim!r}.",
    )

    device = member("device", "Add a property `device` returning the UNet's device (self.pipeline.unet.device).")
    _require(
        isinstance(device, torch.device) and _same_device(device, parameter.device),
        who,
        f"`device` must be the torch.device of the UNet's parameters ({parameter.device}), where fresh components are built; "
        f"got {device!r}. Return self.pipeline.unet.device (a property, so it follows pipe.to(...)).",
    )
    dtype = member("dtype", "Add a property `dtype` returning the UNet's dtype (self.pipeline.unet.dtype).")
    _require(
        isinstance(dtype, torch.dtype) and dtype == parameter.dtype,
        who,
        f"`dtype` must be the torch.dtype of the UNet's parameters ({parameter.dtype}), in which fresh components are built; "
        f"got {dtype!r}. Return self.pipeline.unet.dtype.",
    )

    model_id = member(
        "model_id",
        "Add a property `model_id` returning the hub id or local folder the pipeline was loaded from, or None for a "
        "pipeline built in memory (refcond records it in checkpoints so refcond.load can rebuild the pipeline).",
    )
    _require(
        model_id is None or (isinstance(model_id, str) and bool(model_id)),
        who,
        f"`model_id` must be a hub id or local folder (a non-empty str), or None for a pipeline built in memory; got {model_id!r}.",
    )

    accepts = member("accepts", "Add a classmethod `accepts(cls, pipeline) -> bool`: whether this kind of backbone can drive the pipeline.")
    _require(callable(accepts), who, f"`accepts` must be a method accepts(pipeline) -> bool, got {type(accepts).__name__}.")
    try:
        answer = accepts(pipe)
    except Exception as exc:
        raise AssertionError(f"{who}: accepts(backbone.pipeline) raised {type(exc).__name__}: {exc}; it must return True for the pipeline it drives.") from exc
    _require(
        answer is True,
        who,
        f"accepts(backbone.pipeline) must be True (a bool) for the pipeline the backbone drives, got {answer!r}. "
        "refcond infers a pipeline's backbone from it.",
    )
    static = inspect.getattr_static(type(backbone), "accepts", None)
    _require(
        isinstance(static, (classmethod, staticmethod)),
        who,
        f"`accepts` must be a classmethod (or staticmethod) of {type(backbone).__name__}: refcond calls it on the registered "
        "class, before any backbone is built, to infer which backbone drives a pipeline. Decorate it with @classmethod.",
    )
    try:
        foreign = type(backbone).accepts(object())
    except Exception as exc:
        raise AssertionError(
            f"{who}: accepts(<an object that is no pipeline>) raised {type(exc).__name__}: {exc}. refcond asks every registered "
            "backbone about a pipeline, so accepts must answer False for pipelines it cannot drive, never raise "
            "(read attributes with getattr(pipeline, 'unet', None))."
        ) from exc
    _require(foreign is False, who, f"accepts(<an object that is no pipeline>) must be False, got {foreign!r}.")


def _same_device(declared: torch.device, actual: torch.device) -> bool:
    """Whether two devices are the same; an index left out names the current device (``cuda`` = ``cuda:0`` there)."""
    if declared.type != actual.type:
        return False
    current = torch.cuda.current_device() if declared.type == "cuda" and torch.cuda.is_available() else 0
    return (current if declared.index is None else declared.index) == (current if actual.index is None else actual.index)


# -- injector -------------------------------------------------------------------------------------


def check_injector(
    injector: Injector,
    unet: torch.nn.Module | None = None,
    condition: Condition | None = None,
    *,
    dim: int | None = None,
    padding: bool = True,
    reads_condition: bool = True,
) -> None:
    """Check an :class:`refcond.Injector`: it conditions a UNet as the pipeline binds it, and detaches without a trace.

    It attaches the injector to ``unet`` and binds conditions with ``attachment.condition(condition,
    unconditional, scale)``, as the pipeline does for one generation. For an injector that reads
    the condition (``reads_condition=True``, the default) it asserts that:

    - with ``(condition, unconditional, 1.0)`` bound, the output changes, on a classifier-free
      guidance batch (``[unconditional rows; conditional rows]``, diffusers' order) and on a batch
      without guidance (the conditional rows only), and is finite;
    - under guidance, the unconditional rows read ``unconditional`` and the conditional rows
      ``condition``: each half equals a run where that condition alone is bound (``unconditional``
      bound as the condition, or ``condition``, with no unconditional) on a batch without guidance
      holding only that half's rows; without guidance the rows equal the ``condition``-alone run;
    - (``padding=True``) every group's output with the padded batch bound equals its output with
      that group alone bound, without padding: padding (mask False, filled with large garbage) is
      ignored. With ``padding=False``, binding a condition with padding must be refused with a
      :class:`refcond.RefcondError` (a ``ConfigError`` naming the aggregator to use);
    - at ``reference_scale = 0`` (``condition(condition, unconditional, 0.0)``; the pipeline binds
      the condition at scale 0 too) the output equals the plain UNet's **exactly** (``torch.equal``),
      with and without guidance: an injector does nothing at scale 0;
    - after the ``with`` block the output is the plain one again.

    An injector that reads no condition (``reads_condition=False``: LoRA files, whose
    ``condition()`` binds nothing and which change the UNet from ``attach`` to ``detach``
    whatever the condition and scale) is checked for what applies to it: ``condition(None, None,
    1.0)`` (a composition without encoder) and ``condition(condition, unconditional, 1.0)`` both
    work, give finite outputs, and give the same output. The guidance, padding, scale-0 and unbind
    checks above do not apply to it.

    For every injector, after ``detach()`` the UNet is exactly as before ``attach``: the same
    attention-processor objects, an equal ``state_dict``, the same modules, hooks and config, and
    a bit-identical forward pass. If a check fails, the injector is detached before the error is
    raised.

    Defaults: ``unet`` is a fresh :func:`refcond.testing.tiny_unet` (SD1.5 layout, cross-attention
    size 32, 16x16 latents, one denoising step at timestep 500, 7 random text tokens); ``condition``
    is :func:`make_condition` with 2 groups of 4 and 2 real tokens (``valid=(4, 2)``; 2 padding
    tokens of magnitude ~1e3 in the second) of size ``dim``, which defaults to the UNet's
    cross-attention size; ``unconditional`` is another random condition of the same layout
    (distinct, non-zero tokens, garbage padding); the UNet batch is 2 rows without guidance and 4
    with it. With ``padding=False`` both groups have 4 real tokens. Tolerance:
    ``atol=1e-5, rtol=1e-4`` (1e-2 for a float16 / bfloat16 UNet); bit-identical at scale 0 and
    after ``detach()``.

    :param unet: the UNet to attach to: the pipeline's, for an injector that attaches only to the
        pipeline it was built from.
    :param condition: what the injector is fed instead of the default; its padding positions are
        overwritten with garbage. A condition without padding is checked as given, and the padding
        check then uses the default padded condition of its token size.
    :param dim: the token size of the default condition: the injector's input size,
        ``aggregator.output_dim(encoder.embedding_dim)``, when it is not the UNet's
        cross-attention size.
    :param padding: whether the injector takes conditions with padding (groups of different
        lengths, as the ``concat`` aggregator makes). Pass ``False`` for one that needs a
        fixed-length condition; it must then refuse padding with a ``refcond.ConfigError``.
    :param reads_condition: ``False`` for an injector that reads no condition and is not weighed
        by ``reference_scale`` (LoRA files).
    """
    from refcond.testing.models import tiny_unet

    who = _name(injector)
    unet = unet if unet is not None else tiny_unet()
    atol, rtol = _tolerances(unet.dtype)
    if condition is not None and dim is not None and condition.dim != dim:
        raise ValueError(f"check_injector got a condition of size {condition.dim} and dim={dim}; give one or the other.")
    width = condition.dim if condition is not None else (dim or _cross_attention_dim(unet))
    if condition is None:
        condition = make_condition(2, 4, width, seed=0, valid=(4, 2) if padding else None)
    condition = _fill_padding(condition.to(unet.device, unet.dtype), seed=0)
    generator = torch.Generator().manual_seed(1)  # distinct, non-zero tokens: a swap of the guidance halves shows
    unconditional = _fill_padding(
        Condition(torch.randn(condition.tokens.shape, generator=generator).to(condition.tokens), condition.mask, condition.source), seed=1
    )
    batch = condition.batch_size
    guided_inputs = _unet_inputs(unet, 2 * batch)  # classifier-free guidance: [unconditional; conditional]
    inputs = _Inputs(guided=guided_inputs, unconditional=_rows(guided_inputs, 0, batch), conditional=_rows(guided_inputs, batch, 2 * batch))

    before = _snapshot(unet)
    plain_guided = _forward(unet, inputs.guided)
    plain = _forward(unet, inputs.conditional)  # guidance_scale <= 1: the conditional rows only

    attachment = injector.attach(unet)
    for method in ("condition", "detach"):
        _require(callable(getattr(attachment, method, None)), who, f"attach() must return an Attachment with a {method}() method, got {type(attachment).__name__}.")
    bind = _Binder(who, unet, attachment)
    try:
        if reads_condition:
            _check_reads_condition(bind, condition, unconditional, inputs, plain_guided, plain, padding, (atol, rtol))
        else:
            _check_condition_free(bind, condition, unconditional, inputs, (atol, rtol))
    except BaseException:
        try:  # leave the caller's UNet as it was, whatever failed
            attachment.detach()
        except Exception:
            pass
        raise

    attachment.detach()
    problems = _compare_snapshots(before, _snapshot(unet))
    restored = _forward(unet, inputs.guided)
    if not torch.equal(restored, plain_guided):
        problems.append(f"the forward output is not bit-identical (max abs difference {_max_diff(restored, plain_guided):.3g})")
    _require(
        not problems,
        who,
        "detach() must restore the UNet exactly as it was before attach(), but:\n  - " + "\n  - ".join(problems),
    )


class _Inputs(NamedTuple):
    """One denoising step's inputs: the guidance batch and its two halves."""

    guided: dict[str, Any]
    unconditional: dict[str, Any]
    conditional: dict[str, Any]


class _Binder:
    """Runs forward passes with a condition bound, turning a failure to bind into a message."""

    def __init__(self, who: str, unet: Any, attachment: Any):
        self.who, self.unet, self.attachment = who, unet, attachment

    def __call__(self, condition: Any, unconditional: Any, scale: Any, *inputs: dict[str, Any], hint: str = "") -> list[torch.Tensor]:
        call = f"condition({_describe(condition)}, {_describe(unconditional)}, {scale!r})"
        try:
            with torch.no_grad(), self.attachment.condition(condition, unconditional, scale):
                return [_forward(self.unet, i) for i in inputs]
        except AssertionError:
            raise
        except Exception as exc:
            raise AssertionError(f"{self.who}: binding {call} and running the UNet raised {type(exc).__name__}: {exc}{hint}") from exc


def _check_reads_condition(
    bind: _Binder,
    condition: Condition,
    unconditional: Condition,
    inputs: _Inputs,
    plain_guided: torch.Tensor,
    plain: torch.Tensor,
    padding: bool,
    tolerances: tuple[float, float],
) -> None:
    who, batch = bind.who, condition.batch_size
    atol, rtol = tolerances

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=rtol)

    hint = (
        " If the injector needs conditions without padding (a fixed-length aggregator such as 'mean'), pass padding=False."
        if _has_padding(condition)
        else ""
    )
    guided, single = bind(condition, unconditional, 1.0, inputs.guided, inputs.conditional, hint=hint)
    for label, out, reference in (("a guidance batch", guided, plain_guided), ("a batch without guidance", single, plain)):
        _require(bool(torch.isfinite(out).all()), who, f"with a condition bound, the UNet output on {label} is not finite.")
        _require(
            not torch.allclose(out, reference, atol=atol, rtol=rtol),
            who,
            f"with a condition bound, the UNet output on {label} equals the plain output: the condition does not reach the UNet.",
        )

    (conditional_alone,) = bind(condition, None, 1.0, inputs.conditional)
    (other_alone,) = bind(unconditional, None, 1.0, inputs.conditional)
    _require(
        not close(conditional_alone, other_alone),
        who,
        "the UNet output is the same whichever condition is bound (max abs difference "
        f"{_max_diff(conditional_alone, other_alone):.3g} between two random conditions): the injector changes the UNet but does "
        "not read the condition. An injector that reads no condition by design (LoRA files) is checked with reads_condition=False.",
    )
    try:
        after = _forward(bind.unet, inputs.guided)
    except Exception as exc:
        raise AssertionError(
            f"{who}: after the `with attachment.condition(...)` block, running the UNet raised {type(exc).__name__}: {exc}. "
            "The condition must be unbound when the block ends (in a `finally:`, so an error inside the block unbinds it too)."
        ) from exc
    _require(
        torch.allclose(after, plain_guided, atol=atol, rtol=rtol),
        who,
        f"after the `with attachment.condition(...)` block, the UNet output still differs from the plain one "
        f"(max abs difference {_max_diff(after, plain_guided):.3g}): the condition must be unbound when the block ends.",
    )

    # (a) classifier-free guidance: [unconditional rows; conditional rows], each half reading its own condition.
    (unconditional_alone,) = bind(unconditional, None, 1.0, inputs.unconditional)
    order = (
        f"Under classifier-free guidance the UNet batch is [unconditional rows; conditional rows] (diffusers' order; "
        f"{batch} + {batch} rows here): rows 0..{batch - 1} must read `unconditional` and rows {batch}..{2 * batch - 1} `condition`"
    )
    if not close(guided[:batch], unconditional_alone):
        (swapped,) = bind(condition, None, 1.0, inputs.unconditional)
        diagnosis = (
            "they read `condition` instead: the two halves are swapped. Put the unconditional rows first, e.g. "
            "torch.cat([unconditional.tokens, condition.tokens])."
            if close(guided[:batch], swapped)
            else "bind both and pick a row's condition from its position in the batch."
        )
        _require(
            False,
            who,
            f"{order}. The unconditional rows differ from a run with `unconditional` bound alone as the condition on those rows "
            f"(max abs difference {_max_diff(guided[:batch], unconditional_alone):.3g}): {diagnosis}",
        )
    _require(
        close(guided[batch:], conditional_alone),
        who,
        f"{order}. The conditional rows differ from a run with `condition` bound alone on those rows "
        f"(max abs difference {_max_diff(guided[batch:], conditional_alone):.3g}): bind both and pick a row's condition from "
        "its position in the batch.",
    )
    _require(
        close(single, conditional_alone),
        who,
        f"without guidance (guidance_scale <= 1) the UNet batch holds the {batch} conditional rows only, but with "
        f"(condition, unconditional) bound they differ from a run with `condition` bound alone (max abs difference "
        f"{_max_diff(single, conditional_alone):.3g}): when the batch has as many rows as `condition`, every row reads `condition`.",
    )

    # (b) padding: a group reads its real tokens only.
    if padding:
        if _has_padding(condition):
            padded, rows, batched = condition, inputs.conditional, conditional_alone
        else:  # the caller's condition has none: check with the default padded one of its size
            padded = make_condition(2, 4, condition.dim, seed=2, valid=(4, 2)).to(condition.tokens.device, condition.tokens.dtype)
            rows = _unet_inputs(bind.unet, 2, seed=2)
            (batched,) = bind(padded, None, 1.0, rows, hint=" If the injector needs conditions without padding, pass padding=False.")
        for b in range(padded.batch_size):
            (alone,) = bind(_condition_row(padded, b), None, 1.0, _rows(rows, b, b + 1))
            _require(
                close(batched[b : b + 1], alone),
                who,
                f"group {b} ({int(padded.mask[b].sum())} real tokens of {padded.tokens.shape[1]}) gives another UNet output in a "
                f"padded batch than alone without padding (max abs difference {_max_diff(batched[b : b + 1], alone):.3g}): the "
                "injector reads padding. Tokens whose mask is False are padding (filled with garbage here); leave them out: pass "
                "the mask to attention (masked keys get -inf scores) or drop those tokens before projecting. "
                "An injector that cannot ignore padding refuses it with a refcond.ConfigError and is checked with padding=False.",
            )
    else:
        refused = make_condition(2, 4, condition.dim, seed=2, valid=(4, 2)).to(condition.tokens.device, condition.tokens.dtype)
        try:
            with torch.no_grad(), bind.attachment.condition(refused, None, 1.0):
                _forward(bind.unet, _unet_inputs(bind.unet, 2, seed=2))
        except RefcondError:
            pass
        except Exception as exc:
            raise AssertionError(
                f"{who}: with padding=False, a condition with padding must be refused with a refcond.ConfigError that says "
                f"which aggregator to use, but binding it raised {type(exc).__name__}: {exc}"
            ) from exc
        else:
            _require(
                False,
                who,
                "with padding=False, a condition with padding (2 groups of 4 and 2 real tokens) was accepted: an injector that "
                "cannot ignore padding must refuse it with a refcond.ConfigError (e.g. \"needs an aggregator of fixed length, "
                "such as 'mean'\"), or it silently reads the padded positions. If it does ignore padding, drop padding=False.",
            )

    # (c) reference_scale = 0: the plain UNet, exactly.
    guided_zero, single_zero = bind(condition, unconditional, 0.0, inputs.guided, inputs.conditional)
    for label, out, reference in (("a guidance batch", guided_zero, plain_guided), ("a batch without guidance", single_zero, plain)):
        _require(
            torch.equal(out, reference),
            who,
            f"at reference_scale 0 the UNet output on {label} must equal the plain UNet's exactly (torch.equal), but differs "
            f"(max abs difference {_max_diff(out, reference):.3g}). The pipeline binds the condition with scale 0.0 too, and "
            "reference_scale=0 must give the plain pipeline's image: when every layer's strength is 0 (refcond.layer_scales "
            "gives one per layer), change nothing (run the original attention processors, skip the hook).",
        )


def _check_condition_free(bind: _Binder, condition: Condition, unconditional: Condition, inputs: _Inputs, tolerances: tuple[float, float]) -> None:
    who = bind.who
    atol, rtol = tolerances
    without = bind(
        None,
        None,
        1.0,
        inputs.guided,
        inputs.conditional,
        hint=" An injector that reads no condition is bound with None, None when the composition has no encoder.",
    )
    with_condition = bind(condition, unconditional, 1.0, inputs.guided, inputs.conditional)
    for label, out, reference in zip(("a guidance batch", "a batch without guidance"), with_condition, without):
        _require(bool(torch.isfinite(out).all()), who, f"with the injector attached, the UNet output on {label} is not finite.")
        _require(
            torch.allclose(out, reference, atol=atol, rtol=rtol),
            who,
            f"reads_condition=False, but the UNet output on {label} differs with a condition bound and with None bound "
            f"(max abs difference {_max_diff(out, reference):.3g}): the injector reads the condition. Check it with "
            "reads_condition=True (the default).",
        )

# -- helpers --------------------------------------------------------------------------------------


def _name(component: Any) -> str:
    return f"{type(component).__module__}.{type(component).__qualname__}"


def _require(ok: bool, who: str, message: str) -> None:
    # An explicit raise, not `assert`: the checks must also work under `python -O`.
    if not ok:
        raise AssertionError(f"{who}: {message}")


def _check_sequence(value: Any, cls: type, who: str, method: str, counts: list[int]) -> None:
    """The structural contract shared by encodings and conditions."""
    _require(isinstance(value, cls), who, f"{method} must return a refcond.{cls.__name__}, got {type(value).__name__}.")
    _require(
        value.batch_size == len(counts),
        who,
        f"{method} returned {value.batch_size} rows for {len(counts)} reference groups: one row per group is required.",
    )
    _require(value.tokens.is_floating_point(), who, f"{method} returned {value.tokens.dtype} tokens; they must be floating point.")
    _require(value.source.dtype == torch.long, who, f"{method} returned source of dtype {value.source.dtype}; it must be torch.long.")
    _require(bool(torch.isfinite(value.tokens).all()), who, f"{method} returned tokens that are NaN or infinite (padding included: 0 * NaN is NaN in attention).")
    for b, count in enumerate(counts):
        valid = value.mask[b]
        _require(bool(valid.any()), who, f"{method}: row {b} has no valid token (mask all False).")
        source = value.source[b][valid]
        bad = source[(source < MIXED_SOURCE) | (source >= count)]
        _require(
            bad.numel() == 0,
            who,
            f"{method}: row {b} ({count} reference(s)) has source values {sorted(set(bad.tolist()))}; "
            f"a source is a reference index in 0..{count - 1}, or {MIXED_SOURCE} for tokens that mix references.",
        )


def _require_same_row(batched: Any, b: int, alone: Any, who: str, method: str) -> None:
    """Row ``b`` of a batched result equals the result of its group alone (valid tokens only)."""
    valid = batched.mask[b]
    tokens, source = batched.tokens[b][valid], batched.source[b][valid]
    alone_tokens, alone_source = alone.tokens[0][alone.mask[0]], alone.source[0][alone.mask[0]]
    same = tokens.shape == alone_tokens.shape and torch.equal(source.cpu(), alone_source.cpu()) and torch.allclose(tokens, alone_tokens, atol=ATOL, rtol=RTOL)
    _require(
        same,
        who,
        f"{method}: group {b} gives a different result in a batch than alone "
        f"({tokens.shape[0]} valid tokens batched, {alone_tokens.shape[0]} alone). A group must not depend on the other "
        "groups of the batch: mark padding with mask=False and ignore masked tokens.",
    )


def _require_gradients(component: Any, output: torch.Tensor, who: str, method: str) -> None:
    """If the component has trainable parameters, a loss on ``output`` must reach them."""
    if not isinstance(component, torch.nn.Module):
        return
    params = [(n, p) for n, p in component.named_parameters() if p.requires_grad]
    if not params:
        return
    hint = "Components never disable gradients themselves (no torch.no_grad / inference_mode / .detach() in them); inference wraps the whole call instead."
    _require(not output.is_inference(), who, f"{method} returned inference-mode tensors. {hint}")
    _require(output.requires_grad, who, f"{method} returned tokens without a gradient although it has {len(params)} trainable parameter(s). {hint}")
    grads = torch.autograd.grad(output.sum(), [p for _, p in params], allow_unused=True)
    reached = [n for (n, _), g in zip(params, grads) if g is not None]
    _require(bool(reached), who, f"a loss on {method}'s output reaches none of its trainable parameters ({', '.join(n for n, _ in params[:5])}...). {hint}")


def _on_parameters_device(encoding: ReferenceEncoding, component: Any) -> ReferenceEncoding:
    """``encoding`` on the device and dtype of the component's weights, if it has any."""
    parameter = next(iter(component.parameters()), None) if isinstance(component, torch.nn.Module) else None
    return encoding if parameter is None else encoding.to(parameter.device, parameter.dtype)


def _row(encoding: ReferenceEncoding, b: int) -> ReferenceEncoding:
    """Group ``b`` alone, without padding."""
    valid = encoding.mask[b]
    return ReferenceEncoding(encoding.tokens[b][valid][None], encoding.mask[b][valid][None], encoding.source[b][valid][None])


def _reference_count(encoding: ReferenceEncoding, b: int) -> int:
    source = encoding.source[b][encoding.mask[b]]
    return int(source.max()) + 1 if source.numel() and int(source.max()) >= 0 else 1


def _tokens_per_reference(encoding: ReferenceEncoding) -> int:
    valid = encoding.mask[0]
    source = encoding.source[0][valid]
    first = int((source == 0).sum())
    return first or max(1, int(valid.sum()) // _reference_count(encoding, 0))


def _cross_attention_dim(unet: Any) -> int:
    dim = unet.config.cross_attention_dim
    return int(dim if isinstance(dim, int) else dim[0])


def _unet_inputs(unet: Any, batch: int, seed: int = 0) -> dict[str, Any]:
    """Seeded inputs of one denoising step (SD1.5 layout, plus SDXL's added conditions when needed)."""
    config = unet.config
    generator = torch.Generator().manual_seed(seed)
    size = config.sample_size if isinstance(config.sample_size, (tuple, list)) else (config.sample_size, config.sample_size)
    options = {"device": unet.device, "dtype": unet.dtype}
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, config.in_channels, *size, generator=generator).to(**options),
        "timestep": torch.tensor(500, device=unet.device),
        "encoder_hidden_states": torch.randn(batch, 7, _cross_attention_dim(unet), generator=generator).to(**options),
    }
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=generator).to(**options),
            "time_ids": torch.tensor([[size[0] * 8, size[1] * 8, 0, 0, size[0] * 8, size[1] * 8]] * batch).to(**options),
        }
    return inputs


def _rows(value: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every batched tensor of a UNet's inputs (timestep and other scalars kept)."""
    if isinstance(value, dict):
        return {k: _rows(v, start, stop) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value[start:stop]
    return value


def _condition_row(condition: Condition, b: int) -> Condition:
    """Group ``b`` alone, without padding."""
    valid = condition.mask[b]
    return Condition(condition.tokens[b][valid][None], condition.mask[b][valid][None], condition.source[b][valid][None])


def _has_padding(condition: Condition) -> bool:
    return not bool(condition.mask.all())


def _same_row(a: Any, b_a: int, b: Any, b_b: int) -> bool:
    """Whether row ``b_a`` of ``a`` and row ``b_b`` of ``b`` hold the same real tokens."""
    ta, tb = a.tokens[b_a][a.mask[b_a]], b.tokens[b_b][b.mask[b_b]]
    return ta.shape == tb.shape and torch.allclose(ta, tb, atol=ATOL, rtol=RTOL)


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return (ATOL, RTOL) if dtype in (torch.float32, torch.float64) else (HALF_TOL, HALF_TOL)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("nan")
    return float((a.float() - b.float()).abs().max())


def _describe(condition: Condition | None) -> str:
    if condition is None:
        return "None"
    return f"<{condition.batch_size}-row condition, {condition.tokens.shape[1]} tokens of size {condition.dim}>"

def _forward(unet: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample.detach().clone()


def _snapshot(unet: torch.nn.Module) -> dict[str, Any]:
    from refcond.compat import forward_hook_ids  # torch lists no module's hooks publicly

    hooks = {name: forward_hook_ids(module) for name, module in unet.named_modules()}
    return {
        "processors": dict(getattr(unet, "attn_processors", {})),
        "state": {k: v.detach().clone() for k, v in unet.state_dict().items()},
        "modules": {name: type(module) for name, module in unet.named_modules()},
        "hooks": {name: ids for name, ids in hooks.items() if any(ids)},  # forward (pre-)hook ids of hooked modules
        "config": dict(getattr(unet, "config", {})),
    }


def _compare_snapshots(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    problems = []
    changed = [k for k in before["processors"] if after["processors"].get(k) is not before["processors"][k]]
    if changed or set(before["processors"]) != set(after["processors"]):
        problems.append(f"attention processors are not the original objects at {len(changed)} layer(s), e.g. {changed[:2]}")
    keys_before, keys_after = set(before["state"]), set(after["state"])
    if keys_before != keys_after:
        extra, missing = sorted(keys_after - keys_before), sorted(keys_before - keys_after)
        problems.append(f"state_dict keys differ: added {extra[:3]}, removed {missing[:3]}")
    altered = [k for k in keys_before & keys_after if not torch.equal(before["state"][k], after["state"][k])]
    if altered:
        problems.append(f"{len(altered)} weight(s) changed, e.g. {sorted(altered)[:3]}")
    if before["modules"] != after["modules"]:
        diff = sorted(set(before["modules"].items()) ^ set(after["modules"].items()), key=str)
        problems.append(f"the module tree changed, e.g. {[name for name, _ in diff[:3]]}")
    if before["hooks"] != after["hooks"]:
        problems.append(f"forward hooks left behind on {sorted(set(after['hooks']) - set(before['hooks']))[:3] or 'some modules'}")
    changed_config = sorted(k for k in set(before["config"]) | set(after["config"]) if before["config"].get(k) != after["config"].get(k))
    if changed_config:
        problems.append(f"unet.config changed: {changed_config}")
    return problems
