"""Conformance checks: run tiny CPU tensors through a component and assert refcond's contracts.

A plugin author calls them from their own tests, with the component their factory builds::

    from refcond.testing import check_aggregator, check_encoder, check_injector

    def test_my_aggregator_conforms():
        check_aggregator(MyAggregator(), fixed_length=4)

Each check raises :class:`AssertionError` with a message naming the component, what the contract
asks and what the component did, so a failure reads as a to-do item. Each returns what it produced
(an encoder's :class:`ReferenceEncoding`, an aggregator's :class:`Condition`), so checks chain:
``check_aggregator(agg, check_encoder(enc))``. The checks are generic: they use only the
protocols of :mod:`refcond.contracts`, never a particular implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL.Image import Image

from refcond.contracts import (
    MIXED_SOURCE,
    Aggregator,
    Condition,
    Encoder,
    Injector,
    ReferenceEncoding,
)
from refcond.testing.images import reference_images

#: Tolerances for "the same result" where floating-point reordering is legitimate.
ATOL = 1e-5
RTOL = 1e-4

__all__ = ["check_aggregator", "check_encoder", "check_injector", "make_condition", "make_encoding"]


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


def make_condition(batch: int = 1, length: int = 4, dim: int = 32, *, seed: int = 0) -> Condition:
    """A random condition of ``batch`` rows, ``length`` tokens of size ``dim``, every token valid."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, dim, generator=generator)
    return Condition(tokens, torch.ones(batch, length, dtype=torch.bool), torch.full((batch, length), MIXED_SOURCE))


# -- encoder --------------------------------------------------------------------------------------


def check_encoder(encoder: Encoder, references: Sequence[Sequence[Image]] | None = None) -> ReferenceEncoding:
    """Check an :class:`refcond.Encoder` on a batch of reference groups; return its encoding.

    By default it encodes two groups of different sizes (2 and 1 references), so the shorter row
    needs padding. It asserts that ``encode`` returns a :class:`ReferenceEncoding` with one row per
    group, tokens of size ``embedding_dim``, finite values, sources within range (a reference
    index or -1), and that each group encodes the same in the batch as alone (padding is masked
    and groups do not leak into each other); that ``encode_unconditional`` returns the same
    structure (for an encoding whose tokens all mix references, source -1: the same batch and token
    size, any length, all source -1); and, when the encoder has trainable parameters, that gradients reach them (no
    ``torch.no_grad`` inside the component).
    """
    who = _name(encoder)
    groups = [list(group) for group in references] if references is not None else [reference_images(2, seed=1), reference_images(1, seed=2)]
    if not groups or any(not group for group in groups):
        raise ValueError("check_encoder needs at least one group, and every group at least one image.")

    dim = getattr(encoder, "embedding_dim", None)
    _require(isinstance(dim, int) and dim > 0, who, f"embedding_dim must be a positive int (the feature size D of its encodings), got {dim!r}.")

    with torch.enable_grad():  # the caller may be inside no_grad; the gradient check needs a graph
        encoding = encoder.encode(groups)
    _check_sequence(encoding, ReferenceEncoding, who, "encode()", [len(g) for g in groups])
    _require(
        encoding.dim == dim,
        who,
        f"encode() returned tokens of size {encoding.dim}, but embedding_dim is {dim}. "
        "Aggregators and injectors are built from embedding_dim, so the two must agree.",
    )

    with torch.no_grad():
        for b, group in enumerate(groups):
            alone = encoder.encode([group])
            _require_same_row(encoding, b, alone, who, "encode()")

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

    _require_gradients(encoder, encoding.tokens[encoding.mask], who, "encode()")
    return encoding


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

    By default the encoding is :func:`make_encoding` (groups of 3 and 1 references, 2 tokens each,
    size 8), on the device and dtype of the aggregator's weights. It asserts that the aggregator returns a :class:`Condition` with one row per group,
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


# -- injector -------------------------------------------------------------------------------------


def check_injector(injector: Injector, unet: torch.nn.Module | None = None, condition: Condition | None = None) -> None:
    """Check an :class:`refcond.Injector`: it conditions a UNet and detaches without a trace.

    On ``unet`` (default: :func:`refcond.testing.tiny_unet`, a fresh one), it asserts that, with a
    condition bound by ``attachment.condition(...)``, a forward pass changes (classifier-free
    guidance batch and plain batch); that after the ``with`` block the output is the plain one
    again; and that after ``detach()`` the UNet is exactly as before ``attach``: the same
    attention-processor objects, an equal ``state_dict``, the same modules, hooks and config, and a
    bit-identical forward pass.

    :param condition: what the injector is fed; default :func:`make_condition` with one row of
        4 tokens of the UNet's cross-attention size. Pass one matching your injector's input size
        (``aggregator.output_dim(encoder.embedding_dim)``) when it expects another.
    """
    from refcond.testing.models import tiny_unet

    who = _name(injector)
    unet = unet if unet is not None else tiny_unet()
    if condition is None:
        condition = make_condition(batch=1, dim=_cross_attention_dim(unet))
    condition = condition.to(unet.device, unet.dtype)
    unconditional = Condition(torch.zeros_like(condition.tokens), condition.mask, condition.source)
    batch = condition.batch_size
    guided_inputs = _unet_inputs(unet, 2 * batch)  # classifier-free guidance: [unconditional; conditional]
    plain_inputs = {k: _conditional_half(v, batch) for k, v in guided_inputs.items()}  # guidance_scale <= 1

    before = _snapshot(unet)
    plain_guided = _forward(unet, guided_inputs)
    plain = _forward(unet, plain_inputs)

    attachment = injector.attach(unet)
    for method in ("condition", "detach"):
        _require(callable(getattr(attachment, method, None)), who, f"attach() must return an Attachment with a {method}() method, got {type(attachment).__name__}.")

    with attachment.condition(condition, unconditional, 1.0):
        guided = _forward(unet, guided_inputs)
        single = _forward(unet, plain_inputs)
    for label, out, reference in (("a guidance batch", guided, plain_guided), ("a batch without guidance", single, plain)):
        _require(bool(torch.isfinite(out).all()), who, f"with a condition bound, the UNet output on {label} is not finite.")
        _require(
            not torch.allclose(out, reference, atol=ATOL, rtol=RTOL),
            who,
            f"with a condition bound, the UNet output on {label} equals the plain output: the condition does not reach the UNet.",
        )

    after = _forward(unet, guided_inputs)
    _require(
        torch.allclose(after, plain_guided, atol=ATOL, rtol=RTOL),
        who,
        f"after the `with attachment.condition(...)` block, the UNet output still differs from the plain one "
        f"(max abs difference {float((after - plain_guided).abs().max()):.3g}): the condition must be unbound when the block ends.",
    )

    attachment.detach()
    problems = _compare_snapshots(before, _snapshot(unet))
    restored = _forward(unet, guided_inputs)
    if not torch.equal(restored, plain_guided):
        problems.append(f"the forward output is not bit-identical (max abs difference {float((restored - plain_guided).abs().max()):.3g})")
    _require(
        not problems,
        who,
        "detach() must restore the UNet exactly as it was before attach(), but:\n  - " + "\n  - ".join(problems),
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


def _conditional_half(value: Any, n: int) -> Any:
    if isinstance(value, dict):
        return {k: _conditional_half(v, n) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value[n:]
    return value


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
