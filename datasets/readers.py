"""Reading helpers shared by the dataset kinds: list a folder's images and read ``<split>/<class>_<n>.<ext>``.

Nothing here decodes an image. File names are sorted here, so nothing downstream depends on the order in
which the filesystem lists a folder. Readers are called as ``reader(root, request)`` (see
:class:`datasets.base.ReadRequest`) and return a :class:`datasets.base.Listing`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from datasets.base import Listing
from datasets.errors import DatasetError
from datasets.layouts import SPLITS, is_image_name
from datasets.registry import get_dataset


def class_of(name: str) -> str | None:
    """The class encoded in ``<class>_<n>.<ext>``: everything before the last underscore."""
    stem = name.rsplit(".", 1)[0]
    cls, sep, _ = stem.rpartition("_")
    return cls if sep and cls else None


def expected_layout(dataset: str) -> str:
    """One phrase describing the on-disk layout a dataset needs (from the registry)."""
    return get_dataset(dataset).layout


def how_to_prepare(dataset: str) -> str:
    """What to do to build a dataset's layout (from the registry)."""
    return get_dataset(dataset).how_to_prepare


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


def images_below(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, hidden entries skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if is_image_name(f))
    return sorted(found)


def read_class_folders(root: Path, dataset: str, classes: tuple[str, ...] | None) -> Listing:
    """Read ``root/<split>/<class>_<n>.<ext>``; infer the classes when ``classes`` is None."""
    require_dir(root, dataset, "dataset root")
    items: dict[str, list[tuple[str, object]]] = {}
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


@dataclass(frozen=True)
class FolderLayout:
    """A dataset stored as ``<root>/<folder>/images/<split>/<class>_<n>.<ext>`` (the paper's layout)."""

    folder: str
    ext: str
    classes: tuple[str, ...]  # in label order

    def images_dir(self, root: Path) -> Path:
        """The folder that holds the three split folders."""
        return root / self.folder / "images"

    def text(self) -> str:
        """The layout phrase shown in errors and help."""
        return f"<root>/{self.folder}/images/{{train,val,test}}/<class>_<n>{self.ext}"

    def read(self, root: Path, dataset: str) -> Listing:
        """Read the layout, with paths kept relative to ``root`` (so manifests show the whole layout)."""
        require_dir(root, dataset, "dataset root")
        listing = read_class_folders(self.images_dir(root), dataset, self.classes)
        prefix = f"{self.folder}/images/"
        listing.items = {s: [(prefix + rel, cls) for rel, cls in v] for s, v in listing.items.items()}
        listing.root = root
        return listing


def print_notes(listing: Listing) -> None:
    """Warnings found while listing, one line each on stderr."""
    for note in listing.notes:
        print(f"warning: {note}", file=sys.stderr)
