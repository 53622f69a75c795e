"""Bootstrap confidence intervals over evaluation groups: of an accuracy, and of a paired difference.

Every method is scored on the same evaluation groups, so two methods compare *paired*: the
difference is taken group by group and the groups are resampled together. With several training
seeds a group's score is its mean over the seeds, so the interval is over groups at the seeds
run; how far seeds differ is reported beside it (the per-seed accuracies), not folded into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Estimate:
    """A mean over groups with its bootstrap interval (all in [0, 1], or [-1, 1] for a difference)."""

    value: float
    low: float
    high: float

    def as_points(self) -> dict[str, float]:
        """Percentage points, rounded to 0.1: ``{"value", "low", "high"}``."""
        return {"value": round(100 * self.value, 1), "low": round(100 * self.low, 1), "high": round(100 * self.high, 1)}


def resamples(groups: int, count: int, seed: int) -> torch.Tensor:
    """``[count, groups]`` indices drawn with replacement: one bootstrap resample of the groups per row.

    Use the same resamples for every estimate of one evaluation set, so that they agree.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(groups, (count, groups), generator=generator)


def bootstrap(scores: torch.Tensor, draws: torch.Tensor, confidence: float = 0.95) -> Estimate:
    """Mean of per-group ``scores`` ``[G]`` and its percentile bootstrap interval over the ``draws`` rows."""
    if scores.ndim != 1 or draws.shape[1] != scores.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} and resamples {tuple(draws.shape)} do not match: one score per group")
    scores = scores.double()
    means = scores[draws].mean(dim=1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Estimate(float(scores.mean()), low, high)


def per_group(correct: torch.Tensor) -> torch.Tensor:
    """A group's score from ``[S, G]`` correctness over ``S`` seeds: the fraction of seeds that got it right."""
    return correct.double().mean(dim=0)


def paired_difference(a: torch.Tensor, b: torch.Tensor, draws: torch.Tensor, confidence: float = 0.95) -> Estimate:
    """``a - b`` for per-group scores of two methods on the same groups, resampled together."""
    return bootstrap(a.double() - b.double(), draws, confidence)
