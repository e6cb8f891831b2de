"""Small statistics for reporting results over seeds: mean, spread, t-intervals, paired bootstrap."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and confidence interval of a few values."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class PairedDifference:
    """Mean of paired differences a - b with a bootstrap and a t confidence interval."""

    n: int
    mean: float
    boot_low: float
    boot_high: float
    t_low: float
    t_high: float


def _finite(values: Sequence[float]) -> np.ndarray:
    """The values as floats, without NaN or None (missing metrics are left out, not zeroed)."""
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN when there is no value."""
    arr = _finite(values)
    return float(arr.mean()) if arr.size else math.nan


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator); NaN for fewer than two values."""
    arr = _finite(values)
    return float(arr.std(ddof=1)) if arr.size >= 2 else math.nan


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean; (NaN, NaN) for fewer than two values."""
    arr = _finite(values)
    if arr.size < 2:
        return math.nan, math.nan
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, arr.size - 1)) * float(arr.std(ddof=1))
    half /= math.sqrt(arr.size)
    centre = float(arr.mean())
    return centre - half, centre + half


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean, std and t-interval of the finite values in one record."""
    low, high = t_interval(values, confidence)
    return Summary(n=int(_finite(values).size), mean=mean(values), std=std(values), ci_low=low, ci_high=high)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedDifference:
    """Mean of a - b over pairs, with a seeded percentile bootstrap interval and a paired t-interval."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diffs = diffs[np.isfinite(diffs)]
    n = int(diffs.size)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    t_low, t_high = t_interval(diffs, confidence)
    if n < 2:
        return PairedDifference(n, float(diffs.mean()), math.nan, math.nan, t_low, t_high)
    # Resample whole pairs (seeds) so that the seed-level correlation between a and b is kept.
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, n, size=(n_resamples, n))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(n, float(diffs.mean()), float(low), float(high), t_low, t_high)
