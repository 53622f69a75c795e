"""Exporter to the official IP-Adapter layout (tencent-ailab / h94), the inverse of :mod:`.ip_adapter_format`.

:func:`to_ip_adapter` turns an ``ip-adapter``-like :class:`refcond.RefcondPipeline` (a trained one,
typically) into the tensors of an official IP-Adapter file, and :func:`save_ip_adapter` writes them
to a ``.safetensors`` file that diffusers' ``pipe.load_ip_adapter(...)``, the official IP-Adapter
code and refcond's importer (``refcond.from_pipe(pipe, "ip-adapter", checkpoint=path)``) load.

=================================================  ==============================================
refcond key (``injector.<i>.*``)                   official key
=================================================  ==============================================
``projector.{proj,norm}.*`` (``linear``)           ``image_proj.{proj,norm}.*``
``projector.{fc1,fc2,norm}.*`` (``mlp``)           ``image_proj.proj.{0,2,3}.*``
``projector.{latents,proj_in,proj_out,norm_out}``  ``image_proj.{latents,proj_in,proj_out,norm_out}``
``projector.layers.<j>.norm_inputs`` / ``norm_latents`` / ``to_q`` / ``to_out``
                                                   ``image_proj.layers.<j>.0.{norm1,norm2,to_q,to_out}``
``projector.layers.<j>.to_k`` + ``to_v``           ``image_proj.layers.<j>.0.to_kv`` (keys, then values)
``projector.layers.<j>.ff_norm`` / ``ff_in`` / ``ff_out``
                                                   ``image_proj.layers.<j>.1.{0,1,3}``
``layers.<i>.to_k_ip.weight`` / ``to_v_ip``        ``ip_adapter.<N>.to_k_ip.weight`` / ``to_v_ip``
=================================================  ==============================================

``N`` is the position of the ``i``-th cross-attention layer's processor in ``unet.attn_processors``
(:attr:`refcond.CrossAttentionLayer.index`), exactly the number the importer reads: ``1, 3, 5, ...``
on Stable Diffusion UNets, where every ``attn2`` follows its ``attn1``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from refcond import ConfigError, write_safetensors
from refcond_injectors.cross_attention.ip_adapter_format import IMAGE_PROJ, INJECTOR, IP_ADAPTER
from refcond_injectors.cross_attention.projectors import MLP_OFFICIAL_NAMES

#: The encoder output each projector reads in an official file (what the importer sets the ``clip`` encoder to).
ENCODER_OUTPUT = {"linear": "image_embeds", "resampler": "hidden_states", "mlp": "hidden_states"}
#: The CLIP hidden layer official Plus / Full adapters read (the penultimate one).
OFFICIAL_HIDDEN_LAYER = -2
#: What diffusers' ``load_ip_adapter`` builds whatever the file holds: base adapters make 4 tokens per
#: image, resamplers have 4 layers with a feed-forward 4 times as wide and 64-d heads.
DIFFUSERS_BASE_TOKENS = 4
DIFFUSERS_RESAMPLER_DEPTH = 4
DIFFUSERS_RESAMPLER_FF_MULT = 4
OFFICIAL_HEAD_DIM = 64

_ATTN = {"norm_inputs": "norm1", "norm_latents": "norm2", "to_q": "to_q", "to_out": "to_out"}
_FF = {"ff_norm": "0", "ff_in": "1", "ff_out": "3"}
_MLP = {ours: official for official, ours in MLP_OFFICIAL_NAMES.items()}


def to_ip_adapter(pipeline: Any, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The weights of a :class:`refcond.RefcondPipeline` in the official IP-Adapter layout.

    The composition must be one an official file describes: encoder ``clip`` reading what the
    projector's variant reads (``linear``: pooled ``image_embeds``, IP-Adapter; ``resampler``:
    the penultimate layer's ``hidden_states``, IP-Adapter Plus; ``mlp``: the same, IP-Adapter
    Full), a parameter-free aggregator that keeps the feature size (``mean``, ``weighted-mean``,
    ``concat``, ...) and exactly one injector, ``cross-attention``. A resampler's heads must be
    64-d (the file stores no head count: readers infer ``heads = width // 64``). Anything else is
    a :class:`refcond.ConfigError` that says what the official layout cannot hold; save such a
    composition with ``rp.save(path)`` instead.

    Keys: ``image_proj.*`` (the projector, under its official names) and
    ``ip_adapter.<N>.to_k_ip.weight`` / ``to_v_ip.weight``, with ``N`` the position of the
    cross-attention processor in ``unet.attn_processors`` (``1, 3, 5, ...``). Importing the result
    gives back every tensor bit for bit.

    What the file does not keep: the aggregator (the importer starts from the ``ip-adapter``
    composition's ``mean``; diffusers concatenates several images, as ``concat`` does), the
    injector's ``scale`` (set it at load time: ``pipe.set_ip_adapter_scale`` in diffusers, the
    injector config or ``reference_scale`` in refcond; a warning says when it is not 1) and where
    the CLIP image encoder came from (both loaders use the pipeline's ``image_encoder``: load the
    file with the encoder the composition was trained with).

    Sizes diffusers' ``load_ip_adapter`` does not read from the file (it assumes 4 tokens for a
    ``linear`` projector; a 4-layer resampler with ``ff_mult`` 4; an ``mlp`` as wide as its input)
    are exported as they are, with a warning that only refcond and loaders that read the sizes
    from the tensors load the file.

    :param pipeline: a :class:`refcond.RefcondPipeline`, e.g. ``refcond.from_pipe(pipe, "ip-adapter", ...)`` after training.
    :param dtype: cast the floating-point tensors (official files are ``torch.float16``); ``None`` keeps them as they are.
    :returns: detached, contiguous tensors on the device of the weights.
    """
    cross, role = _cross_attention(pipeline)
    _check_encoder_and_aggregator(pipeline, cross, role)
    _warn_what_diffusers_reads_otherwise(pipeline, cross)

    out = {f"{IMAGE_PROJ}{key}": tensor for key, tensor in _projector(cross).items()}
    for layer, kv in zip(cross.layout, cross.layers):
        out[f"{IP_ADAPTER}{layer.index}.to_k_ip.weight"] = kv.to_k_ip.weight
        out[f"{IP_ADAPTER}{layer.index}.to_v_ip.weight"] = kv.to_v_ip.weight
    out = {key: tensor.detach() for key, tensor in out.items()}
    if dtype is not None:
        out = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in out.items()}
    return {key: tensor.contiguous() for key, tensor in out.items()}


def save_ip_adapter(pipeline: Any, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write :func:`to_ip_adapter` to a ``.safetensors`` file atomically; returns its path.

    diffusers loads it with ``pipe.load_ip_adapter(str(path.parent), subfolder="",
    weight_name=path.name, image_encoder_folder=None)`` (the pipeline keeping its own
    ``image_encoder``), refcond with ``refcond.from_pipe(pipe, "ip-adapter", checkpoint=path)``.
    The metadata holds ``format: pt`` and a ``refcond.exported_from`` note naming the composition
    the file came from (its aggregator among them); neither loader needs it.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"IP-Adapter files are written as .safetensors; got {str(path)!r}.")
    state = to_ip_adapter(pipeline, dtype=dtype)
    return write_safetensors(path, state, {"format": "pt", "refcond.exported_from": _note(pipeline)})


# -- checks -----------------------------------------------------------------------------------------


def _cross_attention(pipeline: Any) -> tuple[Any, str]:
    """The pipeline's cross-attention injector and its role (``injector.<i>``); refuses other injectors."""
    composition = getattr(pipeline, "composition", None)
    if composition is None or not hasattr(pipeline, "injectors"):
        raise ConfigError(f"to_ip_adapter takes a refcond.RefcondPipeline (refcond.from_pipe / refcond.load), not a {type(pipeline).__name__}.")
    names = [spec.name for spec in composition.injectors]
    if INJECTOR not in names:
        raise ConfigError(
            f"to_ip_adapter: the composition has no {INJECTOR!r} injector (injectors: {names}); an official IP-Adapter file "
            "holds a projector and the decoupled cross-attention weights, nothing else. Save it with rp.save(path) instead."
        )
    if len(names) > 1:
        others = [name for name in names if name != INJECTOR]
        raise ConfigError(
            f"to_ip_adapter: the composition has injectors {names}; an official IP-Adapter file holds the {INJECTOR!r} injector "
            f"only, so {others} would be lost. Save it with rp.save(path) instead."
        )
    return pipeline.injectors[0], "injector.0"


def _check_encoder_and_aggregator(pipeline: Any, cross: Any, role: str) -> None:
    """Refuse what an official file cannot express: another encoder or encoder output, weights outside the injector."""
    composition = pipeline.composition
    projector = cross.config.projector
    wanted = ENCODER_OUTPUT[projector]
    encoder = composition.encoder
    if encoder is None or encoder.name != "clip":
        got = "no encoder" if encoder is None else f"encoder {encoder.name!r}"
        raise ConfigError(
            f"to_ip_adapter: the composition has {got}; official IP-Adapter files are read through CLIP (encoder 'clip' "
            f"with output {wanted!r} for the {projector!r} projector), which is what every loader feeds them."
        )
    output = pipeline.encoder.config.output
    if output != wanted:
        variant = "IP-Adapter (base)" if projector == "linear" else "IP-Adapter Plus / Full"
        raise ConfigError(
            f"to_ip_adapter: the clip encoder's output is {output!r}, but an official file with the {projector!r} projector "
            f"({variant}) is read with {wanted!r}; a loader would feed the projector other features than it was trained on."
        )
    if output == "hidden_states" and pipeline.encoder.config.hidden_layer != OFFICIAL_HIDDEN_LAYER:
        raise ConfigError(
            f"to_ip_adapter: the clip encoder reads hidden layer {pipeline.encoder.config.hidden_layer}; official IP-Adapter "
            f"Plus / Full files are read from the penultimate layer ({OFFICIAL_HIDDEN_LAYER}), which every loader uses."
        )
    elsewhere = sorted({_role(key) for key in pipeline.state_dict()} - {role})
    if elsewhere:
        raise ConfigError(
            f"to_ip_adapter: the composition has weights outside the cross-attention injector ({', '.join(elsewhere)}: the "
            f"aggregator {composition.aggregator.name!r} or a trained encoder), which an official IP-Adapter file cannot hold. "
            "Save it with rp.save(path) instead."
        )
    if cross.input_dim != pipeline.encoder.embedding_dim:
        raise ConfigError(
            f"to_ip_adapter: the aggregator {composition.aggregator.name!r} turns the encoder's {pipeline.encoder.embedding_dim}-d "
            f"features into {cross.input_dim}-d ones; an official file's projector reads CLIP's features as they are."
        )
    if projector == "resampler":
        block = cross.projector.layers[0]
        heads, inner = block.heads, block.to_q.out_features
        read = (inner // OFFICIAL_HEAD_DIM, OFFICIAL_HEAD_DIM) if inner % OFFICIAL_HEAD_DIM == 0 else (1, inner)
        if (heads, inner // heads) != read:
            raise ConfigError(
                f"to_ip_adapter: the resampler has {heads} heads of {inner // heads}; an official file stores no head count "
                f"and is read as {read[0]} heads of {read[1]} (64-d heads), which computes something else. Use "
                f"resampler_dim_head={OFFICIAL_HEAD_DIM}."
            )


def _role(key: str) -> str:
    """``encoder.x.y`` -> ``encoder``; ``injector.0.x`` -> ``injector.0``."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "injector" else parts[0]


def _warn_what_diffusers_reads_otherwise(pipeline: Any, cross: Any) -> None:
    config = cross.config
    lost = []
    if config.projector == "linear" and config.num_tokens != DIFFUSERS_BASE_TOKENS:
        lost.append(f"{config.num_tokens} tokens per reference (diffusers builds {DIFFUSERS_BASE_TOKENS})")
    if config.projector == "resampler":
        depth, ff_mult = len(cross.projector.layers), config.resampler_ff_mult
        if depth != DIFFUSERS_RESAMPLER_DEPTH or ff_mult != DIFFUSERS_RESAMPLER_FF_MULT:
            lost.append(
                f"a resampler of {depth} layers with ff_mult {ff_mult} (diffusers builds "
                f"{DIFFUSERS_RESAMPLER_DEPTH} layers with ff_mult {DIFFUSERS_RESAMPLER_FF_MULT})"
            )
        inner = cross.projector.layers[0].to_q.out_features
        if inner % OFFICIAL_HEAD_DIM:
            lost.append(f"resampler attention {inner} wide (diffusers builds 64-d heads, so a multiple of {OFFICIAL_HEAD_DIM})")
    if config.projector == "mlp":
        hidden, input_dim = cross.projector.fc1.out_features, cross.projector.fc1.in_features
        if hidden != input_dim:
            lost.append(f"an mlp {hidden} wide on {input_dim}-d features (diffusers builds it as wide as its input)")
    if lost:
        warnings.warn(
            f"to_ip_adapter: the file holds {'; '.join(lost)}: diffusers' load_ip_adapter will refuse it; refcond and "
            "loaders that read the sizes from the tensors load it.",
            UserWarning,
            stacklevel=3,
        )
    numbering = _diffusers_numbers(pipeline.backbone.unet)
    moved = [layer.name for layer in cross.layout if numbering.get(layer.name) != layer.index]
    if moved:
        warnings.warn(
            f"to_ip_adapter: this UNet's cross-attention processors are not every second one of unet.attn_processors "
            f"(e.g. {moved[0]}); the file numbers them by position, as the official code and refcond do, but diffusers "
            "counts 1, 3, 5, ... over the non-attn1 processors and would misplace them.",
            UserWarning,
            stacklevel=3,
        )
    if config.scale != 1.0:
        warnings.warn(
            f"to_ip_adapter: the cross-attention injector's scale {config.scale:g} is a setting, not a weight; the file does not "
            "keep it. Set it when loading (diffusers: pipe.set_ip_adapter_scale; refcond: reference_scale or the injector's scale).",
            UserWarning,
            stacklevel=3,
        )


def _diffusers_numbers(unet: Any) -> dict[str, int]:
    """The ``N`` diffusers' ``load_ip_adapter`` gives each processor that is not an ``attn1``: 1, 3, 5, ..."""
    names = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    return {name: 2 * k + 1 for k, name in enumerate(names)}


# -- renaming ---------------------------------------------------------------------------------------


def _projector(cross: Any) -> dict[str, torch.Tensor]:
    """The projector's tensors under their official names (the importer's renaming, inverted)."""
    state = cross.projector.state_dict()
    projector = cross.config.projector
    if projector == "linear":
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    if projector == "mlp":
        for key, tensor in state.items():
            head, _, leaf = key.rpartition(".")
            out[f"{_MLP[head]}.{leaf}"] = tensor
        return out
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            out[key] = tensor  # latents, proj_in, proj_out, norm_out
            continue
        index, name, leaf = parts[1], parts[2], parts[3]
        if name in _ATTN:
            out[f"layers.{index}.0.{_ATTN[name]}.{leaf}"] = tensor
        elif name in _FF:
            out[f"layers.{index}.1.{_FF[name]}.{leaf}"] = tensor
        elif name == "to_k":
            out[f"layers.{index}.0.to_kv.{leaf}"] = torch.cat([tensor, state[f"layers.{index}.to_v.{leaf}"]], dim=0)
        elif name != "to_v":  # to_v went into to_kv with to_k
            raise ConfigError(f"to_ip_adapter: resampler parameter {key!r} has no official name.")
    return out


def _note(pipeline: Any) -> str:
    composition = pipeline.composition
    cross = pipeline.injectors[0]
    return (
        f"refcond composition {composition.name or '(unnamed)'!r}: encoder clip ({pipeline.encoder.config.output}), "
        f"aggregator {composition.aggregator.name!r}, cross-attention projector {cross.config.projector!r}, "
        f"backbone {pipeline.backbone.name}"
    )
