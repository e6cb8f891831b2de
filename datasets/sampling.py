"""Few-shot and percentage sampling, as in the paper, from a sorted listing.

* ``shots = K > 0``: K images per class from train, ``min(K, 4)`` per class from val.
* ``shots = -1``: all of train and val.
* ``shots = 0`` with ``percentage = P``: ``int(n * P / 100)`` images (at least 1) of each class
  of train and of val.
* test is always complete.

Each (seed, split, class) has its own generator, seeded from a string (stable across Python
versions and machines and independent of ``PYTHONHASHSEED``). The class's files are sorted,
shuffled with it, and the first ``k`` kept: the draw depends only on the file list, and a
smaller K is a subset of a larger one for the same seed (nested few-shot sets).
"""

from __future__ import annotations

import random
import sys

from datasets.errors import DatasetError

VAL_SHOTS_MAX = 4


def check_sampling(shots: int, percentage: float | None) -> float | None:
    """Validate the sampling settings; returns the percentage actually used (None unless shots == 0)."""
    if isinstance(shots, bool) or not isinstance(shots, int):
        raise DatasetError(f"--shots must be an integer (got {shots!r})")
    if shots < -1:
        raise DatasetError(
            f"--shots {shots} is invalid: use K > 0 images per class, -1 for all, or 0 with --pourcentage"
        )
    if percentage is not None and float(percentage) == 0 and shots != 0:
        percentage = None  # the paper's scripts pass --pourcentage 0 to mean "not used"
    if shots == 0:
        if percentage is None:
            raise DatasetError(
                "--shots 0 needs --pourcentage P (the percentage of each class to keep, 0 < P <= 100)"
            )
    elif percentage is not None:
        raise DatasetError(f"--pourcentage {percentage:g} is used only with --shots 0 (got --shots {shots})")
    if percentage is not None and not 0 < float(percentage) <= 100:
        raise DatasetError(
            f"--pourcentage {percentage:g} is outside (0, 100]: give the percentage of each class to keep"
        )
    return None if percentage is None else float(percentage)


def quota(n: int, split: str, shots: int, percentage: float | None) -> int | None:
    """How many of a class's ``n`` images to keep in ``split``; None keeps them all."""
    if split == "test" or shots == -1:
        return None
    if shots > 0:
        return shots if split == "train" else min(shots, VAL_SHOTS_MAX)
    assert percentage is not None
    return max(1, int(n * percentage / 100)) if n else 0


def draw(paths: list[str], k: int | None, seed: int, split: str, cls: str) -> list[str]:
    """The first ``k`` of the sorted ``paths`` after a shuffle seeded by (seed, split, class)."""
    order = sorted(paths)
    if k is None or k >= len(order):
        return order
    random.Random(f"cytology-lora/{seed}/{split}/{cls}").shuffle(order)
    return order[:k]


def sample(
    items: list[tuple[str, str]],
    classes: list[str],
    split: str,
    shots: int,
    percentage: float | None,
    seed: int,
) -> list[tuple[str, str]]:
    """Sample one split's (path, class) items per class; warns when a class has fewer than asked."""
    by_class: dict[str, list[str]] = {cls: [] for cls in classes}
    for path, cls in items:
        by_class[cls].append(path)
    kept: list[tuple[str, str]] = []
    for cls in classes:
        paths = by_class[cls]
        k = quota(len(paths), split, shots, percentage)
        if k is not None and len(paths) < k:
            print(
                f"warning: class '{cls}' has {len(paths)} image(s) in {split}, "
                f"fewer than the {k} asked; using all",
                file=sys.stderr,
            )
        kept.extend((p, cls) for p in draw(paths, k, seed, split, cls))
    kept.sort()
    return kept
