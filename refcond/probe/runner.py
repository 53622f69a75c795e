"""Running the whole probe: the encoder, the encoded groups of each variant, every (variant, method,
seed) trial, and the report — resumable, every file written atomically.

A finished trial is stored as ``runs/<variant>/<method>/seed-<s>.json`` with a key that hashes
everything it depends on (settings, encoder recipe, the probe's code, the aggregator's config and
its plugin's version); a run started again skips every trial whose stored key matches.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from refcond.config import ComponentConfig, merge_nested, validate_config
from refcond.errors import ConfigError, RefcondError
from refcond.files import atomic_write
from refcond.plugins import Plugins
from refcond.probe import data, readout, render, stats, trial
from refcond.probe.data import EncodedGroups, encode_groups
from refcond.probe.encoder import EncoderRecipe, default_cache, load_or_pretrain, read_cached, recipe_key
from refcond.probe.report import markdown, plot
from refcond.probe.trial import SINGLE, TrialSettings, run_trial, seed_for

Input = Literal["tokens", "pooled"]
#: What an aggregator reads: the encoder's 16 tokens per reference, or their mean (one pooled embedding per reference).
INPUTS: tuple[Input, ...] = ("tokens", "pooled")
#: The probe's own settings for aggregators whose registered defaults are sized for real models.
#: ``--config`` merges over them.
AGGREGATOR_DEFAULTS: dict[str, dict[str, Any]] = {"learned-queries": {"num_tokens": 4, "layers": 2, "heads": 4}}
#: Bootstrap resamples of the confidence intervals.
BOOTSTRAP = 2000
#: Seed of the bootstrap resamples (fixed: intervals of one evaluation set agree with each other).
BOOTSTRAP_SEED = 0


#: The quick settings of ``refcond probe --smoke`` and of the test suite: about 30 s on two CPU cores,
#: and learned-queries still far above mean on the binding variant.
SMOKE: dict[str, Any] = {
    "methods": ["mean@pooled", "mean", "learned-queries"],
    "variants": ["binding"],
    "seeds": [0],
    "steps": 150,
    "batch_size": 64,
    "train_groups": 1024,
    "eval_groups": 500,
    "encoder": {"steps": 300, "pool": "max"},
}


@dataclass(frozen=True)
class Method:
    """An aggregator (or ``single``) and what it reads; written ``NAME`` (tokens) or ``NAME@pooled``."""

    aggregator: str
    input: Input = "tokens"

    @property
    def label(self) -> str:
        return self.aggregator if self.input == "tokens" else f"{self.aggregator}@{self.input}"

    @classmethod
    def parse(cls, text: str) -> Method:
        name, _, given = text.strip().partition("@")
        if not name or (given and given not in INPUTS):
            raise ValueError(f"{text!r} is not a method: write an aggregator name, optionally with @tokens or @pooled (e.g. 'mean@pooled')")
        return cls(name, given or "tokens")  # type: ignore[arg-type]


class ProbeConfig(ComponentConfig):
    """Settings of ``refcond probe``; the defaults are the documented full run."""

    methods: list[str] = Field(
        default=["single", "mean@pooled", "mean", "concat", "learned-queries"],
        min_length=1,
        max_length=64,
        description="What is compared: registered aggregators by name (third-party ones too), 'single' for the one-reference "
        "baseline; '@pooled' makes one read a single pooled embedding per reference (the mean of its tokens, what the default "
        "encoder's pretraining reads, as IP-Adapter reads CLIP's pooled embedding) instead of its 16 tokens.",
    )
    aggregator_configs: dict[str, dict[str, Any]] = Field(
        default={}, description="Config of an aggregator by name, merged over the probe's defaults (learned-queries: num_tokens 4, layers 2, heads 4)."
    )
    variants: list[render.Variant] = Field(default=list(render.VARIANTS), min_length=1, max_length=2, description="Task variants: binding, plain.")
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1, max_length=64, description="Training seeds; every method runs with each.")
    steps: int = Field(default=500, ge=1, le=1_000_000, description="Training steps of each trial.")
    batch_size: int = Field(default=128, ge=1, le=65536, description="Groups per training step.")
    learning_rate: float = Field(default=1e-3, gt=0, le=1, description="AdamW learning rate of the aggregator and readout.")
    train_groups: int = Field(default=8192, ge=1, le=1_000_000, description="Groups rendered and encoded for training (each batch shuffles its groups' references).")
    eval_groups: int = Field(default=2000, ge=1, le=1_000_000, description="Evaluation groups (the same for every method and seed).")
    data_seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seed of the training and evaluation groups.")
    encoder: EncoderRecipe = Field(default_factory=EncoderRecipe, description="How the frozen encoders are pretrained (their labels come from 'labels').")
    labels: dict[render.Variant, Literal["attributes", "classes"]] = Field(
        default={"binding": "attributes", "plain": "classes"},
        description="The labels each variant's encoder is pretrained on: 'attributes' (colours and shapes, unpaired) or 'classes' "
        "(colour-shape pairs). The binding variant's point is an encoder that does not pair them; the plain variant is the "
        "multi- vs single-reference control.",
    )
    threads: int | None = Field(default=None, ge=1, le=1024, description="torch CPU threads during the run; None = torch's default.")

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        labels = [Method.parse(text).label for text in value]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"methods are listed twice: {', '.join(repeated)}")
        return labels

    @field_validator("variants", "seeds")
    @classmethod
    def _distinct(cls, value: list[Any]) -> list[Any]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value} lists an entry twice")
        return value

    def recipe(self, variant: str) -> EncoderRecipe:
        """The encoder recipe of ``variant``: ``encoder`` with the variant's labels."""
        return self.encoder.model_copy(update={"labels": self.labels.get(variant, self.encoder.labels)})  # type: ignore[call-overload]

    def parsed_methods(self) -> list[Method]:
        """The methods, parsed."""
        return [Method.parse(text) for text in self.methods]

    def aggregator_config(self, name: str) -> dict[str, Any]:
        """The config the probe builds aggregator ``name`` with: its probe defaults, then the user's."""
        return merge_nested(AGGREGATOR_DEFAULTS.get(name, {}), self.aggregator_configs.get(name, {}))


@dataclass
class ProbeResult:
    """What :func:`run_probe` returns: the results dictionary (as in ``results.json``) and the files written."""

    results: dict[str, Any]
    files: dict[str, Path]


def check_methods(config: ProbeConfig, plugins: Plugins) -> None:
    """Fail fast, before any work: every aggregator is registered and its config valid."""
    registry = plugins.registry
    for name in config.aggregator_configs:
        if name not in {m.aggregator for m in config.parsed_methods()} and not (name == "mean" and SINGLE in config.methods):
            raise ConfigError(f"--config names aggregator {name!r}, which no method uses (methods: {', '.join(config.methods)}).")
    for method in config.parsed_methods():
        name = _aggregator_name(method)
        entry = registry.get("aggregator", name)
        validate_config(entry.config, config.aggregator_config(name), where=f"aggregator {name!r}")


def run_probe(
    config: ProbeConfig | Mapping[str, Any] | None,
    output: str | Path,
    plugins: Plugins,
    *,
    cache: str | Path | None = None,
    make_plot: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Run every (variant, method, seed) trial not already in ``output``; write ``results.json``, ``results.md`` and ``probe.png``.

    Every aggregator is built through ``plugins.registry``. Unknown names and invalid configs raise
    (:class:`refcond.UnknownComponentError`, :class:`refcond.ConfigError`) before any work; a trial
    that fails while it runs is recorded under ``failures`` and the others go on. Finished trials
    are stored in ``output/runs/`` as they end, so an interrupted run resumes where it stopped.

    :param config: the settings (a :class:`ProbeConfig` or a dict of its fields); ``None`` = the full run.
    :param output: the output folder (created).
    :param plugins: where aggregators are looked up (``refcond.get_plugins()`` for the installed ones).
    :param cache: folder of the pretrained encoders (``None``: :func:`refcond.probe.encoder.default_cache`).
    :param make_plot: draw ``probe.png`` (needs matplotlib).
    :param progress: called with one line of text per step worth reporting.
    """
    config = config if isinstance(config, ProbeConfig) else validate_config(ProbeConfig, config or {}, where="the probe's settings")  # type: ignore[assignment]
    check_methods(config, plugins)
    say = progress or (lambda line: None)
    out = Path(output)
    cache = default_cache() if cache is None else Path(cache)
    settings = TrialSettings(config.steps, config.batch_size, config.learning_rate)
    outcomes: dict[tuple[str, str, int], dict[str, Any]] = {}
    failures: list[dict[str, Any]] = []
    encoders: dict[str, dict[str, Any]] = {}
    with _threads(config.threads):
        for variant in config.variants:
            recipe = config.recipe(variant)
            todo = []
            for method in config.parsed_methods():
                for seed in config.seeds:
                    key = _trial_key(config, plugins, recipe_key(recipe), variant, method, seed)
                    stored = _read_trial(_trial_path(out, variant, method, seed), key)
                    if stored is not None:
                        outcomes[variant, method.label, seed] = stored
                    else:
                        todo.append((method, seed, key))
            if not todo:
                say(f"{variant}: every trial already done")
                encoders[variant] = _cached_facts(recipe, cache)
                continue
            encoder, encoders[variant] = load_or_pretrain(recipe, cache, say)
            say(
                f"{variant}: encoder on {recipe.labels} labels {'read from the cache' if encoders[variant]['cached'] else 'pretrained'}, "
                f"exact-set accuracy {100 * encoders[variant]['accuracy']:.1f} %"
            )
            started = time.monotonic()
            pool = encode_groups(encoder, variant, config.train_groups, seed_for("train", variant, config.data_seed), say)
            evaluation = encode_groups(encoder, variant, config.eval_groups, seed_for("evaluation", variant, config.data_seed))
            inputs = {"tokens": (pool, evaluation), "pooled": (pool.pooled(), evaluation.pooled())}
            say(f"{variant}: {config.train_groups} training and {config.eval_groups} evaluation groups encoded in {time.monotonic() - started:.0f} s")
            for method, seed, key in todo:
                where = f"{variant} / {method.label} / seed {seed}"
                try:
                    result = run_trial(
                        plugins,
                        method.aggregator,
                        config.aggregator_config(_aggregator_name(method)),
                        encoder,
                        *inputs[method.input],
                        seed,
                        settings,
                        progress=lambda line, where=where: say(f"{where}: {line}"),
                    )
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # a third-party aggregator may fail in any way: report it, run the rest
                    error = str(exc) if isinstance(exc, RefcondError) else f"{type(exc).__name__}: {exc}"
                    failures.append({"variant": variant, "method": method.label, "seed": seed, "error": error})
                    say(f"{where}: failed: {error}")
                    continue
                stored = {
                    "key": key,
                    "variant": variant,
                    "method": method.label,
                    "seed": seed,
                    "accuracy": result.accuracy,
                    "parameters": result.parameters,
                    "seconds": result.seconds,
                    "loss": result.loss,
                    "correct": "".join("1" if c else "0" for c in result.correct.tolist()),
                }
                atomic_write(_trial_path(out, variant, method, seed), lambda tmp, stored=stored: tmp.write_text(json.dumps(stored) + "\n"))
                outcomes[variant, method.label, seed] = stored
                say(f"{where}: accuracy {100 * result.accuracy:.1f} % in {result.seconds:.0f} s")
    results = summarise(config, encoders, outcomes, failures)
    files = {"json": out / "results.json", "markdown": out / "results.md"}
    atomic_write(files["json"], lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    atomic_write(files["markdown"], lambda tmp: tmp.write_text(markdown(results)))
    if make_plot and results["accuracy"]:
        files["plot"] = plot(results, out / "probe.png")
    return ProbeResult(results, files)


def summarise(
    config: ProbeConfig, encoders: dict[str, dict[str, Any]], outcomes: Mapping[tuple[str, str, int], Mapping[str, Any]], failures: list[dict[str, Any]]
) -> dict[str, Any]:
    """The results dictionary: accuracy per variant and method with CIs, paired differences, failures."""
    accuracy, differences = [], []
    draws = stats.resamples(config.eval_groups, BOOTSTRAP, BOOTSTRAP_SEED)
    for variant in config.variants:
        scores: dict[str, torch.Tensor] = {}
        for label in config.methods:
            runs = [outcomes[variant, label, seed] for seed in config.seeds if (variant, label, seed) in outcomes]
            if len(runs) != len(config.seeds):
                continue  # a failed seed: the method is listed under failures only
            correct = torch.tensor([[c == "1" for c in run["correct"]] for run in runs])
            scores[label] = stats.per_group(correct)
            accuracy.append(
                {
                    "variant": variant,
                    "method": label,
                    "accuracy": stats.bootstrap(scores[label], draws).as_points(),
                    "per_seed": {str(run["seed"]): round(100 * float(row.double().mean()), 1) for run, row in zip(runs, correct)},
                    "parameters": runs[0]["parameters"],
                    "seconds": sum(run["seconds"] for run in runs) / len(runs),
                }
            )
        labels = list(scores)
        for i, a in enumerate(labels):
            for b in labels[:i]:
                difference = stats.paired_difference(scores[a], scores[b], draws).as_points()
                differences.append({"variant": variant, "a": a, "b": b, "difference": difference})
    return {
        "settings": json.loads(config.model_dump_json()),
        "encoders": encoders,
        "accuracy": accuracy,
        "differences": differences,
        "failures": failures,
    }


def _aggregator_name(method: Method) -> str:
    return "mean" if method.aggregator == SINGLE else method.aggregator


def _trial_key(config: ProbeConfig, plugins: Plugins, encoder_key: str, variant: str, method: Method, seed: int) -> str:
    name = _aggregator_name(method)
    provenance = plugins.registry.get("aggregator", name).provenance
    parts = {
        "encoder": encoder_key,
        "variant": variant,
        "method": method.label,
        "aggregator": [name, config.aggregator_config(name), provenance.distribution, provenance.version],
        "seed": seed,
        "settings": [config.steps, config.batch_size, config.learning_rate, config.train_groups, config.eval_groups, config.data_seed],
        "code": [hashlib.sha256(inspect.getsource(module).encode()).hexdigest() for module in (data, readout, trial)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _trial_path(out: Path, variant: str, method: Method, seed: int) -> Path:
    return out / "runs" / variant / re.sub(r"[^A-Za-z0-9_.@-]", "_", method.label) / f"seed-{seed}.json"


def _read_trial(path: Path, key: str) -> dict[str, Any] | None:
    """A stored trial whose key matches, or ``None`` (absent, unreadable, or made with other settings)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and stored.get("key") == key else None


def _cached_facts(recipe: EncoderRecipe, cache: Path) -> dict[str, Any]:
    """The facts of an encoder no trial needed this time: from its cache file, or only its key."""
    try:
        found = read_cached(recipe, cache)
    except Exception:
        found = None
    return found[1] if found is not None else {"key": recipe_key(recipe), "accuracy": None, "seconds": None, "cached": True}


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
