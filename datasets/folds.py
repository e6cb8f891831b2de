"""Cross-validation folds for datasets without a fixed validation split (folder and csv data).

``--cv K --fold i`` pools train and val, cuts the pool into K folds (stratified by class,
grouped when groups are known: a csv ``group`` column, or the ``group`` column of the
``sources.csv`` that ``prepare folder`` writes), and uses fold i as validation and the other
folds as train. The test split is never touched. Folds depend only on the files, their labels
and groups, K and the seed, never on the order files are listed in.
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from pathlib import Path

from datasets.errors import DatasetError
from datasets.layouts import SOURCES_FILE


def known_groups(root: Path, listed: dict[str, str]) -> dict[str, str]:
    """Groups of relative paths: the listing's own, else those of a prepared folder's sources.csv."""
    if listed:
        return dict(listed)
    path = root / SOURCES_FILE
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {r["file"]: r["group"] for r in rows if r.get("file") and r.get("group")}


def _stratum(label: object) -> str:
    """The class a fold is balanced on: the label, or a multi-label image's first positive label."""
    if isinstance(label, tuple):
        return str(next((i for i, v in enumerate(label) if v), -1))
    return str(label)


def assign_folds(items: list[tuple[str, object]], groups: dict[str, str], k: int, seed: int) -> dict[str, int]:
    """Relative path -> fold in [0, k): whole groups per fold, each class spread as evenly as groups allow."""
    units: dict[str, list[tuple[str, object]]] = {}
    for rel, label in sorted(items):
        units.setdefault(groups.get(rel, f"file:{rel}"), []).append((rel, label))
    if len(units) < k:
        raise DatasetError(f"--cv {k} needs at least {k} images (or groups) in train and val; there are {len(units)}")
    counts = {u: Counter(_stratum(label) for _, label in members) for u, members in units.items()}
    order = sorted(units)
    random.Random(f"cytology-lora-cv/{seed}").shuffle(order)
    order.sort(key=lambda u: -sum(counts[u].values()))  # big groups first; equal sizes keep the seeded order
    held = [Counter() for _ in range(k)]
    sizes = [0] * k
    fold_of: dict[str, int] = {}
    for u in order:
        best = min(range(k), key=lambda f: (sum(held[f][c] * n for c, n in counts[u].items()), sizes[f], f))
        held[best].update(counts[u])
        sizes[best] += sum(counts[u].values())
        for rel, _ in units[u]:
            fold_of[rel] = best
    return fold_of


def cross_validation(items: dict[str, list], groups: dict[str, str], k: int, fold: int, seed: int
                     ) -> dict[str, list]:
    """Train and val replaced by the folds of their union (fold `fold` is val); test as it was."""
    if k < 2:
        raise DatasetError(f"--cv {k}: give at least 2 folds")
    if not 0 <= fold < k:
        raise DatasetError(f"--fold {fold} is outside 0..{k - 1} for --cv {k}")
    pool = list(items["train"]) + list(items["val"])
    fold_of = assign_folds(pool, groups, k, seed)
    return {"train": sorted(i for i in pool if fold_of[i[0]] != fold),
            "val": sorted(i for i in pool if fold_of[i[0]] == fold), "test": list(items["test"])}
