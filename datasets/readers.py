"""List a dataset's files and labels per split, without decoding any image.

Every reader returns a :class:`Listing`: for each split, the sorted relative paths of its
images with their labels. File names are sorted here, so nothing downstream depends on
the order in which the filesystem lists a folder. Readers are called as
``reader(root, request)`` (see :class:`datasets.registry.ReadRequest`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets.errors import DatasetError
from datasets.layouts import PAPER_LAYOUTS, SPLITS, expected_layout, how_to_prepare, is_image_name
from datasets.registry import ReadRequest


@dataclass
class Listing:
    """All images of a dataset: relative paths (posix) and labels per split.

    A label is a class name ("single_label"), a tuple of 0/1 ints, one per class ("multilabel"),
    or a class name or None ("captions", with the caption of each path in ``captions``).
    """

    root: Path
    classes: list[str]
    items: dict[str, list[tuple[str, object]]]  # split -> [(relative path, label)], sorted by path
    left_out: int = 0
    notes: list[str] = field(default_factory=list)
    task: str = "single_label"
    captions: dict[str, str] = field(default_factory=dict)  # relative path -> caption
    groups: dict[str, str] = field(default_factory=dict)  # relative path -> group (patient, slide, ...)


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


def require_file(path: Path, dataset: str) -> None:
    """Fail with the expected layout when a file the dataset needs is absent."""
    if not path.is_file():
        raise DatasetError(
            f"{path} not found: {dataset} expects {expected_layout(dataset)}; {how_to_prepare(dataset)}"
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


def read_folder(root: Path, request: ReadRequest) -> Listing:
    """The generic ``folder`` dataset: classes inferred from the file names."""
    return read_class_folders(root, request.dataset, None)


def read_demo(root: Path | None, request: ReadRequest) -> Listing:
    """The synthetic demo dataset, generated in its cache folder on first use (``root`` is ignored)."""
    from datasets.demo import demo_root

    return read_class_folders(demo_root(), request.dataset, None)


def read_demo_captions(root: Path | None, request: ReadRequest) -> Listing:
    """The synthetic image-caption dataset, generated in its cache folder on first use (``root`` is ignored)."""
    from datasets.demo import demo_captions_root
    from datasets.tabular import read_csv_dataset

    return read_csv_dataset(demo_captions_root(), request)


def read_paper(root: Path, request: ReadRequest) -> Listing:
    """MLCC, BCFC or SIPaKMeD, by the request's dataset name."""
    return read_paper_layout(root, request.dataset)


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


def print_notes(listing: Listing) -> None:
    """Warnings found while listing, one line each on stderr."""
    for note in listing.notes:
        print(f"warning: {note}", file=sys.stderr)
