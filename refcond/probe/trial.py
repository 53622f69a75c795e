"""One trial of the probe: an aggregator, built through the registry, and a fresh readout, trained on
one variant with one seed, then scored on the evaluation groups.

Every aggregator gets the same budget: the same batches for a given seed, the same readout, the
same optimizer and steps. Only the aggregator's own parameters (if any) and the readout's train;
the encoder is frozen. ``single`` is not an aggregator but the one-reference baseline: ``mean``
given one reference of each group.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from refcond.building import seeded
from refcond.config import validate_config
from refcond.contracts import Aggregator, BuildContext
from refcond.errors import ConfigError
from refcond.plugins import Plugins
from refcond.probe.data import EncodedGroups, evaluation_batches, training_batch
from refcond.probe.encoder import ProbeEncoder
from refcond.probe.readout import Readout

#: The one-reference baseline's name: ``mean`` over one reference of each group.
SINGLE = "single"
#: Evaluation groups scored per forward pass.
EVALUATION_BATCH = 500


@dataclass(frozen=True)
class TrialSettings:
    """What a trial trains with (the same for every aggregator)."""

    steps: int
    batch_size: int
    learning_rate: float
    readout_width: int = 64
    readout_heads: int = 4


@dataclass(frozen=True)
class TrialResult:
    """The outcome of one trial.

    :ivar correct: ``[G]`` bool, whether each evaluation group's prediction is its consistent element.
    :ivar parameters: trainable parameters of the aggregator (the readout's are not counted).
    :ivar seconds: wall-clock time of training and evaluation.
    :ivar loss: the training loss over the last 10% of the steps.
    """

    correct: torch.Tensor
    parameters: int
    seconds: float
    loss: float

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())


def build_aggregator(plugins: Plugins, name: str, config: Mapping[str, Any], encoder: ProbeEncoder, seed: int) -> Aggregator:
    """Build a registered aggregator as a composition would, its fresh weights seeded from ``seed``.

    Its context holds the probe's encoder (``embedding_dim``, ``mixes_references``) and no backbone.
    """
    name = "mean" if name == SINGLE else name
    entry = plugins.registry.get("aggregator", name)
    typed = validate_config(entry.config, dict(config), where=f"aggregator {name!r}")
    with seeded(seed, "aggregator"):
        return entry.obj(typed, BuildContext(encoder=encoder))  # type: ignore[arg-type]


def seed_for(*parts: object) -> int:
    """A 63-bit seed from any values (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") % 2**63


def run_trial(
    plugins: Plugins,
    method: str,
    config: Mapping[str, Any],
    encoder: ProbeEncoder,
    pool: EncodedGroups,
    evaluation: EncodedGroups,
    seed: int,
    settings: TrialSettings,
    progress: Callable[[str], None] | None = None,
) -> TrialResult:
    """Train ``method`` (a registered aggregator, or ``single``) and a readout on ``pool``; score it on ``evaluation``.

    Batches depend only on ``seed``, so two aggregators with the same seed see the same data.
    Raises :class:`ConfigError` when the aggregator cannot be built or run on the probe's encodings.
    """
    started = time.monotonic()
    single = method == SINGLE
    aggregator = build_aggregator(plugins, method, config, encoder, seed)
    condition_dim = aggregator.output_dim(encoder.embedding_dim)
    with seeded(seed, "readout"):
        readout = Readout(condition_dim, settings.readout_width, settings.readout_heads)
    own = [p for p in aggregator.parameters() if p.requires_grad] if isinstance(aggregator, torch.nn.Module) else []
    optimizer = torch.optim.AdamW([*own, *readout.parameters()], lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(seed_for("batches", seed))
    _train_mode(aggregator, readout, True)
    losses = []
    for step in range(settings.steps):
        encoding, target = training_batch(pool, settings.batch_size, generator, single=single)
        loss = F.cross_entropy(readout(_aggregate(aggregator, encoding, method)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None and (step + 1) % 100 == 0:
            progress(f"step {step + 1}/{settings.steps}, loss {sum(losses[-100:]) / len(losses[-100:]):.3f}")
    _train_mode(aggregator, readout, False)
    correct = []
    with torch.no_grad():
        for encoding, target in evaluation_batches(evaluation, EVALUATION_BATCH, single=single):
            correct.append(readout(_aggregate(aggregator, encoding, method)).argmax(dim=1) == target)
    tail = losses[-max(1, settings.steps // 10) :]
    return TrialResult(torch.cat(correct), sum(p.numel() for p in own), time.monotonic() - started, sum(tail) / len(tail))


def _aggregate(aggregator: Aggregator, encoding: Any, method: str) -> Any:
    condition = aggregator(encoding)
    if condition.tokens.shape[0] != encoding.batch_size:
        raise ConfigError(f"aggregator {method!r} returned {condition.tokens.shape[0]} condition rows for {encoding.batch_size} groups.")
    return condition


def _train_mode(aggregator: Aggregator, readout: Readout, training: bool) -> None:
    readout.train(training)
    if isinstance(aggregator, torch.nn.Module):
        aggregator.train(training)
