"""``refcond generate``: one image from a prompt and a group of reference images."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import torch

import refcond
from refcond.building import build, resolve_composition
from refcond.checkpoints.io import PICKLE_SUFFIXES, read_checkpoint, read_metadata
from refcond.checkpoints.native import stored_composition
from refcond.cli.app import state
from refcond.config import Composition
from refcond.errors import ConfigError
from refcond.sources import check_device
from refcond.files import image_format, write_image
from refcond.images import load_references
from refcond.pipeline import RefcondPipeline
from refcond.registry import Registry

# -- option parsing -----------------------------------------------------------------------------


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``--set`` items into the role overrides of :meth:`refcond.Composition.with_overrides`.

    ``aggregator=concat`` names a component; ``encoder.output=hidden_states`` sets one option of a
    role's config, and ``injectors.lora.layers.rank=4`` a nested one (the other nested fields are
    kept); ``injectors.0.scale=0.5`` (or ``injectors.cross-attention.scale=0.5``) addresses one
    injector; ``injectors=a,b`` replaces them all. Values are read as JSON when they parse
    (``0.5``, ``true``, ``null``, ``[1, 2]``) and as plain strings otherwise.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise click.BadParameter(
                f"{item!r}: expected ROLE=NAME or ROLE.FIELD=VALUE, e.g. aggregator=concat or encoder.output=hidden_states.",
                param_hint="'--set'",
            )
        role = "injectors" if parts[0] == "injector" else parts[0]
        if role == "injectors" and len(parts) == 1:
            overrides["injectors"] = [name.strip() for name in raw.split(",") if name.strip()]
            continue
        if role == "injectors":
            injectors = overrides.setdefault("injectors", {})
            if not isinstance(injectors, dict):
                raise click.BadParameter(
                    f"{item!r}: 'injectors=...' already replaced every injector; set their options after naming them.", param_hint="'--set'"
                )
            target, rest = injectors.setdefault(parts[1], {}), parts[2:]
        else:
            target, rest = overrides.setdefault(role, {}), parts[1:]
        if not rest:
            target["name"] = raw.strip()
            continue
        config = target.setdefault("config", {})
        for part in rest[:-1]:  # encoder.a.b=v sets a nested field: {"a": {"b": v}}
            inner = config.setdefault(part, {})
            if not isinstance(inner, dict):
                raise click.BadParameter(f"{item!r}: {part!r} was set to a value by an earlier --set; it cannot also hold fields.", param_hint="'--set'")
            config = inner
        config[rest[-1]] = _value(raw, item)
    return overrides


def _value(raw: str, item: str | None = None) -> Any:
    """A ``--set`` value: JSON when it parses, else the text itself.

    JSON's non-finite numbers (``NaN``, ``Infinity``), integers of more than 4300 digits and values
    nested too deeply for the parser are refused with :class:`click.BadParameter`; the other limits
    (nesting, integer size) are the composition's own, checked when the overrides apply.
    """
    where = repr(item if item is not None else raw)
    if len(where) > 120:
        where = where[:100] + "...'"

    def refuse_constant(name: str) -> Any:
        raise click.BadParameter(
            f"{where}: {name} is not a number a configuration takes; give a finite number, or a JSON string ('\"{name}\"') for the text.",
            param_hint="'--set'",
        )

    try:
        return json.loads(raw, parse_constant=refuse_constant)
    except json.JSONDecodeError:
        return raw
    except RecursionError:
        raise click.BadParameter(f"{where}: the value is nested too deeply; a configuration nests a few levels.", param_hint="'--set'") from None
    except ValueError:  # Python refuses to read integers of more than 4300 digits
        raise click.BadParameter(f"{where}: the value holds an integer too long to read; configurations take integers of at most 20 digits.", param_hint="'--set'") from None


def _parse_scale(ctx: click.Context, param: click.Parameter, value: str | None) -> float | dict[str, Any]:
    """``--scale``: a number, or an InstantStyle per-block JSON object."""
    if value is None:
        return 1.0
    try:
        return float(value)
    except ValueError:
        pass
    try:
        data = json.loads(value)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise click.BadParameter(f'{value!r} is neither a number (0.6) nor a JSON object such as \'{{"up": {{"block_0": [0, 1, 0]}}}}\'.')
    return data


def _parse_weights(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers, one per --ref, e.g. 1,0.5,2.") from None


def backbone_for_model(model: str, registry: Registry) -> str:
    """The registered backbone whose diffusers pipeline class is the one ``model``'s model_index.json names."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(model)
    except OSError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot find a diffusers pipeline at {model!r}: {reason} --model takes a Hugging Face hub id "
            "(downloaded once, unless HF_HUB_OFFLINE=1) or a local folder holding model_index.json."
        ) from None
    class_name = config.get("_class_name")
    for entry in registry.entries("backbone"):
        pipeline_class = getattr(entry.obj, "pipeline_class", None)
        if pipeline_class is not None and pipeline_class.__name__ == class_name:
            return entry.name
    raise ConfigError(
        f"model {model!r} is a {class_name}, which no registered backbone drives. "
        f"Pass --backbone with one of: {', '.join(registry.names('backbone'))}."
    )


def backbone_override(
    recipe: Composition,
    given: dict[str, Any],
    registry: Registry,
    *,
    model: str | None,
    name: str | None,
    dtype: str | None,
    device: str | None,
) -> dict[str, Any]:
    """The backbone role to build: ``{"name", "config": {"model", ...}}``.

    Options win over ``--set backbone...`` (``given``), which wins over the composition's backbone;
    an unnamed backbone is inferred from the model's ``model_index.json``.
    """
    current = recipe.backbone.model_dump() if recipe.backbone else {"name": None, "config": {}}
    config = {**current["config"], **given.get("config", {})}
    config.update({k: v for k, v in (("model", model), ("dtype", dtype), ("device", device)) if v is not None})
    if config.get("model") is None:
        raise click.UsageError("no model to load: pass --model with a hub id or a local folder of a diffusers pipeline.")
    name = name or given.get("name") or current["name"] or backbone_for_model(config["model"], registry)
    return {"name": name, "config": config}


def _parse_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--device``: a torch device that exists on this machine, checked before anything loads."""
    if value is not None:
        try:
            check_device(value, "--device")
        except ConfigError as exc:
            raise click.BadParameter(str(exc).removeprefix("--device: ")) from None
    return value


def _multiple_of_8(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value % 8:
        raise click.BadParameter(
            f"{value} is not a multiple of 8 (Stable Diffusion works on 8x8-pixel latents); try {value - value % 8 or 8}."
        )
    return value


def _readable_kind(path: Path, allow_pickle: bool) -> bool:
    suffix = path.suffix.lower()
    return suffix == ".safetensors" or (allow_pickle and suffix in PICKLE_SUFFIXES)


@contextmanager
def _loading_bars(enabled: bool) -> Iterator[None]:
    """Hide the loading progress bars of diffusers and transformers (``--quiet``), restoring them after."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    if not enabled:
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for module, on in zip((diffusers_logging, transformers_logging), was, strict=True):
            (module.enable_progress_bar if on else module.disable_progress_bar)()


# -- the command --------------------------------------------------------------------------------

EPILOG = """\b
Examples:
  # IP-Adapter on SD1.5 with two references; this pipeline has no image encoder, so
  # the clip encoder loads the one published with IP-Adapter
  refcond generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --set encoder.model=h94/IP-Adapter --set encoder.subfolder=models/image_encoder \\
      --checkpoint ip-adapter_sd15.safetensors \\
      --ref cat1.png --ref cat2.png --prompt "a cat astronaut" --out out/cat.png

\b
  # a local pipeline folder, concatenating the references instead of averaging them
  refcond generate -m ./sd15 --checkpoint ip-adapter_sd15.safetensors \\
      -r cat1.png -r cat2.png -p "a cat" --set aggregator=concat

\b
  # a composition file, half strength, on a GPU, a JSON report on stdout
  refcond generate -c my-recipe.toml -m ./sdxl -r a.png --scale 0.5 --seed 7 \\
      --device cuda --dtype float16 --json
"""


def prepare_composition(
    plugins: Any,
    composition: str | None,
    sets: Sequence[str],
    checkpoint: Path | None,
    *,
    model: str | None,
    backbone: str | None,
    dtype: str | None,
    device: str | None,
) -> tuple[Composition, dict[str, Any]]:
    """The composition to build and its overrides (backbone pinned), checked before any model loads.

    A refcond checkpoint names its own composition when ``composition`` is ``None``; otherwise the
    default is ``ip-adapter``.
    """
    overrides = parse_overrides(sets)
    registry = plugins.registry
    stored = stored_composition(read_metadata(checkpoint)) if checkpoint is not None and checkpoint.suffix == ".safetensors" else None
    if composition is None and stored is not None:  # a refcond checkpoint knows its composition and model
        recipe = Composition.parse(stored, where=f"composition stored in {checkpoint}")
    else:
        recipe = resolve_composition(composition or "ip-adapter", registry)
    overrides["backbone"] = backbone_override(recipe, overrides.pop("backbone", {}), registry, model=model, name=backbone, dtype=dtype, device=device)
    if checkpoint is None:  # with a checkpoint, the file may change components: build() validates after reading it
        recipe.with_overrides(overrides).validate_components(registry)
    return recipe, overrides


def load_composition(
    st: Any,
    plugins: Any,
    recipe: Composition,
    overrides: dict[str, Any],
    checkpoint: Path | None,
    *,
    allow_pickle: bool,
    seed: int,
    quiet: bool,
    step: str = "",
) -> RefcondPipeline:
    """Load the backbone pipeline and build the composition on it, saying so; fresh own weights are warned about."""
    model = overrides["backbone"]["config"]["model"]
    st.status(f"{step}Loading {overrides['backbone']['name']} pipeline {model} with composition {recipe.name or ('stored in the checkpoint' if checkpoint else 'given')!r}...")
    try:
        with _loading_bars(enabled=not quiet):
            built = build(recipe, plugins, checkpoint=checkpoint, allow_pickle=allow_pickle, overrides=overrides, seed=seed)
    except OSError as exc:  # from diffusers' from_pretrained: missing or broken weight files
        raise click.ClickException(f"cannot load model {model!r}: {exc}") from None
    rp = RefcondPipeline(built, plugins)
    own_weights = list(rp.state_dict()) if checkpoint is None else []  # borrowed pretrained weights are not fresh
    if own_weights:
        st.warn(
            f"no --checkpoint, so the composition's own weights ({len(own_weights)} tensors, e.g. {own_weights[0]}) "
            f"are freshly initialised (seed {seed}): the references have no learned effect."
        )
    return rp


@click.command("generate", epilog=EPILOG)
@click.option(
    "-c",
    "--composition",
    default=None,
    metavar="NAME|FILE",
    help="A registered composition (see `refcond plugins`) or a .toml/.json composition file. "
    "Default: the composition stored in a refcond --checkpoint, else ip-adapter.",
)
@click.option(
    "-r",
    "--ref",
    "refs",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="A reference image; repeat for a group of references.",
)
@click.option("-p", "--prompt", default="", help="The text prompt (may be empty: the references alone condition the image).")
@click.option("-n", "--negative-prompt", default=None, help="What the image should not show.")
@click.option(
    "-m",
    "--model",
    default=None,
    metavar="ID|FOLDER",
    help="Hugging Face hub id or local folder of a diffusers SD1.5/SDXL pipeline. Required, unless the composition "
    "(or a refcond --checkpoint) records its backbone model.",
)
@click.option(
    "--backbone", default=None, metavar="NAME", help="Backbone to drive the model (sd15, sdxl); inferred from the model when omitted."
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Weights for the composition: a refcond checkpoint or a foreign format such as an IP-Adapter file.",
)
@click.option(
    "--allow-pickle", is_flag=True, help="Allow reading pickle checkpoints (.bin, .pt); they can run code, so only for trusted files."
)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="Weights dtype of the pipeline.")
@click.option("--device", default=None, callback=_parse_device, help="Device to run on, e.g. cuda, cuda:1, mps, cpu.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Denoising steps (default: the pipeline's, usually 50).")
@click.option("--guidance-scale", type=float, default=None, help="Classifier-free guidance scale (default: the pipeline's, usually 7.5).")
@click.option(
    "--scale",
    default=None,
    callback=_parse_scale,
    metavar="FLOAT|JSON",
    help="Strength of the references: a number (default 1.0), or a per-block JSON object as in InstantStyle.",
)
@click.option(
    "--weights",
    default=None,
    callback=_parse_weights,
    metavar="W1,W2,...",
    help="One weight per --ref, for weighting aggregators (--set aggregator=weighted-mean).",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Random seed of the generation and of any fresh weights (a composition without --checkpoint); "
    "a random one is chosen (and reported) when omitted.",
)
@click.option("--width", type=click.IntRange(min=8), default=None, callback=_multiple_of_8, help="Image width in pixels (a multiple of 8).")
@click.option(
    "--height", type=click.IntRange(min=8), default=None, callback=_multiple_of_8, help="Image height in pixels (a multiple of 8)."
)
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("refcond.png"),
    show_default=True,
    help="Output image; the suffix picks the format, missing folders are created.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="ROLE[.FIELD]=VALUE",
    help="Override the composition: ROLE=NAME swaps a component, ROLE.FIELD=VALUE sets an option "
    "(aggregator=concat, encoder.output=hidden_states, injectors.0.num_tokens=16). Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (output path, composition, seed, timings) on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines or progress bars on stderr.")
@click.pass_context
def generate(
    ctx: click.Context,
    composition: str,
    refs: tuple[Path, ...],
    prompt: str,
    negative_prompt: str | None,
    model: str | None,
    backbone: str | None,
    checkpoint: Path | None,
    allow_pickle: bool,
    dtype: str | None,
    device: str | None,
    steps: int | None,
    guidance_scale: float | None,
    scale: float | dict[str, Any],
    weights: list[float] | None,
    seed: int | None,
    width: int | None,
    height: int | None,
    out: Path,
    sets: tuple[str, ...],
    as_json: bool,
    quiet: bool,
) -> None:
    """Generate an image from a prompt and a group of reference images.

    Loads a diffusers Stable Diffusion 1.5 or XL pipeline (--model), builds the composition
    (encoder, aggregator, injectors; --composition), loads its weights (--checkpoint), encodes the
    references (--ref, repeated) once, and denoises. Everything is checked before the model loads:
    the references, the output name, the composition and the --set overrides.
    """
    started = time.perf_counter()
    st = state(ctx)
    st.quiet = quiet
    # Cheap checks first, so a typo fails in a second rather than after loading a model.
    references = load_references(list(refs))
    image_format(out)
    if weights is not None and len(weights) != len(references):
        raise click.BadParameter(f"got {len(weights)} weights for {len(references)} references.", param_hint="'--weights'")
    if checkpoint is not None and not _readable_kind(checkpoint, allow_pickle):
        read_checkpoint(checkpoint, allow_pickle=allow_pickle)  # refuses (pickle, unknown suffix) without reading
    plugins = st.get_plugins()
    st.warn_failures()
    recipe, overrides = prepare_composition(plugins, composition, sets, checkpoint, model=model, backbone=backbone, dtype=dtype, device=device)
    model = overrides["backbone"]["config"]["model"]
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    timings: dict[str, float] = {"prepare": time.perf_counter() - started}
    t = time.perf_counter()
    rp = load_composition(st, plugins, recipe, overrides, checkpoint, allow_pickle=allow_pickle, seed=seed, quiet=quiet, step="[1/3] ")
    rp.pipeline.set_progress_bar_config(disable=quiet)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    condition_shape = None
    if rp.encoder is not None:
        st.status(f"[2/3] Encoding {len(references)} reference(s)...")
        condition, _ = rp.encode([references], None if weights is None else [weights], prompts=[prompt])
        condition_shape = list(condition.tokens.shape)
    else:  # e.g. lora-tuning: the injectors learn from the references during the call
        st.status(f"[2/3] No encoder: the {len(references)} reference(s) go to the injectors...")
    timings["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    st.status(f"[3/3] Generating (seed {seed}, {steps or 'default'} steps)...")
    size = {k: v for k, v in (("width", width), ("height", height)) if v is not None}
    result = rp(
        prompt,
        references=references,
        reference_scale=scale,
        reference_weights=weights,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
        **size,
    )
    image = result.images[0]
    timings["generate"] = time.perf_counter() - t

    t = time.perf_counter()
    path = write_image(out, image)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    st.status(f"Wrote {path} ({image.width}x{image.height}) in {timings['total']:.1f} s.")
    if as_json:
        report = {
            "refcond_version": refcond.__version__,
            "output": str(path.resolve()),
            "width": image.width,
            "height": image.height,
            "composition": rp.composition.model_dump(mode="json"),
            "backbone": rp.backbone.name,
            "model": model,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "references": [str(p) for p in refs],
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "reference_scale": scale,
            "reference_weights": weights,
            "condition_shape": condition_shape,
            "timings": {k: round(v, 4) for k, v in timings.items()},
        }
        click.echo(json.dumps(report, indent=2, sort_keys=True))


__all__ = ["backbone_for_model", "generate", "parse_overrides"]
