"""Importer of official IP-Adapter checkpoints (tencent-ailab / h94 layout), checkpoint format ``ip-adapter``.

A file holds ``image_proj.*`` (the projector) and ``ip_adapter.<N>.to_k_ip.weight`` /
``ip_adapter.<N>.to_v_ip.weight`` where ``N`` is the position of a cross-attention processor in
``unet.attn_processors`` (odd numbers: every ``attn2`` follows its ``attn1``). The projector's keys
tell the variant:

=====================  ==========================  =================  ==========================
key                    variant                     projector          encoder output
=====================  ==========================  =================  ==========================
``proj.weight``        IP-Adapter (base)           ``linear``         pooled ``image_embeds``
``latents``            IP-Adapter Plus / Plus-face ``resampler``      penultimate ``hidden_states``
``proj.3.weight``      IP-Adapter Full-face        ``mlp``            penultimate ``hidden_states``
=====================  ==========================  =================  ==========================

Every size is read from the tensors' shapes (refcond has refused empty tensors before, so each size
is backed by values in the file) and bounded before anything is built: at most :data:`MAX_TOKENS`
tokens, and a resampler's layers numbered exactly ``0..n-1`` with ``n`` at most
:data:`MAX_RESAMPLER_DEPTH`. :meth:`IPAdapterFormat.convert` returns the settings as a composition
patch and the weights under ``injector.cross-attention.*``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from refcond import (
    Backbone,
    CheckpointError,
    ImportedCheckpoint,
    IncompatibleBackboneError,
)
from refcond_injectors.cross_attention.config import CrossAttentionConfig
from refcond_injectors.cross_attention.injector import build_projector
from refcond_injectors.cross_attention.layers import (
    cross_attention_layers,
    describe_layout,
    family,
)
from refcond_injectors.cross_attention.projectors import MLP_OFFICIAL_NAMES

IMAGE_PROJ = "image_proj."
IP_ADAPTER = "ip_adapter."
INJECTOR = "cross-attention"
TARGET = f"injector.{INJECTOR}."

#: Most tokens a projector may make per reference (official files: 4 or 16; the resampler's cost grows with their square).
MAX_TOKENS = 1024
#: Most layers a resampler may have (official IP-Adapter Plus files: 4).
MAX_RESAMPLER_DEPTH = 64

_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$", re.ASCII)
_RESAMPLER_ATTN = re.compile(r"^layers\.(\d+)\.0\.(norm1|norm2|to_q|to_kv|to_out)\.(weight|bias)$", re.ASCII)
_RESAMPLER_FF = re.compile(r"^layers\.(\d+)\.1\.(0|1|3)\.(weight|bias)$", re.ASCII)
_RESAMPLER_LAYER = re.compile(r"^layers\.([^.]*)\.", re.ASCII)
_ATTN_NAMES = {"norm1": "norm_inputs", "norm2": "norm_latents", "to_q": "to_q", "to_out": "to_out"}
_FF_NAMES = {"0": "ff_norm", "1": "ff_in", "3": "ff_out"}


class IPAdapterFormat:
    """Official IP-Adapter files: ``image_proj.*`` + ``ip_adapter.<N>.to_{k,v}_ip.weight``."""

    def detect(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
        keys = list(state_dict)
        return bool(keys) and all(k.startswith((IMAGE_PROJ, IP_ADAPTER)) for k in keys)

    def convert(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], backbone: Backbone | None) -> ImportedCheckpoint:
        if backbone is None:
            raise CheckpointError("an IP-Adapter file needs a pipeline to attach to: pass one, refcond.load(path, pipe) or refcond.from_pipe(pipe, checkpoint=path).")
        projector = {k[len(IMAGE_PROJ) :]: v for k, v in state_dict.items() if k.startswith(IMAGE_PROJ)}
        adapter = {k[len(IP_ADAPTER) :]: v for k, v in state_dict.items() if k.startswith(IP_ADAPTER)}
        if not projector:
            raise CheckpointError("no image_proj.* keys: the file lacks the image projection model.")
        if not adapter:
            raise CheckpointError("no ip_adapter.<N>.to_k_ip.weight keys: the file lacks the cross-attention weights.")

        layer_weights = _layer_weights(adapter, backbone)
        cross_dim = backbone.cross_attention_dim
        config, encoder_output, projector_weights = _projector(projector, cross_dim)
        injector_config = CrossAttentionConfig.model_validate(config)  # the file's sizes must make a valid config
        _check_projector_shapes(projector_weights, injector_config, cross_dim)

        weights = {f"{TARGET}projector.{k}": v for k, (v, _) in projector_weights.items()}
        weights.update(layer_weights)
        composition = {
            "encoder": {"name": "clip", "config": {"output": encoder_output}},
            "injectors": {INJECTOR: {"config": config}},
        }
        return ImportedCheckpoint(composition=composition, state_dict=weights, source="ip-adapter", recipe="ip-adapter")

    def save(self, pipeline: Any, path: str | Path) -> Path:
        """Write ``pipeline`` in this layout (what ``refcond train``'s ``export = ["ip-adapter"]`` calls)."""
        from refcond_injectors.cross_attention.ip_adapter_export import save_ip_adapter

        return save_ip_adapter(pipeline, path)


def _layer_weights(adapter: dict[str, torch.Tensor], backbone: Backbone) -> dict[str, torch.Tensor]:
    """Check ``ip_adapter.*`` against the UNet's cross-attention layers and rename to ``layers.<i>.*``."""
    lora = sorted(k for k in adapter if "_lora." in k)
    if lora:
        raise CheckpointError(
            f"key {IP_ADAPTER}{lora[0]} is a LoRA weight of an IP-Adapter FaceID file; FaceID adapters "
            "(insightface embeddings plus a LoRA) are not supported by the cross-attention injector."
        )
    layers = cross_attention_layers(backbone.unet)
    file_dims = Counter(int(v.shape[-1]) for k, v in adapter.items() if _IP_KEY.match(k) and v.ndim == 2)
    file_layers = {m.group(1) for m in map(_IP_KEY.match, adapter) if m}
    if file_dims:
        file_dim = file_dims.most_common(1)[0][0]
        if file_dim != backbone.cross_attention_dim:
            raise IncompatibleBackboneError(
                f"this IP-Adapter file is for {family(file_dim)} (cross-attention dim {file_dim}, {len(file_layers)} "
                f"cross-attention layers), but the pipeline is {backbone.name} ({describe_layout(layers)}). Use the IP-Adapter file made for this backbone "
                "(h94/IP-Adapter: models/ for SD1.5, sdxl_models/ for SDXL)."
            )
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for i, layer in enumerate(layers):
        for name in ("to_k_ip", "to_v_ip"):
            expected[f"{layer.index}.{name}.weight"] = (f"{TARGET}layers.{i}.{name}.weight", (layer.hidden_size, layer.cross_attention_dim))
    problems = []
    for key in sorted(set(expected) - set(adapter), key=_natural):
        problems.append(f"missing key {IP_ADAPTER}{key} (expected shape {expected[key][1]})")
    for key in sorted(set(adapter) - set(expected), key=_natural):
        problems.append(f"unexpected key {IP_ADAPTER}{key} (shape {tuple(adapter[key].shape)})")
    for key in sorted(set(adapter) & set(expected), key=_natural):
        if tuple(adapter[key].shape) != expected[key][1]:
            problems.append(f"key {IP_ADAPTER}{key}: expected shape {expected[key][1]}, got {tuple(adapter[key].shape)}")
    if problems:
        count = f"the file has {len(file_layers)} cross-attention layers, the UNet {len(layers)}"
        raise CheckpointError(_problem_list(f"the cross-attention weights do not match the UNet ({count})", problems))
    return {target: adapter[key] for key, (target, _) in expected.items()}


def _projector(sd: dict[str, torch.Tensor], cross_dim: int) -> tuple[dict[str, Any], str, dict[str, tuple[torch.Tensor, str]]]:
    """``(injector config, encoder output, {refcond key: (tensor, file key)})`` for the projector's variant."""
    if "proj.weight" in sd:
        return _linear(sd, cross_dim)
    if "proj.3.weight" in sd:
        return _mlp(sd)
    if "latents" in sd:
        return _resampler(sd)
    if "perceiver_resampler.proj_in.weight" in sd or "norm.weight" in sd:
        raise CheckpointError(
            "this is an IP-Adapter FaceID file (image_proj reads insightface face embeddings); FaceID adapters are not supported."
        )
    sample = ", ".join(IMAGE_PROJ + k for k in sorted(sd)[:4])
    raise CheckpointError(
        f"unrecognised IP-Adapter projector (keys {sample}, ...): expected image_proj.proj.weight (IP-Adapter), "
        "image_proj.latents (IP-Adapter Plus) or image_proj.proj.3.weight (IP-Adapter Full)."
    )


def _need(sd: dict[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"missing key {IMAGE_PROJ}{key}, which this IP-Adapter variant needs.")
    if sd[key].ndim != ndim:
        raise CheckpointError(f"key {IMAGE_PROJ}{key}: expected a {ndim}-d tensor, got shape {tuple(sd[key].shape)}.")
    return sd[key]


def _linear(sd: dict[str, torch.Tensor], cross_dim: int) -> tuple[dict[str, Any], str, dict[str, tuple[torch.Tensor, str]]]:
    proj = _need(sd, "proj.weight", 2)
    if proj.shape[0] % cross_dim:
        raise CheckpointError(
            f"key {IMAGE_PROJ}proj.weight: shape {tuple(proj.shape)}; its first dim should be num_tokens x the UNet's "
            f"cross-attention dim {cross_dim}."
        )
    num_tokens = int(proj.shape[0]) // cross_dim
    _check_tokens(num_tokens, f"proj.weight has shape {tuple(proj.shape)}: {num_tokens} tokens of {cross_dim}")
    config = {"projector": "linear", "num_tokens": num_tokens, "input_dim": int(proj.shape[1])}
    return config, "image_embeds", {k: (v, k) for k, v in sd.items()}


def _mlp(sd: dict[str, torch.Tensor]) -> tuple[dict[str, Any], str, dict[str, tuple[torch.Tensor, str]]]:
    fc1 = _need(sd, "proj.0.weight", 2)
    config = {"projector": "mlp", "input_dim": int(fc1.shape[1]), "mlp_hidden_dim": int(fc1.shape[0])}
    mapped = {}
    for key, value in sd.items():
        head, _, leaf = key.rpartition(".")
        mapped[f"{MLP_OFFICIAL_NAMES.get(head, head)}.{leaf}"] = (value, key)
    return config, "hidden_states", mapped


def _resampler(sd: dict[str, torch.Tensor]) -> tuple[dict[str, Any], str, dict[str, tuple[torch.Tensor, str]]]:
    latents = _need(sd, "latents", 3)
    proj_in = _need(sd, "proj_in.weight", 2)
    to_q = _need(sd, "layers.0.0.to_q.weight", 2)
    ff_in = _need(sd, "layers.0.1.1.weight", 2)
    if latents.shape[0] != 1:
        raise CheckpointError(f"key {IMAGE_PROJ}latents: expected shape [1, num_tokens, dim], got {tuple(latents.shape)}.")
    _check_tokens(int(latents.shape[1]), f"latents has shape {tuple(latents.shape)}")
    dim = int(latents.shape[2])
    inner = int(to_q.shape[0])
    heads, dim_head = (inner // 64, 64) if inner % 64 == 0 else (1, inner)  # official releases use 64-d heads
    depth = _resampler_depth(sd)
    config = {
        "projector": "resampler",
        "num_tokens": int(latents.shape[1]),
        "input_dim": int(proj_in.shape[1]),
        "resampler_dim": dim,
        "resampler_depth": depth,
        "resampler_heads": heads,
        "resampler_dim_head": dim_head,
        "resampler_ff_mult": max(1, int(ff_in.shape[0]) // dim),
    }
    mapped: dict[str, tuple[torch.Tensor, str]] = {}
    for key, value in sd.items():
        attn, ff = _RESAMPLER_ATTN.match(key), _RESAMPLER_FF.match(key)
        if attn and attn.group(2) == "to_kv":
            if value.ndim != 2 or value.shape[0] % 2:
                raise CheckpointError(
                    f"key {IMAGE_PROJ}{key}: expected [2 x {inner}, {dim}] (keys and values stacked), got {tuple(value.shape)}."
                )
            k, v = value.chunk(2, dim=0)
            mapped[f"layers.{attn.group(1)}.to_k.{attn.group(3)}"] = (k, key)
            mapped[f"layers.{attn.group(1)}.to_v.{attn.group(3)}"] = (v, key)
        elif attn:
            mapped[f"layers.{attn.group(1)}.{_ATTN_NAMES[attn.group(2)]}.{attn.group(3)}"] = (value, key)
        elif ff:
            mapped[f"layers.{ff.group(1)}.{_FF_NAMES[ff.group(2)]}.{ff.group(3)}"] = (value, key)
        else:
            mapped[key] = (value, key)
    return config, "hidden_states", mapped


def _check_tokens(count: int, what: str) -> None:
    if count > MAX_TOKENS:
        raise CheckpointError(
            f"key {IMAGE_PROJ}{what}, more than the {MAX_TOKENS} tokens per reference an IP-Adapter file may have (official files "
            "have 4 or 16): the file is corrupt or not an IP-Adapter."
        )


def _resampler_depth(sd: dict[str, torch.Tensor]) -> int:
    """The number of resampler layers: the file's ``layers.<i>.*`` must number them exactly ``0..n-1``, ``n <= MAX_RESAMPLER_DEPTH``.

    Checked before anything is built, so a key such as ``layers.99999999999.0.norm1.weight`` is an
    error naming it, not a request for that many layers.
    """
    indices: dict[int, str] = {}
    for key in sd:
        match = _RESAMPLER_LAYER.match(key)
        if match is None:
            continue
        index = match.group(1)
        if not (index.isascii() and index.isdigit()) or (len(index) > 1 and index.startswith("0")):
            raise CheckpointError(f"key {IMAGE_PROJ}{key}: the resampler layer index {index!r} is not a whole number.")
        if len(index) > 4 or int(index) >= MAX_RESAMPLER_DEPTH:
            raise CheckpointError(
                f"key {IMAGE_PROJ}{key}: resampler layer {index} is out of range; refcond loads resamplers of at most "
                f"{MAX_RESAMPLER_DEPTH} layers (official IP-Adapter Plus files have 4), numbered from 0."
            )
        indices.setdefault(int(index), key)
    if not indices:
        raise CheckpointError(f"no {IMAGE_PROJ}layers.<i>.* keys: an IP-Adapter Plus file's resampler has at least one layer.")
    depth = max(indices) + 1
    gaps = [i for i in range(depth) if i not in indices]
    if gaps:
        raise CheckpointError(
            f"the resampler's layers are numbered {_ranges(sorted(indices))}, but they must be 0..{depth - 1} without gaps: "
            f"no {IMAGE_PROJ}layers.{gaps[0]}.* key (key {IMAGE_PROJ}{indices[max(indices)]} implies {depth} layers)."
        )
    return depth


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    parts: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def _check_projector_shapes(mapped: dict[str, tuple[torch.Tensor, str]], config: CrossAttentionConfig, cross_dim: int) -> None:
    """Compare the file's projector with the one its inferred config builds, naming the file's keys."""
    with torch.device("meta"):
        expected = build_projector(config, config.input_dim or 0, cross_dim).state_dict()
    problems = []
    for key in sorted(set(expected) - set(mapped), key=_natural):
        problems.append(f"missing key {IMAGE_PROJ}{_file_key(key, config.projector)} (expected shape {tuple(expected[key].shape)})")
    for key in sorted(set(mapped) - set(expected), key=_natural):
        value, file_key = mapped[key]
        problems.append(f"unexpected key {IMAGE_PROJ}{file_key} (shape {tuple(value.shape)})")
    for key in sorted(set(mapped) & set(expected), key=_natural):
        value, file_key = mapped[key]
        if tuple(value.shape) != tuple(expected[key].shape):
            part = " (its keys or values half)" if file_key.endswith("to_kv.weight") else ""
            problems.append(f"key {IMAGE_PROJ}{file_key}{part}: expected shape {tuple(expected[key].shape)}, got {tuple(value.shape)}")
    if problems:
        raise CheckpointError(_problem_list(f"the image projection model ({config.projector}) does not match the UNet", problems))


def _file_key(refcond_key: str, projector: str) -> str:
    """The official name of a projector parameter (for messages about missing keys)."""
    head, _, leaf = refcond_key.rpartition(".")
    if projector == "mlp":
        return f"{ {v: k for k, v in MLP_OFFICIAL_NAMES.items()}.get(head, head) }.{leaf}"
    m = re.match(r"^layers\.(\d+)\.(\w+)$", head)
    if projector == "resampler" and m:
        attn = {v: k for k, v in _ATTN_NAMES.items()} | {"to_k": "to_kv", "to_v": "to_kv"}
        ff = {v: k for k, v in _FF_NAMES.items()}
        if m.group(2) in attn:
            return f"layers.{m.group(1)}.0.{attn[m.group(2)]}.{leaf}"
        if m.group(2) in ff:
            return f"layers.{m.group(1)}.1.{ff[m.group(2)]}.{leaf}"
    return refcond_key


def _natural(key: str) -> list[tuple[int, str]]:
    """Sort key that puts ``layers.2`` before ``layers.10`` (numbers compared by length then digits, never converted)."""
    return [(len(p.lstrip("0")), p) if p.isdigit() else (-1, p) for p in re.split(r"([0-9]+)", key)]


def _problem_list(title: str, problems: list[str]) -> str:
    shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
    return f"{title}:\n  - " + "\n  - ".join(shown)
