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

The three options are HiCervix's settings (:class:`HicervixSettings`): ``--level``, ``--level_fallback``
and ``--protocol``. ``python -m datasets prepare hicervix --src ROOT`` checks a download in place (it
comes split by its authors) and counts its images per label at each level.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from datasets.base import DEFAULT_PROTOCOL, Listing, PrepareRequest, ReadRequest
from datasets.errors import DatasetError
from datasets.layouts import SPLITS
from datasets.prepare import refuse_options, source_dir
from datasets.readers import require_dir, require_file
from datasets.registry import CELL_PROMPT, DatasetInfo, register

LEVELS = ("level_1", "level_2", "level_3", "class_name")
HICERVIX_LEVELS = LEVELS  # the name the package exports
DEFAULT_LEVEL = "level_3"
ORIGINAL_FALLBACK = "original"  # the original code's rule, and the default
FALLBACKS = {
    ORIGINAL_FALLBACK: {"level_3": "level_2"},
    "parent": {"level_3": "level_2", "level_2": "level_1"},
    "none": {},
}
LEVEL_FALLBACKS = tuple(FALLBACKS)
OFFICIAL_PROTOCOL = "official"
PROTOCOLS = (DEFAULT_PROTOCOL, OFFICIAL_PROTOCOL)
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


@dataclass(frozen=True)
class HicervixSettings:
    """HiCervix's options: the label level, what an image without a label there takes, and the protocol."""

    level: str = field(default=DEFAULT_LEVEL, metadata={
        "help": f"label level: {', '.join(LEVELS)} (default {DEFAULT_LEVEL})", "choices": LEVELS})
    level_fallback: str = field(default=ORIGINAL_FALLBACK, metadata={
        "help": "images without a label at --level: original (level_3 takes level_2), parent (one level up at "
                "level_3 and level_2), none", "choices": LEVEL_FALLBACKS})
    protocol: str = field(default=DEFAULT_PROTOCOL, metadata={
        "help": "paper, or official (HiCervix's benchmark: level_3 without AGC, AGC-NOS and ADC)",
        "choices": PROTOCOLS})

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise DatasetError(f"unknown hicervix level '{self.level}': choose one of {', '.join(LEVELS)}")
        if self.level_fallback not in LEVEL_FALLBACKS:
            raise DatasetError(f"unknown --level_fallback '{self.level_fallback}': "
                               f"choose one of {', '.join(LEVEL_FALLBACKS)}")
        if self.protocol not in PROTOCOLS:
            raise DatasetError(f"unknown --protocol '{self.protocol}' for hicervix: "
                               f"choose one of {', '.join(PROTOCOLS)}")


def read_hicervix(root: Path, request: ReadRequest) -> Listing:
    """Read ``<root>/<split>.csv`` once per split and label each image at ``request.level``."""
    level, fallback = request.level or DEFAULT_LEVEL, request.level_fallback or ORIGINAL_FALLBACK
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


def hicervix_label(row: dict[str, str], level: str, fallback: str = ORIGINAL_FALLBACK) -> str | None:
    """The label at ``level`` after the ``fallback`` rule; None when there is none."""
    label = _present(row.get(level, ""))
    parent = FALLBACKS[fallback].get(level)
    if label is None and parent:
        label = _present(row.get(parent, ""))
    return label


def protocol_label(row: dict[str, str], level: str, fallback: str, protocol: str) -> str | None:
    """:func:`hicervix_label`, None too for the classes the ``protocol`` leaves out at ``level``."""
    label = hicervix_label(row, level, fallback)
    if protocol == OFFICIAL_PROTOCOL and level == "level_3" and label in OFFICIAL_EXCLUDED:
        return None
    return label


def hicervix_tree(root: str | os.PathLike, level_fallback: str = ORIGINAL_FALLBACK) -> dict[str, tuple[str, str]]:
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


def run_check_hicervix(request: PrepareRequest) -> dict:
    """Already split by its authors: the download is checked in place (CSV columns, every listed image)."""
    refuse_options("hicervix", request, needs_dst=False)
    return check_hicervix(request.src)


def check_hicervix(src: Path) -> dict:
    """Check a HiCervix download in place and count its images per label at each level."""
    src = source_dir(src)
    require_dir(src, "hicervix", "dataset root")
    counts: dict[str, dict[str, dict[str, int]]] = {}
    left_out: dict[str, int] = {}
    images: dict[str, int] = {}
    with_names = all(_has_class_name(src, s) for s in SPLITS if (src / f"{s}.csv").is_file())
    levels = [lv for lv in LEVELS if lv != "class_name" or with_names]
    columns = ("image_name", "level_1", "level_2", "level_3") + (("class_name",) if with_names else ())
    for split in SPLITS:
        rows = read_hicervix_csv(src, split, columns)
        check_listed_images(src / split, [r["image_name"] for r in rows])
        images[split] = len(rows)
        for level in levels:
            per_class = counts.setdefault(level, {})
            for row in rows:
                label = hicervix_label(row, level)
                if label is None:
                    left_out[level] = left_out.get(level, 0) + 1
                else:
                    per_class.setdefault(label, dict.fromkeys(SPLITS, 0))[split] += 1
    return {
        "dataset": "hicervix",
        "root": str(src),
        "images": images,
        "classes": {lv: len(counts.get(lv, {})) for lv in levels},
        "left_out": {lv: left_out.get(lv, 0) for lv in levels},
        "counts": {lv: dict(sorted(counts.get(lv, {}).items())) for lv in levels},
    }


def _has_class_name(src: Path, split: str) -> bool:
    try:
        with open(src / f"{split}.csv", newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False  # read_hicervix_csv reports the problem with the file
    return "class_name" in (h.strip() for h in header)


register(DatasetInfo(
    name="hicervix",
    description="HiCervix cervical cells with a three-level label hierarchy (--level)",
    reader=read_hicervix,
    hierarchy=hicervix_tree,
    layout="<root>/{train,val,test}/*.jpg with <root>/{train,val,test}.csv",
    levels=LEVELS,
    default_level=DEFAULT_LEVEL,
    settings=HicervixSettings,
    prompt_template=CELL_PROMPT,
    prepare=run_check_hicervix,
    how_to_prepare="check a HiCervix download with `python -m datasets prepare hicervix --src ROOT`",
))
