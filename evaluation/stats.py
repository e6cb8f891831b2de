"""Small statistics for reporting results over seeds: mean, spread, t-intervals, bootstraps.

The headline interval of a mean over seeds, and of a paired difference between two arms,
is the Student t-interval over seeds (`summarize`, `t_interval`, the t fields of
`paired_bootstrap`). It is about the test set at hand: it treats the training seed as the
only source of variation. With 3 to 5 seeds a bootstrap over seeds alone is not a valid
interval; `two_level_paired_bootstrap` also resamples the test images, which is what
matters when the test set, not the training seed, is the main source of variation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as scipy_stats

from evaluation.metrics import balanced_accuracy_rows


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
    """Mean of a - b over pairs, with a seeded percentile bootstrap interval and a paired t-interval.

    Report the t-interval. The bootstrap over seeds alone is not a valid interval below
    about 10 seeds: at n = 3 its 95% interval is about [min, max] of the three differences
    and covers the true difference only about 75% of the time. To include test-set
    variation use two_level_paired_bootstrap.
    """
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


# A metric of resampled test sets: (labels, values), both (rows, images) -> (rows,) metric values.
RowMetric = Callable[[np.ndarray | None, np.ndarray], np.ndarray]


def mean_rows(labels: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    """Mean per-image value of each row (accuracy when values are 1 for correct, 0 for wrong)."""
    return values.mean(axis=1)


def accuracy_rows(labels: np.ndarray | None, pred: np.ndarray) -> np.ndarray:
    """Accuracy of each row of predictions against the row's labels."""
    return (pred == labels).mean(axis=1)


ROW_METRICS: dict[str, RowMetric] = {
    "mean": mean_rows,
    "accuracy": accuracy_rows,
    "balanced_accuracy": balanced_accuracy_rows,
}


@dataclass(frozen=True)
class TwoLevelDifference:
    """Mean over seeds of metric(a) - metric(b), with a two-level percentile bootstrap interval."""

    mean_diff: float
    boot_low: float
    boot_high: float
    n_seeds: int
    n_cases: int  # test images per seed (the fewest, if seeds differ)


def _two_level_chunk(
    a_list: list[np.ndarray],
    b_list: list[np.ndarray] | None,
    lab_list: list[np.ndarray] | None,
    metric: RowMetric,
    cases: str,
    rng: np.random.Generator,
    n_resamples: int,
) -> np.ndarray:
    """Mean over drawn seeds of metric(a) - metric(b) for ``n_resamples`` two-level resamples."""
    n_seeds = len(a_list)
    drawn = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    n_shared = a_list[0].size
    shared = rng.integers(0, n_shared, size=(n_resamples, n_shared), dtype=np.int32) if cases == "shared" else None
    diffs = np.empty((n_resamples, n_seeds))
    for s in range(n_seeds):
        rows, slots = np.nonzero(drawn == s)
        n = a_list[s].size
        images = shared[rows] if shared is not None else rng.integers(0, n, size=(rows.size, n), dtype=np.int32)
        labels = None if lab_list is None else lab_list[s][images]
        if b_list is None:  # a_list holds the per-image differences of a linear metric
            diffs[rows, slots] = metric(labels, a_list[s][images])
        else:
            diffs[rows, slots] = metric(labels, a_list[s][images]) - metric(labels, b_list[s][images])
    return diffs.mean(axis=1)


def two_level_paired_bootstrap(
    correct_a: Sequence[np.ndarray],
    correct_b: Sequence[np.ndarray],
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
    metric: Literal["mean", "accuracy", "balanced_accuracy"] | RowMetric = "mean",
    labels: Sequence[np.ndarray] | None = None,
    cases: Literal["shared", "per_seed"] = "shared",
) -> TwoLevelDifference:
    """Difference of two arms evaluated on the same test images, resampling seeds and images.

    ``correct_a[s]`` and ``correct_b[s]`` hold seed s's per-image values of each arm on the
    same images in the same order: 1/0 for right/wrong with metric="mean", or predicted
    classes with ``labels[s]`` for metric="accuracy" or "balanced_accuracy" (or any
    vectorised ``metric(labels, values)`` over rows of resampled images). Each resample
    draws seeds with replacement and test images with replacement, the same images for both
    arms, and averages metric(a) - metric(b) over the drawn seeds; the interval is the
    percentile interval of that average.

    cases="shared" (the default; for a test set that is the same for every seed, as here)
    draws one set of images per resample for all drawn seeds, so an image on which one arm
    is persistently better counts once, not once per seed (a crossed, "pigeonhole"
    bootstrap). cases="per_seed" draws the images anew within each drawn seed (a nested
    bootstrap), right when each seed has its own test sample; on a shared test set it
    under-covers as soon as persistent per-image differences matter.

    When it holds: the test images are a sample from the population the difference is
    about, and their variation dominates the seed-to-seed variation; then it covers about as
    promised even at 3 seeds, or more (per-seed noise on each image is counted twice). Where
    seed-to-seed variation dominates, its seed level has paired_bootstrap's defect: about
    75-80% at 3 seeds; use the t-interval. Simulated coverage of a 95% interval (3 seeds,
    tests/test_stats.py): image effects dominate: shared 0.93, per_seed 0.75; seeds
    dominate: shared 0.78, t-interval 0.96; per-seed image noise only: shared 0.99.
    """
    a_list, b_list = [np.asarray(x) for x in correct_a], [np.asarray(x) for x in correct_b]
    lab_list = None if labels is None else [np.asarray(x) for x in labels]
    row_metric = ROW_METRICS[metric] if isinstance(metric, str) else metric
    n_seeds = len(a_list)
    if n_seeds == 0 or len(b_list) != n_seeds or (lab_list is not None and len(lab_list) != n_seeds):
        raise ValueError(f"need the same number (> 0) of seeds for a, b and labels, got {n_seeds} and {len(b_list)}")
    sizes = [x.size for x in a_list]
    for s in range(n_seeds):
        if b_list[s].size != sizes[s] or (lab_list is not None and lab_list[s].size != sizes[s]):
            raise ValueError(f"seed {s}: arms a and b (and labels) must hold the same test images")
    if metric in ("accuracy", "balanced_accuracy") and lab_list is None:
        raise ValueError(f"metric {metric!r} compares predictions with labels: pass labels=[per-seed labels]")
    if cases == "shared" and len(set(sizes)) > 1:
        raise ValueError(f"cases='shared' needs the same test images for every seed, got sizes {sizes}: "
                         "use cases='per_seed' if each seed has its own test sample")

    whole = [None if lab_list is None else lab_list[s][None] for s in range(n_seeds)]
    mean_diff = float(np.mean([
        row_metric(whole[s], a_list[s][None])[0] - row_metric(whole[s], b_list[s][None])[0] for s in range(n_seeds)
    ]))
    if row_metric is mean_rows:  # the mean is linear: resample the per-image differences once
        a_list = [a.astype(np.float64) - b.astype(np.float64) for a, b in zip(a_list, b_list, strict=True)]
        b_list = None
    rng = np.random.default_rng(seed)
    # chunks of resamples keep the gathered (resamples, seeds, images) arrays to a few million entries
    chunk = max(1, 4_000_000 // (n_seeds * max(sizes)))
    diffs = np.concatenate([
        _two_level_chunk(a_list, b_list, lab_list, row_metric, cases, rng, min(chunk, n_resamples - start))
        for start in range(0, n_resamples, chunk)
    ])
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return TwoLevelDifference(mean_diff, float(low), float(high), n_seeds, int(min(sizes)))
