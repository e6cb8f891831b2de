"""List a dataset's files and labels per split, without decoding any image.

Every reader returns a :class:`Listing`: for each split, the sorted relative paths of its
images with their class names. File names are sorted here, so nothing downstream depends on
the order in which the filesystem lists a folder.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets.errors import DatasetError
from datasets.layouts import (
    DEFAULT_HICERVIX_LEVEL,
    HICERVIX_LEVELS,
    PAPER_LAYOUTS,
    SPLITS,
    expected_layout,
    how_to_prepare,
    is_image_name,
)

# At level_3 an image without a level_3 label takes its level_2 label, and at level_2 its
# level_1 label (one step, as in the paper for level_3); class_name and level_1 have no fallback.
LEVEL_FALLBACK = {"level_3": "level_2", "level_2": "level_1"}
HICERVIX_REQUIRED = {
    "level_1": ("image_name", "level_1"),
    "level_2": ("image_name", "level_1", "level_2"),
    "level_3": ("image_name", "level_2", "level_3"),
    "class_name": ("image_name", "class_name"),
}
MISSING_LABELS = frozenset({"", "nan", "none", "null"})
SHOW_MISSING = 5


@dataclass
class Listing:
    """All images of a dataset: relative paths (posix) and class names per split."""

    root: Path
    classes: list[str]
    items: dict[str, list[tuple[str, str]]]  # split -> [(relative path, class name)], sorted by path
    left_out: int = 0
    notes: list[str] = field(default_factory=list)


def class_of(name: str) -> str | None:
    """The class encoded in ``<class>_<n>.<ext>``: everything before the last underscore."""
    stem = name.rsplit(".", 1)[0]
    cls, sep, _ = stem.rpartition("_")
    return cls if sep and cls else None


def require_dir(path: Path, dataset: str, what: str) -> None:
    """Fail with the expected layout when a folder the dataset needs is absent."""
    if not path.is_dir():
        raise DatasetError(
            f"{what} {path} not found: {dataset} expects {expected_layout(dataset)}; "
            f"{how_to_prepare(dataset)}"
        )


def list_image_names(folder: Path) -> list[str]:
    """Sorted image file names directly inside ``folder`` (never decodes, never recurses)."""
    with os.scandir(folder) as it:
        names = [e.name for e in it if is_image_name(e.name) and e.is_file()]
    names.sort()
    return names


def read_class_folders(root: Path, dataset: str, classes: tuple[str, ...] | None) -> Listing:
    """Read ``root/<split>/<class>_<n>.<ext>``; infer the classes when ``classes`` is None."""
    require_dir(root, dataset, "dataset root")
    items: dict[str, list[tuple[str, str]]] = {}
    for split in SPLITS:
        folder = root / split
        require_dir(folder, dataset, f"{split} folder")
        names = list_image_names(folder)
        if not names:
            raise DatasetError(
                f"no images in {folder}: {dataset} expects {expected_layout(dataset)}; "
                f"{how_to_prepare(dataset)}"
            )
        items[split] = [(f"{split}/{name}", _checked_class(folder, name, classes)) for name in names]
    found = sorted({cls for split_items in items.values() for _, cls in split_items})
    return Listing(root=root, classes=list(classes) if classes else found, items=items)


def _checked_class(folder: Path, name: str, classes: tuple[str, ...] | None) -> str:
    cls = class_of(name)
    if cls is None:
        raise DatasetError(
            f"cannot tell the class of {folder / name}: image files must be named <class>_<n>.<ext>; "
            "rename or remove it"
        )
    if classes is not None and cls not in classes:
        raise DatasetError(
            f"{folder / name} has class '{cls}', which is not one of {', '.join(classes)}; "
            "rename or remove it"
        )
    return cls


def read_paper_layout(root: Path, dataset: str) -> Listing:
    """Read MLCC, BCFC or SIPaKMeD in the paper's ``<root>/<NAME>/images/<split>/`` layout."""
    layout = PAPER_LAYOUTS[dataset]
    require_dir(root, dataset, "dataset root")
    listing = read_class_folders(layout.images_dir(root), dataset, layout.classes)
    prefix = f"{layout.folder}/images/"
    # Paths stay relative to the root the user gave, so manifests show the whole layout.
    listing.items = {s: [(prefix + rel, cls) for rel, cls in v] for s, v in listing.items.items()}
    listing.root = root
    return listing


def read_hicervix(root: Path, level: str | None) -> Listing:
    """Read ``<root>/<split>.csv`` once per split and label each image at ``level``."""
    level = level or DEFAULT_HICERVIX_LEVEL
    if level not in HICERVIX_LEVELS:
        raise DatasetError(f"unknown HiCervix level '{level}': choose one of {', '.join(HICERVIX_LEVELS)}")
    require_dir(root, "hicervix", "dataset root")
    items: dict[str, list[tuple[str, str]]] = {}
    left_out = 0
    notes: list[str] = []
    for split in SPLITS:
        rows = read_hicervix_csv(root, split, HICERVIX_REQUIRED[level])
        if not rows:
            raise DatasetError(
                f"{root / (split + '.csv')} lists no images; restore the file from the download"
            )
        check_listed_images(root / split, [r["image_name"] for r in rows])
        labelled, dropped, duplicates = _label_rows(rows, level, split)
        left_out += dropped
        if duplicates:
            notes.append(
                f"{root / (split + '.csv')} lists {duplicates} image(s) twice; the first row was used"
            )
        if not labelled:
            raise DatasetError(
                f"no image of {root / (split + '.csv')} has a label at {level}; choose another --level"
            )
        items[split] = sorted(labelled)
    classes = sorted({cls for split_items in items.values() for _, cls in split_items})
    return Listing(root=root, classes=classes, items=items, left_out=left_out, notes=notes)


def read_hicervix_csv(root: Path, split: str, required: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of ``<root>/<split>.csv`` (read once, header names stripped), columns checked."""
    path = root / f"{split}.csv"
    require_dir(root / split, "hicervix", f"{split} folder")
    if not path.is_file():
        raise DatasetError(
            f"{path} not found: hicervix expects {expected_layout('hicervix')}; {how_to_prepare('hicervix')}"
        )
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DatasetError(
                    f"{path} has no column {', '.join(missing)} (columns: {', '.join(header) or 'none'}); "
                    f"HiCervix CSVs need {', '.join(required)}"
                )
            index = {name: header.index(name) for name in required}
            return [
                {k: _cell(row, i) for k, i in index.items()} for row in reader if any(c.strip() for c in row)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read {path}: {err}") from err


def _cell(row: list[str], i: int) -> str:
    return row[i].strip() if i < len(row) else ""


def check_listed_images(folder: Path, names: list[str]) -> None:
    """Fail naming the first few images a CSV lists but ``folder`` lacks."""
    with os.scandir(folder) as it:
        present = {e.name for e in it}
    missing = [n for n in names if n not in present and not ("/" in n and (folder / n).is_file())]
    if missing:
        shown = ", ".join(missing[:SHOW_MISSING]) + (", ..." if len(missing) > SHOW_MISSING else "")
        raise DatasetError(
            f"{len(missing)} image(s) listed in {folder}.csv are missing from {folder}: {shown}; "
            "restore them or fix the CSV"
        )


def hicervix_label(row: dict[str, str], level: str) -> str | None:
    """The label at ``level`` with the one-step fallback; None when there is none."""
    label = row.get(level, "")
    if label.lower() in MISSING_LABELS and level in LEVEL_FALLBACK:
        label = row.get(LEVEL_FALLBACK[level], "")
    return None if label.lower() in MISSING_LABELS else label


def _label_rows(rows: list[dict[str, str]], level: str, split: str) -> tuple[list[tuple[str, str]], int, int]:
    labelled: list[tuple[str, str]] = []
    seen: set[str] = set()
    dropped = duplicates = 0
    for row in rows:
        name = row["image_name"]
        if name in seen:
            duplicates += 1
            continue
        seen.add(name)
        label = hicervix_label(row, level)
        if label is None:
            dropped += 1
        else:
            labelled.append((f"{split}/{name}", label))
    return labelled, dropped, duplicates


def print_notes(listing: Listing) -> None:
    """Warnings found while listing, one line each on stderr."""
    for note in listing.notes:
        print(f"warning: {note}", file=sys.stderr)
