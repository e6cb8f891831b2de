"""Seeded stratified assignment of images (or whole groups of images) to train/val/test."""

from __future__ import annotations

import random
from collections import Counter

from datasets.errors import DatasetError
from datasets.layouts import SPLITS


def check_ratios(ratios: tuple[float, float, float] | list[float]) -> tuple[float, float, float]:
    """Validate train/val/test percentages: three non-negative numbers summing to 100, train > 0."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or ratios[0] <= 0 or abs(sum(ratios) - 100) > 1e-6:
        raise DatasetError(
            f"--ratios {' '.join(f'{r:g}' for r in ratios)} is invalid: give train, val and test percentages "
            "summing to 100 (for example 70 10 20)"
        )
    return (float(ratios[0]), float(ratios[1]), float(ratios[2]))


def split_sizes(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Train/val/test sizes of ``n`` images; val and test get one at least when n >= 3 and their ratio > 0."""
    val = int(n * ratios[1] / 100 + 0.5)
    test = int(n * ratios[2] / 100 + 0.5)
    if n >= 3:
        val = max(val, 1) if ratios[1] > 0 else 0
        test = max(test, 1) if ratios[2] > 0 else 0
    val = min(val, n)
    test = min(test, n - val)
    return n - val - test, val, test


def assign_stratified(
    files_by_class: dict[str, list[str]], ratios: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """File -> split, per class: the sorted files shuffled by (seed, class), then cut by ``ratios``."""
    out: dict[str, str] = {}
    for cls in sorted(files_by_class):
        files = sorted(files_by_class[cls])
        random.Random(f"cytology-lora-prepare/{seed}/{cls}").shuffle(files)
        n_train, n_val, _ = split_sizes(len(files), ratios)
        for i, f in enumerate(files):
            out[f] = SPLITS[0] if i < n_train else SPLITS[1] if i < n_train + n_val else SPLITS[2]
    return out


def assign_groups(
    groups: dict[str, Counter], ratios: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """Group -> split so that each group lands in one split and each class comes close to ``ratios``.

    Groups go largest first (ties in a seeded random order) to the split where they reduce
    most the squared gap, per class and relative to the class's size, between what the split
    holds and its share of the class.
    """
    totals: Counter = Counter()
    for counts in groups.values():
        totals.update(counts)
    target = {s: {c: totals[c] * r / 100 for c in totals} for s, r in zip(SPLITS, ratios, strict=True)}
    held = {s: Counter() for s in SPLITS}
    order = sorted(groups)
    random.Random(f"cytology-lora-groups/{seed}").shuffle(order)
    order.sort(key=lambda g: -sum(groups[g].values()))  # stable: equal sizes keep the seeded order
    out: dict[str, str] = {}
    for g in order:
        best = min(
            (s for s, r in zip(SPLITS, ratios, strict=True) if r > 0),
            key=lambda s: sum(
                n * (2 * (held[s][c] - target[s][c]) + n) / totals[c] ** 2 for c, n in groups[g].items()
            ),
        )
        held[best].update(groups[g])
        out[g] = best
    return out
