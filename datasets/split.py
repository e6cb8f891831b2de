"""The train/val/test split of one run, its manifest and the manifest's SHA-256."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.io import write_text_atomic
from datasets.base import DEFAULT_PROTOCOL, Listing, ReadRequest
from datasets.errors import DatasetError
from datasets.folds import cross_validation, known_groups
from datasets.labelmap import LabelMap, apply_label_map, check_label_map, parse_label_map
from datasets.layouts import SPLITS
from datasets.leakage import check_leakage
from datasets.readers import print_notes
from datasets.registry import get_dataset, resolve_level, resolve_level_fallback, resolve_protocol
from datasets.sampling import check_sampling, sample_split


@dataclass
class Split:
    """Train, val and test lists of (absolute path, label); ``classes[label]`` names a label.

    A label is an int (-1 for an image-text pair without a class) or, for ``task ==
    "multilabel"``, a tuple of 0/1 ints, one per class.
    """

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
    level_fallback: str | None = None  # HiCervix: "original", "none" or "parent"; None for other datasets
    protocol: str = DEFAULT_PROTOCOL
    label_map: LabelMap | None = None
    task: str = "single_label"  # "single_label", "multilabel" or "captions"
    captions: dict[str, str] = field(default_factory=dict)  # absolute path -> caption
    groups: dict[str, str] = field(default_factory=dict)  # absolute path -> group, where the data has groups
    cv: int | None = None  # cross-validation: K folds of train + val, fold `fold` as val
    fold: int | None = None
    # --compat seed: classes smaller than their quota drawn with replacement, so a path may be listed twice
    # in train or val (every list and count here keeps the repeats; the manifest lists them as drawn)
    replacement: bool = False

    def items(self, split: str) -> list[tuple[str, int]]:
        """The (path, label) list of ``split`` ("train", "val" or "test")."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split '{split}': choose one of {', '.join(SPLITS)}")
        return getattr(self, split)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split (multi-label: positives per class), classes in label order."""
        out = {}
        for split in SPLITS:
            per_label = [0] * len(self.classes)
            for _, label in self.items(split):
                if self.task == "multilabel":
                    per_label = [n + v for n, v in zip(per_label, label, strict=True)]
                elif label >= 0:
                    per_label[label] += 1
            out[split] = dict(zip(self.classes, per_label, strict=True))
        return out

    def sizes(self) -> dict[str, int]:
        """Images in each split."""
        return {split: len(self.items(split)) for split in SPLITS}

    def relative(self, path: str) -> str:
        """A path of this split relative to its root, with '/' separators."""
        prefix = self.root.rstrip(os.sep) + os.sep
        rel = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, self.root)
        return rel.replace(os.sep, "/")

    def manifest(self) -> dict:
        """Classes, per split [relative path, label] pairs, and the labelling options: what the SHA-256 covers.

        Options at their defaults are left out, so that splits made before they existed keep their hash.
        """
        doc: dict = {"classes": list(self.classes)}
        for split in SPLITS:
            doc[split] = [[self.relative(p), _plain_label(label)] for p, label in self.items(split)]
        if self.level_fallback is not None:
            doc["level_fallback"] = self.level_fallback
        if self.level_fallback is not None or self.protocol != DEFAULT_PROTOCOL:
            doc["protocol"] = self.protocol
        if self.label_map:
            doc["label_map"] = {new: list(olds) for new, olds in self.label_map.items()}
        if self.task != "single_label":
            doc["task"] = self.task
        if self.cv is not None:
            doc["cv"], doc["fold"] = self.cv, self.fold
        if self.captions:
            doc["captions"] = {self.relative(p): c for p, c in sorted(self.captions.items())}
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
            level_fallback=self.level_fallback,
            protocol=self.protocol,
            label_map=self.label_map,
            task=self.task,
            shots=self.shots,
            percentage=self.percentage,
            seed=self.seed,
            left_out=self.left_out,
            split_sha256=self.sha256,
        )
        if self.replacement:
            doc["replacement"] = True
        write_text_atomic(path, json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False) + "\n")


def _plain_label(label):
    return list(label) if isinstance(label, tuple) else label


def _label_map(label_map: LabelMap | str | os.PathLike | None) -> LabelMap | None:
    if label_map is None or label_map == {} or label_map == "":
        return None
    return check_label_map(label_map) if isinstance(label_map, dict) else parse_label_map(label_map)


def list_dataset(
    root_path: str | os.PathLike | None,
    dataset: str,
    level: str | None = None,
    *,
    level_fallback: str | None = None,
    protocol: str | None = None,
    label_map: LabelMap | str | None = None,
) -> Listing:
    """Every image of ``dataset`` with its label, per split, before any sampling (after ``label_map``)."""
    return _read(root_path, read_request(dataset, level, level_fallback, protocol), _label_map(label_map))


def read_request(dataset: str, level: str | None, level_fallback: str | None, protocol: str | None,
                 settings: dict | None = None) -> ReadRequest:
    """The reader's request with the level and options checked against the registry entry, and the dataset's
    settings dataclass built from them and ``settings`` (its other fields by name; None values are not given)."""
    level = resolve_level(dataset, level)
    level_fallback = resolve_level_fallback(dataset, level_fallback)
    protocol = resolve_protocol(dataset, protocol)
    info = get_dataset(dataset)
    given = {"level": level, "level_fallback": level_fallback, "protocol": protocol}
    names = {f.name for f in info.setting_fields()}
    resolved = info.resolve({**{k: v for k, v in given.items() if k in names}, **(settings or {})})
    return ReadRequest(dataset=dataset, level=level, level_fallback=level_fallback, protocol=protocol,
                       settings=resolved)


def _read(root_path: str | os.PathLike | None, request: ReadRequest, mapping: LabelMap | None) -> Listing:
    info = get_dataset(request.dataset)
    if not info.needs_root:
        listing = info.reader(None, request)
    elif not root_path:
        raise DatasetError(f"--root_path is required for {info.name}: give the folder that holds {info.layout}")
    else:
        listing = info.reader(Path(os.path.abspath(os.path.expanduser(os.fspath(root_path)))), request)
    return apply_label_map(listing, mapping, info.name) if mapping else listing


def load_split(
    root_path: str | os.PathLike | None,
    dataset: str,
    shots: int = 16,
    seed: int = 1,
    level: str | None = None,
    percentage: float | None = None,
    *,
    level_fallback: str | None = None,
    protocol: str | None = None,
    label_map: LabelMap | str | None = None,
    cv: int | None = None,
    fold: int | None = None,
    replacement: bool = False,
    settings: dict | None = None,
) -> Split:
    """The split of one run: a pure function of the files, dataset, labelling options, shots, percentage and seed.

    ``root_path`` may be None or "" only for "demo", which always lives in its cache folder
    (see :func:`datasets.demo.demo_root`). ``level``, ``level_fallback`` and ``protocol`` are settings of
    the datasets that take them (hicervix; see :mod:`datasets.hicervix`); None takes the dataset's default.
    ``label_map`` merges classes before sampling: ``{new: [old, ...]}``, or the text :func:`parse_label_map` reads.
    ``cv`` and ``fold`` replace train and val by K cross-validation folds of their union
    (:mod:`datasets.folds`), before sampling; test is untouched. ``replacement`` (``--compat seed``) draws a
    single-label class with fewer images than its few-shot quota with replacement, as the original code does.
    ``settings`` gives the dataset's other settings by name (a key it does not take is refused).
    """
    percentage = check_sampling(shots, percentage)
    request = read_request(dataset, level, level_fallback, protocol, settings)
    mapping = _label_map(label_map)
    listing = _read(root_path, request, mapping)
    if cv is not None:
        if not get_dataset(dataset).generic:
            raise DatasetError(f"--cv applies to folder and csv data, which have no fixed validation split; "
                               f"{dataset} has its own")
        groups = known_groups(Path(listing.root), listing.groups)
        listing.items = cross_validation(listing.items, groups, cv, 0 if fold is None else fold, seed)
    print_notes(listing)
    root = str(listing.root)
    label_of = _labeller(listing)
    lists, paths = {}, {}
    for split in SPLITS:
        kept = sample_split(listing.items[split], listing.classes, listing.task, split, shots, percentage, seed,
                            replacement)
        paths.update((rel, os.path.join(root, rel)) for rel, _ in kept)
        lists[split] = [(paths[rel], label_of(label)) for rel, label in kept]
    for note in check_leakage({split: [path for path, _ in items] for split, items in lists.items()}):
        print(f"warning: {note}", file=sys.stderr)
    return Split(
        dataset=dataset,
        root=root,
        level=request.level,
        shots=shots,
        percentage=percentage,
        seed=int(seed),
        classes=list(listing.classes),
        train=lists["train"],
        val=lists["val"],
        test=lists["test"],
        left_out=listing.left_out,
        level_fallback=request.level_fallback,
        protocol=request.protocol,
        label_map=mapping,
        task=listing.task,
        captions={paths[rel]: text for rel, text in listing.captions.items() if rel in paths},
        groups={paths[rel]: group for rel, group in listing.groups.items() if rel in paths},
        cv=cv,
        fold=None if cv is None else (fold or 0),
        replacement=replacement,
    )


def _labeller(listing: Listing):
    """Listing label -> Split label: the class index (-1 for none), or the 0/1 tuple of multi-label data."""
    if listing.task == "multilabel":
        return tuple
    index = {cls: i for i, cls in enumerate(listing.classes)}
    return lambda label: -1 if label is None else index[label]
