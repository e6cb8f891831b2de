"""The ``csv`` dataset: ``<root>/{train,val,test}.csv`` list the images and their labels.

Each file has a ``path`` column (relative to ``<root>``, or absolute) and an optional
``group`` column (patient, slide, source image; kept, never a label). The task follows
from the other columns, which must be the same in the three files:

* a ``label`` column: single-label classification, exactly as the ``folder`` dataset
  (classes sorted by name); other columns are ignored;
* a ``caption`` column: image-text pairs (``Split.captions``); the images carry the class
  of a ``label`` column when there is one, else -1; other columns are ignored;
* otherwise every other column is a 0/1 label: multi-label classification, the classes
  being those columns in file order.

``python -m datasets prepare csv --src MANIFEST.csv --dst ROOT`` writes the three files from
one manifest with a ``split`` column (train, val or test) whose paths are relative to the
manifest's folder (or absolute); ``--columns`` keeps only the named columns besides ``path``.
Written paths are relative to ROOT for images below it, absolute otherwise.

Example: the BCCD smears (``bccd/smears/smears.csv``: ``path,split,rbc_count,wbc_count,
platelet_count,platelets,wbc_multiple,rbc_dense``) become a three-label multi-label dataset
(the counts are not 0/1 labels, so they are left out)::

    python -m datasets prepare csv --src bccd/smears/smears.csv --dst data/bccd_smears \\
        --columns platelets,wbc_multiple,rbc_dense
    python -m datasets summary --dataset csv --root_path data/bccd_smears --shots 4
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from datasets.base import Listing, PrepareRequest, ReadRequest
from datasets.errors import DatasetError
from datasets.layouts import SPLITS
from datasets.registry import DatasetInfo, register
from datasets.tables import LABEL_HINT, combine, parse_table, read_rows, read_tables, task_of, write_tables


def read_csv_dataset(root: Path, request: ReadRequest | None = None) -> Listing:
    """Read ``<root>/{train,val,test}.csv`` into a listing (nothing is decoded; every path must exist)."""
    return read_tables(root, "csv")


def peek_task(root: Path) -> str:
    """The task of a csv dataset from the header of its train.csv alone."""
    path = root / "train.csv"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read {path}: {err}") from err
    return task_of(header, str(path))[0]


def prepare_csv(request: PrepareRequest) -> dict:
    """A manifest CSV with path and split columns: writes <dst>/{train,val,test}.csv and copies nothing."""
    src, dst = Path(os.path.abspath(os.path.expanduser(request.src))), request.dst
    if request.manifest:
        raise DatasetError("--manifest applies to `prepare folder` only; for csv the manifest is --src")
    if not src.is_file():
        raise DatasetError(f"manifest {src} not found: --src must be a CSV with path and split columns")
    if not dst:
        raise DatasetError("--dst is required for `prepare csv`: the dataset root to write")
    dst = Path(os.path.abspath(os.path.expanduser(dst)))
    header, rows = read_rows(src)
    columns = _kept_columns(header, request.columns, src)
    per_split = _rows_per_split(header, rows, columns, src, dst)
    hint = "keep only the 0/1 label columns with --columns a,b,c" if not request.columns else LABEL_HINT
    tables = {s: parse_table(["path", *columns], per_split[s], f"{src} (split {s})", hint) for s in SPLITS}
    listing = combine(tables, dst)
    write_tables(dst, ["path", *columns], per_split, request.overwrite)
    return _report(listing, dst, columns)


def _kept_columns(header: list[str], wanted: list[str] | None, src: Path) -> list[str]:
    for col in ("path", "split"):
        if col not in header:
            raise DatasetError(f"{src} has no column {col} (columns: {', '.join(header) or 'none'}); add it")
    if not wanted:
        return [h for h in header if h not in ("path", "split")]
    unknown = [c for c in wanted if c not in header or c in ("path", "split")]
    if unknown:
        raise DatasetError(f"--columns names {', '.join(unknown)}, not a column of {src} besides path and split")
    return list(wanted)


def _rows_per_split(header, rows, columns, src: Path, dst: Path) -> dict[str, list[tuple[int, list[str]]]]:
    """Rows per split with the kept columns, paths rewritten relative to ``dst`` (absolute when outside it)."""
    index = {h: i for i, h in enumerate(header)}
    out: dict[str, list[tuple[int, list[str]]]] = {s: [] for s in SPLITS}
    for line, cells in rows:
        cell = {h: (cells[i].strip() if i < len(cells) else "") for h, i in index.items()}
        if cell["split"] not in SPLITS:
            raise DatasetError(f"{src} line {line}: split '{cell['split']}' is not one of {', '.join(SPLITS)}")
        image = Path(os.path.normpath(src.parent / cell["path"])) if cell["path"] else None
        path = "" if image is None else _written_path(image, dst)
        out[cell["split"]].append((line, [path, *(cell[c] for c in columns)]))
    return out


def _written_path(image: Path, dst: Path) -> str:
    try:
        return image.relative_to(dst).as_posix()
    except ValueError:
        return str(image)


def _report(listing: Listing, dst: Path, columns: list[str]) -> dict:
    counts = {cls: dict.fromkeys(SPLITS, 0) for cls in listing.classes}
    for split, items in listing.items.items():
        for _, label in items:
            if listing.task == "multilabel":
                for cls, v in zip(listing.classes, label, strict=True):
                    counts[cls][split] += v
            elif label is not None:
                counts[label][split] += 1
    return {
        "dataset": "csv",
        "written_to": str(dst),
        "task": listing.task,
        "columns": columns,
        "images": sum(len(v) for v in listing.items.values()),
        "split_images": {s: len(v) for s, v in listing.items.items()},
        "counts": counts,
    }


register(DatasetInfo(
    name="csv",
    generic=True,
    description="<root>/{train,val,test}.csv: single-label, multi-label or image-text pairs",
    reader=read_csv_dataset,
    task=peek_task,
    layout="<root>/{train,val,test}.csv with a path column (relative to <root>) and label, caption or 0/1 columns",
    prepare=prepare_csv,
    how_to_prepare="build it with `python -m datasets prepare csv --src MANIFEST.csv --dst ROOT`",
))
