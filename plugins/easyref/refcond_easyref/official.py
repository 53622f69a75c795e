"""The official EasyRef checkpoint layout (``TempleX98/EasyRef``): importer (format ``easyref``) and exporter.

An official file holds, by prefix:

========================================================  =====================================  ==========================
official key                                              refcond key                            part
========================================================  =====================================  ==========================
``image_proj_model.proj.{0,2,3}.*``                       ``injector.cross-attention.projector.{fc1,fc2,norm}.*``  MLP projector
``mllm_final_layer.*``                                    ``aggregator.*``                       reference tokens, last layer, norm
``multimodal_llm.model.{layers.i,embed_tokens,norm}.*``   ``encoder.{layers.i,embed_tokens,norm}.*``  fine-tuned MLLM (optional)
``multimodal_llm.visual.*``                               ``encoder.visual.*``                   fine-tuned vision tower (optional)
``unet.<attn2>.processor.to_{k,v}_ip.weight``             ``injector.cross-attention.layers.<i>.to_{k,v}_ip.weight``  decoupled K/V
``unet.<attn>.processor.to_{q,k,v,out}_lora.{down,up}.weight``  ``injector.lora.unet.<attn>.{to_q,to_k,to_v,to_out.0}.lora_{A,B}.weight``  UNet LoRA
========================================================  =====================================  ==========================

``<i>`` counts the UNet's cross-attention layers in ``unet.attn_processors`` order. Sizes (projector
width, number of reference tokens, LoRA rank) are read from the file's shapes, which refcond has
checked hold values, and bounded before anything is built: the reference tokens live in the
projector's input width and number at most :data:`MAX_REFERENCE_TOKENS`. Without ``multimodal_llm.*``
(the alignment-pretraining stage trains no MLLM weights) the encoder keeps the weights of the
Qwen2-VL it loads; without LoRA keys (stage 1) the composition gets no LoRA layers.

Keys the official loader also ignores or never needs are skipped, with a warning: ``adapter_modules.*``
(a second view of the UNet processors), ``multimodal_llm.lm_head.weight`` (the MLLM's output head,
which EasyRef never runs) and copies of the frozen base UNet (``unet.*`` without ``.processor.``).
Every other tensor comes back bit-exact from :func:`to_official`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from refcond_injectors import MLP_OFFICIAL_NAMES, describe_layout, family

from refcond import (
    Backbone,
    CheckpointError,
    ConfigError,
    ImportedCheckpoint,
    IncompatibleBackboneError,
    check_state_dict,
    cross_attention_layers,
    write_safetensors,
)

PROJECTOR, AGGREGATOR, MLLM, UNET = "image_proj_model.", "mllm_final_layer.", "multimodal_llm.", "unet."
IGNORED_PREFIXES = ("adapter_modules.",)
CROSS_ATTENTION, LORA = "cross-attention", "lora"

#: Most reference tokens an EasyRef file may hold (the official release: 64; the last layer's attention grows with their square).
MAX_REFERENCE_TOKENS = 1024

_IP_KEY = re.compile(r"^(?P<processor>.+\.processor)\.(?P<name>to_k_ip|to_v_ip)\.weight$", re.ASCII)
_LORA_KEY = re.compile(r"^(?P<processor>.+\.processor)\.(?P<target>to_q|to_k|to_v|to_out)_lora\.(?P<side>down|up)\.weight$", re.ASCII)
#: Official LoRA names -> the projections of diffusers' Attention they wrap.
_LORA_TARGETS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
#: transformers 4.x (the official code) and 5.x name the MLLM's parts differently; both import.
_MLLM_NAMES = (
    ("model.language_model.", ""),
    ("model.visual.", "visual."),
    ("model.", ""),
    ("visual.", "visual."),
)
_MLLM_SKIPPED = ("lm_head.",)


class EasyRefFormat:
    """Official EasyRef files: ``image_proj_model.*`` + ``mllm_final_layer.*`` (+ UNet adapters, optional MLLM)."""

    def save(self, pipeline: Any, path: str | Path) -> Path:
        """Write an EasyRef composition in the official layout (:func:`save_official`): what ``export = ["easyref"]`` calls."""
        return save_official(pipeline, path)

    def detect(self, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bool:
        return any(k.startswith(PROJECTOR) for k in state_dict) and any(k.startswith(AGGREGATOR) for k in state_dict)

    def convert(
        self, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], backbone: Backbone | None
    ) -> ImportedCheckpoint:
        if backbone is None:
            raise CheckpointError(
                "an official EasyRef file needs a pipeline to attach to: refcond.from_pipe(sdxl_pipe, 'easyref', checkpoint=...)."
            )
        parts: dict[str, dict[str, torch.Tensor]] = {PROJECTOR: {}, AGGREGATOR: {}, MLLM: {}, UNET: {}}
        ignored: list[str] = []
        for key, tensor in state_dict.items():
            prefix = next((p for p in parts if key.startswith(p)), None)
            if prefix is not None:
                parts[prefix][key[len(prefix) :]] = tensor
            elif key.startswith(IGNORED_PREFIXES):
                ignored.append(key)
            else:
                raise CheckpointError(
                    f"unexpected key {key!r} (shape {tuple(tensor.shape)}): an EasyRef file holds keys under "
                    f"{', '.join((PROJECTOR, AGGREGATOR, MLLM, UNET))} only."
                )

        weights: dict[str, torch.Tensor] = {}
        projector_config = _projector(parts[PROJECTOR], backbone, weights)
        ip_weights, lora_weights, lora_config, base_unet = _unet(parts[UNET], backbone)
        weights.update(ip_weights)
        weights.update(lora_weights)
        weights.update({f"aggregator.{k}": v for k, v in parts[AGGREGATOR].items()})
        mllm, skipped = _mllm(parts[MLLM])
        weights.update(mllm)

        ignored += skipped + [UNET + k for k in base_unet]
        if ignored:
            warnings.warn(
                f"EasyRef checkpoint: {len(ignored)} tensor(s) not used by refcond were skipped (e.g. {ignored[0]}): "
                "adapter_modules.* repeats the UNet processors, multimodal_llm.lm_head is never run, and unet.* "
                "outside .processor. is a copy of the frozen base UNet.",
                stacklevel=2,
            )

        tokens = parts[AGGREGATOR].get("reference_tokens")
        hidden = projector_config["input_dim"]  # the projector reads the MLLM's hidden states, where the tokens live
        if tokens is None or tokens.ndim != 2 or int(tokens.shape[1]) != hidden:
            got = "missing" if tokens is None else f"got shape {tuple(tokens.shape)}"
            raise CheckpointError(
                f"key {AGGREGATOR}reference_tokens: expected a [num_tokens, {hidden}] tensor (the MLLM's hidden size, which "
                f"{PROJECTOR}proj.0.weight reads), {got}."
            )
        if int(tokens.shape[0]) > MAX_REFERENCE_TOKENS:
            raise CheckpointError(
                f"key {AGGREGATOR}reference_tokens has shape {tuple(tokens.shape)}: {tokens.shape[0]} reference tokens, more than "
                f"the {MAX_REFERENCE_TOKENS} an EasyRef file may hold (the official release has 64). The file is corrupt or not EasyRef's."
            )
        composition: dict[str, Any] = {
            "aggregator": {"name": "reference-tokens", "config": {"num_tokens": int(tokens.shape[0])}},
            "injectors": {CROSS_ATTENTION: {"config": projector_config}, LORA: {"config": {"layers": lora_config}}},
        }
        return ImportedCheckpoint(
            composition=composition,
            state_dict=weights,
            source="easyref",
            recipe="easyref",
        )


def _projector(sd: Mapping[str, torch.Tensor], backbone: Backbone, out: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Check ``image_proj_model.*`` (Linear-GELU-Linear-LayerNorm) and rename it; returns the injector's config."""
    fc1, fc2 = sd.get("proj.0.weight"), sd.get("proj.2.weight")
    if fc1 is None or fc2 is None or fc1.ndim != 2 or fc2.ndim != 2:
        raise CheckpointError(
            f"the projector needs {PROJECTOR}proj.0.weight and {PROJECTOR}proj.2.weight as 2-d tensors (EasyRef's MLPProjModel); "
            f"the file has {', '.join(PROJECTOR + k for k in sorted(sd)) or 'no projector keys'}."
        )
    hidden, input_dim = (int(d) for d in fc1.shape)
    cross_dim = backbone.cross_attention_dim
    if int(fc2.shape[0]) != cross_dim:
        raise IncompatibleBackboneError(
            f"key {PROJECTOR}proj.2.weight has shape {tuple(fc2.shape)}: the projector makes {fc2.shape[0]}-d tokens, for "
            f"{family(int(fc2.shape[0]))}, but the pipeline is {backbone.name} (cross-attention dim {cross_dim}). "
            "Use the EasyRef checkpoint made for this backbone (the official release is for SDXL)."
        )
    expected = {
        "proj.0.weight": (hidden, input_dim),
        "proj.0.bias": (hidden,),
        "proj.2.weight": (cross_dim, hidden),
        "proj.2.bias": (cross_dim,),
        "proj.3.weight": (cross_dim,),
        "proj.3.bias": (cross_dim,),
    }
    check_state_dict(expected, sd, PROJECTOR, title="the image projection model does not match")
    for key, tensor in sd.items():
        head, _, leaf = key.rpartition(".")
        out[f"injector.{CROSS_ATTENTION}.projector.{MLP_OFFICIAL_NAMES[head]}.{leaf}"] = tensor
    return {"projector": "mlp", "input_dim": input_dim, "mlp_hidden_dim": hidden}


def _unet(
    sd: Mapping[str, torch.Tensor], backbone: Backbone
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any] | None, list[str]]:
    """``(cross-attention weights, LoRA weights, LoRA layers config or None, skipped base-UNet keys)``."""
    unet = backbone.unet
    ip: dict[str, torch.Tensor] = {}
    lora: dict[str, tuple[str, str, str]] = {}
    base: list[str] = []
    for key in sd:
        if (match := _IP_KEY.match(key)) is not None:
            ip[key] = sd[key]
        elif (match := _LORA_KEY.match(key)) is not None:
            lora[key] = (match["processor"], match["target"], match["side"])
        elif ".processor." in key:
            raise CheckpointError(
                f"unexpected key {UNET}{key} (shape {tuple(sd[key].shape)}): EasyRef processors hold to_k_ip/to_v_ip and "
                "to_{q,k,v,out}_lora.{down,up} weights only."
            )
        else:
            base.append(key)
    if not ip:
        raise CheckpointError(f"no {UNET}<layer>.processor.to_k_ip.weight keys: the file lacks the decoupled cross-attention weights.")

    layers = cross_attention_layers(unet)
    file_dims = {int(t.shape[1]) for t in ip.values() if t.ndim == 2}
    if file_dims and backbone.cross_attention_dim not in file_dims:  # else a few odd keys: listed below
        file_dim = min(file_dims)
        raise IncompatibleBackboneError(
            f"this EasyRef file is for {family(file_dim)} (its to_k_ip layers read {file_dim}-d tokens, {len(ip) // 2} "
            f"cross-attention layers), but the pipeline is {backbone.name} ({describe_layout(layers)}). "
            "Use the EasyRef checkpoint made for this backbone (the official release is for SDXL)."
        )
    expected_ip = {
        f"{layer.name}.{name}.weight": (layer.hidden_size, layer.cross_attention_dim) for layer in layers for name in ("to_k_ip", "to_v_ip")
    }
    check_state_dict(expected_ip, ip, UNET, title=f"the cross-attention weights do not match (the file has {len(ip) // 2} layers, the UNet {len(layers)})")
    ip_weights = {
        f"injector.{CROSS_ATTENTION}.layers.{i}.{name}.weight": ip[f"{layer.name}.{name}.weight"]
        for i, layer in enumerate(layers)
        for name in ("to_k_ip", "to_v_ip")
    }
    if not lora:
        return ip_weights, {}, None, base

    for key in lora:
        if sd[key].ndim != 2:
            raise CheckpointError(f"key {UNET}{key}: a LoRA weight is a matrix ([rank, in] or [out, rank]), got shape {tuple(sd[key].shape)}.")
    downs = [k for k, (_, _, side) in lora.items() if side == "down"]
    if not downs:
        raise CheckpointError(f"the UNet LoRA has up weights (e.g. {UNET}{next(iter(lora))}) but no .down.weight keys: the file is incomplete.")
    targets = [t for t in _LORA_TARGETS if any(target == t for _, target, _ in lora.values())]
    rank = int(sd[downs[0]].shape[0])
    expected_lora: dict[str, tuple[int, ...]] = {}
    renamed: dict[str, str] = {}
    for processor in unet.attn_processors:
        attention = processor.removesuffix(".processor")
        for target in targets:
            linear = unet.get_submodule(f"{attention}.{_LORA_TARGETS[target]}")
            for side, shape, peft in (("down", (rank, linear.in_features), "lora_A"), ("up", (linear.out_features, rank), "lora_B")):
                key = f"{processor}.{target}_lora.{side}.weight"
                expected_lora[key] = shape
                renamed[key] = f"injector.{LORA}.unet.{attention}.{_LORA_TARGETS[target]}.{peft}.weight"
    check_state_dict(expected_lora, {k: sd[k] for k in lora}, UNET, title=f"the UNet LoRA (rank {rank}, targets {targets}) does not match")
    lora_weights = {renamed[k]: sd[k] for k in lora}
    config = {"rank": rank, "targets": [_LORA_TARGETS[t] for t in targets]}
    return ip_weights, lora_weights, config, base


def _mllm(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``multimodal_llm.*`` renamed to the ``mllm`` encoder's keys, and the keys skipped (its output head)."""
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, tensor in sd.items():
        if key.startswith(_MLLM_SKIPPED):
            skipped.append(MLLM + key)
            continue
        for old, new in _MLLM_NAMES:
            if key.startswith(old):
                out[f"encoder.{new}{key[len(old) :]}"] = tensor
                break
        else:
            raise CheckpointError(
                f"unexpected key {MLLM}{key} (shape {tuple(tensor.shape)}): expected {MLLM}model.* or {MLLM}visual.* (Qwen2-VL)."
            )
    return out, skipped


# -- export ---------------------------------------------------------------------------------------


def to_official(pipeline: Any) -> dict[str, torch.Tensor]:
    """The weights of an EasyRef :class:`refcond.RefcondPipeline` in the official layout.

    Its composition must be EasyRef's: encoder ``mllm``, aggregator ``reference-tokens``, a
    ``cross-attention`` injector with the ``mlp`` projector and (optionally) a ``lora`` injector
    with ``layers``. The MLLM's weights are written as ``multimodal_llm.*`` (transformers 4.x names,
    as the official code saves them).
    """
    composition = pipeline.composition
    names = [spec.name for spec in composition.injectors]
    if (
        composition.encoder is None
        or composition.encoder.name != "mllm"
        or composition.aggregator is None
        or composition.aggregator.name != "reference-tokens"
        or CROSS_ATTENTION not in names
    ):
        raise ConfigError(
            "to_official needs an EasyRef composition (encoder 'mllm', aggregator 'reference-tokens', injector "
            f"'cross-attention' with projector 'mlp'); got {pipeline!r}."
        )
    cross = pipeline.injectors[names.index(CROSS_ATTENTION)]
    if cross.config.projector != "mlp":
        raise ConfigError(f"to_official: the cross-attention injector's projector is {cross.config.projector!r}; EasyRef's is 'mlp'.")
    out: dict[str, torch.Tensor] = {}
    official_names = {ours: official for official, ours in MLP_OFFICIAL_NAMES.items()}
    for key, tensor in cross.projector.state_dict().items():
        head, _, leaf = key.rpartition(".")
        out[f"{PROJECTOR}{official_names[head]}.{leaf}"] = tensor
    out.update({f"{AGGREGATOR}{k}": v for k, v in pipeline.aggregator.state_dict().items()})
    for key, tensor in pipeline.encoder.state_dict().items():
        out[MLLM + (key if key.startswith("visual.") else f"model.{key}")] = tensor
    for layer, kv in zip(cross.layout, cross.layers):
        out[f"{UNET}{layer.name}.to_k_ip.weight"] = kv.to_k_ip.weight
        out[f"{UNET}{layer.name}.to_v_ip.weight"] = kv.to_v_ip.weight
    if LORA in names:
        peft_names = {v: k for k, v in _LORA_TARGETS.items()}
        for key, tensor in pipeline.injectors[names.index(LORA)].state_dict().items():
            path, _, leaf = key.removeprefix(UNET).rpartition(".lora_")
            attention, target = _split_target(path, peft_names)
            side = "down" if leaf == "A.weight" else "up"
            out[f"{UNET}{attention}.processor.{peft_names[target]}_lora.{side}.weight"] = tensor
    return {key: tensor.detach().contiguous() for key, tensor in out.items()}


def save_official(pipeline: Any, path: str | Path) -> Path:
    """Write :func:`to_official` to a ``.safetensors`` file atomically (the official loader reads it)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"official EasyRef checkpoints are written as .safetensors; got {str(path)!r}.")
    return write_safetensors(path, to_official(pipeline), {"format": "pt"})


def _split_target(path: str, targets: Mapping[str, str]) -> tuple[str, str]:
    """``down_blocks.1...attn1.to_out.0`` -> (``down_blocks.1...attn1``, ``to_out.0``)."""
    for target in sorted(targets, key=len, reverse=True):
        if path.endswith("." + target):
            return path[: -len(target) - 1], target
    raise ConfigError(f"to_official: LoRA layer {path!r} is not one of EasyRef's targets {sorted(targets)}.")
