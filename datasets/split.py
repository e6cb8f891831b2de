"""The train/val/test split of one run, its manifest and the manifest's SHA-256."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from common.io import write_text_atomic
from datasets.errors import DatasetError
from datasets.layouts import DATASET_NAMES, DEFAULT_HICERVIX_LEVEL, PAPER_LAYOUTS, SPLITS, expected_layout
from datasets.readers import (
    Listing,
    print_notes,
    read_class_folders,
    read_hicervix,
    read_paper_layout,
)
from datasets.sampling import check_sampling, sample


@dataclass
class Split:
    """Train, val and test lists of (absolute path, label); ``classes[label]`` names a label."""

    dataset: str
    root: str
    level: str | None
    shots: int
    percentage: float | None
    seed: int
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    left_out: int = 0

    def items(self, split: str) -> list[tuple[str, int]]:
        """The (path, label) list of ``split`` ("train", "val" or "test")."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split '{split}': choose one of {', '.join(SPLITS)}")
        return getattr(self, split)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split, classes in label order."""
        out = {}
        for split in SPLITS:
            per_label = [0] * len(self.classes)
            for _, label in self.items(split):
                per_label[label] += 1
            out[split] = dict(zip(self.classes, per_label, strict=True))
        return out

    def relative(self, path: str) -> str:
        """A path of this split relative to its root, with '/' separators."""
        prefix = self.root.rstrip(os.sep) + os.sep
        rel = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, self.root)
        return rel.replace(os.sep, "/")

    def manifest(self) -> dict:
        """Classes and, per split, [relative path, label] pairs: what the SHA-256 covers."""
        doc: dict = {"classes": list(self.classes)}
        for split in SPLITS:
            doc[split] = [[self.relative(p), label] for p, label in self.items(split)]
        return doc

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`manifest` (sorted keys, no spaces, ASCII)."""
        text = json.dumps(self.manifest(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    def write_manifest(self, path: str | os.PathLike) -> None:
        """Write the manifest with the settings that made it and its SHA-256, atomically."""
        doc = self.manifest()
        doc.update(
            dataset=self.dataset,
            level=self.level,
            shots=self.shots,
            percentage=self.percentage,
            seed=self.seed,
            left_out=self.left_out,
            split_sha256=self.sha256,
        )
        write_text_atomic(path, json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False) + "\n")


def list_dataset(root_path: str | os.PathLike | None, dataset: str, level: str | None = None) -> Listing:
    """Every image of ``dataset`` with its class, per split, before any sampling."""
    if dataset not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset '{dataset}': choose one of {', '.join(DATASET_NAMES)}")
    if dataset == "demo":
        from datasets.demo import demo_root

        return read_class_folders(demo_root(), "demo", None)
    if not root_path:
        raise DatasetError(
            f"--root_path is required for {dataset}: give the folder that holds {expected_layout(dataset)}"
        )
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(root_path))))
    if dataset in PAPER_LAYOUTS:
        return read_paper_layout(root, dataset)
    if dataset == "hicervix":
        return read_hicervix(root, level)
    return read_class_folders(root, "folder", None)


def load_split(
    root_path: str | os.PathLike | None,
    dataset: str,
    shots: int = 16,
    seed: int = 1,
    level: str | None = None,
    percentage: float | None = None,
) -> Split:
    """The split of one run: a pure function of the files, dataset, level, shots, percentage and seed.

    ``root_path`` may be None or "" only for "demo", which always lives in its cache folder
    (see :func:`datasets.demo.demo_root`). ``level`` applies to hicervix only (default level_3).
    """
    percentage = check_sampling(shots, percentage)
    level = (level or DEFAULT_HICERVIX_LEVEL) if dataset == "hicervix" else None
    listing = list_dataset(root_path, dataset, level)
    print_notes(listing)
    index = {cls: i for i, cls in enumerate(listing.classes)}
    root = str(listing.root)
    lists = {}
    for split in SPLITS:
        kept = sample(listing.items[split], listing.classes, split, shots, percentage, seed)
        lists[split] = [(os.path.join(root, rel), index[cls]) for rel, cls in kept]
    return Split(
        dataset=dataset,
        root=root,
        level=level,
        shots=shots,
        percentage=percentage,
        seed=int(seed),
        classes=list(listing.classes),
        train=lists["train"],
        val=lists["val"],
        test=lists["test"],
        left_out=listing.left_out,
    )
