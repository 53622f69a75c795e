"""Means with bootstrap confidence intervals, alone and paired.

The percentile bootstrap: resample the values with replacement, take each resample's mean, and
report the 2.5th and 97.5th percentiles of those means (a 95 % interval). Paired differences
resample the pairs together, so a difference between two compositions evaluated on the same
samples and seeds is judged on the same draws. A fixed generator makes every interval
reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Resamples drawn per interval.
RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A mean and its 95 % bootstrap interval over ``n`` values (NaN when there are none)."""

    mean: float
    low: float
    high: float
    n: int

    def format(self, digits: int = 4) -> str:
        """``0.7312 [0.7101, 0.7530]``."""
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap(values: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES, confidence: float = 0.95) -> Estimate:
    """The mean of ``values`` and its percentile-bootstrap interval (non-finite values are left out)."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if data.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(float(data.mean()), float(low), float(high), int(data.size))


def paired_difference(a: Sequence[float], b: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES) -> Estimate:
    """The mean of ``a[i] - b[i]`` over pairs where both are finite, with its bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired values must be as many: {len(a)} and {len(b)}")
    return bootstrap([x - y for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)], seed=seed, resamples=resamples)
