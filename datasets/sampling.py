"""Few-shot and percentage sampling, as in the paper, from a sorted listing.

* ``shots = K > 0``: K images per class from train, ``min(K, 4)`` per class from val.
* ``shots = -1``: all of train and val.
* ``shots = 0`` with ``percentage = P``: ``int(n * P / 100)`` images (at least 1) of each class
  of train and of val.
* test is always complete.

Multi-label data (a tuple of 0/1 per class): ``shots = K`` walks the classes in order and, for
each, adds images among its positives, in its own seeded order, until the chosen images hold K
of its positives (an image counts for every class it is positive for); val asks ``min(K, 4)``.
``percentage = P`` keeps ``int(n * P / 100)`` images (at least 1) of the split, seeded. Image-text
pairs without a class are one pool: K images of train, ``min(K, 4)`` of val, or P percent.

Each (seed, split, class) has its own generator, seeded from a string (stable across Python
versions and machines and independent of ``PYTHONHASHSEED``). The class's files are sorted,
shuffled with it, and the first ``k`` kept: the draw depends only on the file list, and a
smaller K is a subset of a larger one for the same seed (nested few-shot sets).

A class with fewer images than its quota keeps the images it has, unless ``replacement`` (``--compat
seed``, single-label data): then, as the original code does (``random.choices``), its ``k`` images are
drawn with replacement from its sorted files, with a generator of its own seeded from (seed, split,
class), so the split lists some paths more than once. Classes with enough images are drawn as above.
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


def shuffled(paths: list[str], seed: int, split: str, cls: str) -> list[str]:
    """The sorted ``paths`` shuffled by a generator seeded from (seed, split, class)."""
    order = sorted(paths)
    random.Random(f"cytology-lora/{seed}/{split}/{cls}").shuffle(order)
    return order


def draw(paths: list[str], k: int | None, seed: int, split: str, cls: str, replacement: bool = False
         ) -> list[str]:
    """The first ``k`` of the sorted ``paths`` after a shuffle seeded by (seed, split, class); with
    ``replacement`` and fewer than ``k`` paths, ``k`` of them drawn with replacement (sorted)."""
    if replacement and k is not None and 0 < len(paths) < k:
        rng = random.Random(f"cytology-lora/{seed}/{split}/{cls}/with-replacement")
        return sorted(rng.choices(sorted(paths), k=k))
    if k is None or k >= len(paths):
        return sorted(paths)
    return shuffled(paths, seed, split, cls)[:k]


def sample_split(
    items: list[tuple[str, object]],
    classes: list[str],
    task: str,
    split: str,
    shots: int,
    percentage: float | None,
    seed: int,
    replacement: bool = False,
) -> list[tuple[str, object]]:
    """Sample one split of any task (see the module docstring); returned sorted by path.

    ``replacement`` (single-label data only) draws a class smaller than its quota with replacement.
    """
    if task == "multilabel":
        return sample_multilabel(items, classes, split, shots, percentage, seed)
    if items and all(label is None for _, label in items):
        k = quota(len(items), split, shots, percentage)
        _warn_if_short("images", len(items), k, split)
        return sorted((p, None) for p in draw([p for p, _ in items], k, seed, split, "*all*"))
    return sample(items, classes, split, shots, percentage, seed, replacement)


def _warn_if_short(what: str, n: int, k: int | None, split: str, replacement: bool = False) -> None:
    if k is not None and n < k:
        using = "drawing them with replacement (--compat seed)" if replacement and n else "using all"
        print(f"warning: {what} has {n} image(s) in {split}, fewer than the {k} asked; {using}", file=sys.stderr)


def sample_multilabel(
    items: list[tuple[str, tuple[int, ...]]],
    classes: list[str],
    split: str,
    shots: int,
    percentage: float | None,
    seed: int,
) -> list[tuple[str, tuple[int, ...]]]:
    """Multi-label sampling: K positives per class (greedy, in class order) or P percent of the images.

    Images negative for every class enter only with ``shots = -1``, a percentage, or in test.
    """
    labels = dict(items)
    if split == "test" or shots == -1:
        return sorted(items)
    if shots == 0:
        k = quota(len(items), split, shots, percentage)
        return sorted((p, labels[p]) for p in draw(list(labels), k, seed, split, "*all*"))
    chosen: set[str] = set()
    for c, cls in enumerate(classes):
        positives = [p for p, label in items if label[c]]
        k = quota(len(positives), split, shots, percentage)
        _warn_if_short(f"class '{cls}'", len(positives), k, split)
        have = sum(1 for p in positives if p in chosen)
        for p in shuffled(positives, seed, split, cls):
            if have >= k:
                break
            if p not in chosen:
                chosen.add(p)
                have += 1
    return sorted((p, labels[p]) for p in chosen)


def sample(
    items: list[tuple[str, str]],
    classes: list[str],
    split: str,
    shots: int,
    percentage: float | None,
    seed: int,
    replacement: bool = False,
) -> list[tuple[str, str]]:
    """Sample one split's (path, class) items per class; warns when a class has fewer than asked (which
    ``replacement`` fills up by drawing with replacement)."""
    by_class: dict[str, list[str]] = {cls: [] for cls in classes}
    for path, cls in items:
        by_class[cls].append(path)
    kept: list[tuple[str, str]] = []
    for cls in classes:
        paths = by_class[cls]
        k = quota(len(paths), split, shots, percentage)
        _warn_if_short(f"class '{cls}'", len(paths), k, split, replacement)
        kept.extend((p, cls) for p in draw(paths, k, seed, split, cls, replacement))
    kept.sort()
    return kept
