"""HiCervix: ``<root>/<split>.csv`` lists each image of ``<root>/<split>/`` with three label levels.

Labels at a level, as the original code (mdausort/Cytology-fine-tuning) reads them, with
``level_fallback``:

* ``original`` (default): at level_3 an image without a level_3 label takes its level_2 label;
  level_2, level_1 and class_name have no fallback (images without a label there are left out);
* ``parent``: level_3 falls back to level_2 and level_2 to level_1 (one step each);
* ``none``: no fallback at any level.

``protocol="official"`` is HiCervix's own benchmark: level_3 on 23 classes, leaving out the cells
whose level-3 label (after the fallback) is AGC, AGC-NOS or ADC. It changes nothing at other levels.
Images left out are counted in ``Listing.left_out``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from datasets.errors import DatasetError
from datasets.layouts import SPLITS
from datasets.readers import Listing, require_dir, require_file
from datasets.registry import ReadRequest

FALLBACKS = {
    "original": {"level_3": "level_2"},
    "parent": {"level_3": "level_2", "level_2": "level_1"},
    "none": {},
}
REQUIRED = {
    "level_1": ("image_name", "level_1"),
    "level_2": ("image_name", "level_1", "level_2"),
    "level_3": ("image_name", "level_2", "level_3"),
    "class_name": ("image_name", "class_name"),
}
TREE_COLUMNS = ("image_name", "level_1", "level_2", "level_3")
OFFICIAL_EXCLUDED = frozenset({"AGC", "AGC-NOS", "ADC"})
MISSING_LABELS = frozenset({"", "nan", "none", "null"})
SHOW_MISSING = 5


def read_hicervix(root: Path, request: ReadRequest) -> Listing:
    """Read ``<root>/<split>.csv`` once per split and label each image at ``request.level``."""
    level, fallback = request.level, request.level_fallback or "original"
    require_dir(root, "hicervix", "dataset root")
    items: dict[str, list[tuple[str, str]]] = {}
    left_out = 0
    notes: list[str] = []
    for split in SPLITS:
        rows = read_hicervix_csv(root, split, REQUIRED[level])
        if not rows:
            raise DatasetError(f"{root / (split + '.csv')} lists no images; restore the file from the download")
        check_listed_images(root / split, [r["image_name"] for r in rows])
        rows, duplicates = _first_rows(rows)
        if duplicates:
            notes.append(f"{root / (split + '.csv')} lists {duplicates} image(s) twice; the first row was used")
        labels = [(f"{split}/{r['image_name']}", protocol_label(r, level, fallback, request.protocol)) for r in rows]
        labelled = sorted((path, label) for path, label in labels if label is not None)
        left_out += len(labels) - len(labelled)
        if not labelled:
            raise DatasetError(f"no image of {root / (split + '.csv')} has a label at {level}; choose another --level")
        items[split] = labelled
    classes = sorted({cls for split_items in items.values() for _, cls in split_items})
    return Listing(root=root, classes=classes, items=items, left_out=left_out, notes=notes)


def read_hicervix_csv(root: Path, split: str, required: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of ``<root>/<split>.csv`` (read once, header names stripped), columns checked."""
    path = root / f"{split}.csv"
    require_dir(root / split, "hicervix", f"{split} folder")
    require_file(path, "hicervix")
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
            return [{k: _cell(row, i) for k, i in index.items()} for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read {path}: {err}") from err


def _cell(row: list[str], i: int) -> str:
    return row[i].strip() if i < len(row) else ""


def _first_rows(rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """The first row of each image name, and how many repeated rows were dropped."""
    seen: dict[str, dict[str, str]] = {}
    for row in rows:
        seen.setdefault(row["image_name"], row)
    return list(seen.values()), len(rows) - len(seen)


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


def _present(label: str | None) -> str | None:
    return None if label is None or label.lower() in MISSING_LABELS else label


def hicervix_label(row: dict[str, str], level: str, fallback: str = "original") -> str | None:
    """The label at ``level`` after the ``fallback`` rule; None when there is none."""
    label = _present(row.get(level, ""))
    parent = FALLBACKS[fallback].get(level)
    if label is None and parent:
        label = _present(row.get(parent, ""))
    return label


def protocol_label(row: dict[str, str], level: str, fallback: str, protocol: str) -> str | None:
    """:func:`hicervix_label`, None too for the classes the ``protocol`` leaves out at ``level``."""
    label = hicervix_label(row, level, fallback)
    if protocol == "official" and level == "level_3" and label in OFFICIAL_EXCLUDED:
        return None
    return label


def hicervix_tree(root: str | os.PathLike, level_fallback: str = "original") -> dict[str, tuple[str, str]]:
    """Each level-3 label (after ``level_fallback``) -> its (level_1, level_2) ancestors, from the three CSVs.

    An ancestor missing from the CSV repeats the label below it (a level_2 label used as a
    level-3 leaf is its own level-2 ancestor). DatasetError when a label has two parents.
    """
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    tree: dict[str, tuple[str, str]] = {}
    where: dict[str, str] = {}
    for split in SPLITS:
        for row in read_hicervix_csv(root, split, TREE_COLUMNS):
            leaf = hicervix_label(row, "level_3", level_fallback)
            if leaf is None:
                continue
            level_2 = _present(row["level_2"]) or leaf
            level_1 = _present(row["level_1"]) or level_2
            known = tree.setdefault(leaf, (level_1, level_2))
            where.setdefault(leaf, f"{split}.csv")
            if known != (level_1, level_2):
                raise DatasetError(
                    f"HiCervix label '{leaf}' has two sets of ancestors ({' > '.join(known)} in {where[leaf]}, "
                    f"{level_1} > {level_2} in {split}.csv); fix the CSV"
                )
    return dict(sorted(tree.items()))


def hierarchical_distance(tree: dict[str, tuple[str, str]], a: str, b: str) -> int:
    """How far apart two level-3 labels lie in ``tree`` (from :func:`hicervix_tree`).

    The number of levels one must go up from the leaves until both ancestors agree: 0 when
    ``a == b``, 1 when they share their level-2 ancestor, 2 when they share only their level-1
    ancestor, 3 otherwise. DatasetError for a label that is not in the tree.
    """
    chains = []
    for label in (a, b):
        if label not in tree:
            raise DatasetError(f"'{label}' is not a level-3 HiCervix label ({len(tree)} labels in the tree)")
        level_1, level_2 = tree[label]
        chains.append((label, level_2, level_1))
    return next((up for up in range(3) if chains[0][up] == chains[1][up]), 3)
