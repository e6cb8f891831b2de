"""CSV tables of images shared by the kinds stored that way (csv, demo_captions): parse, check and write.

Each file has a ``path`` column (relative to the root, or absolute) and an optional ``group`` column
(patient, slide, source image; kept, never a label). The task follows from the other columns, which
must be the same in the three files (see ``datasets/tabular.py``).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.io import write_text_atomic
from datasets.base import Listing
from datasets.errors import DatasetError
from datasets.layouts import SPLITS
from datasets.readers import require_dir, require_file

RESERVED = ("path", "group")
SHOW_MISSING = 5


@dataclass
class Table:
    """One parsed CSV: its task, classes (multi-label: the label columns) and rows (path, label)."""

    where: str
    task: str
    columns: list[str]
    rows: list[tuple[str, object]] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)


def read_tables(root: Path, dataset: str) -> Listing:
    """Read ``<root>/{train,val,test}.csv`` into a listing (nothing is decoded; every path must exist)."""
    require_dir(root, dataset, "dataset root")
    tables = {}
    for split in SPLITS:
        path = root / f"{split}.csv"
        require_file(path, dataset)
        header, rows = read_rows(path)
        tables[split] = parse_table(header, rows, str(path))
    return combine(tables, root)


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The stripped header and the (line number, cells) of each non-empty row of a CSV file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read {path}: {err}") from err
    return header, rows


def task_of(header: list[str], where: str) -> tuple[str, list[str]]:
    """The task a header describes and its label columns (multi-label) or its label/caption columns."""
    if "path" not in header:
        raise DatasetError(f"{where} has no column path (columns: {', '.join(header) or 'none'}); add one")
    dup = next((h for h in header if header.count(h) > 1), None)
    if dup:
        raise DatasetError(f"{where} has two columns named '{dup}'; rename one")
    if "caption" in header:
        return "captions", ["caption"] + (["label"] if "label" in header else [])
    if "label" in header:
        return "single_label", ["label"]
    labels = [h for h in header if h not in RESERVED]
    if not labels:
        raise DatasetError(f"{where} has no label column: add `label`, `caption` or 0/1 label columns")
    return "multilabel", labels


LABEL_HINT = "name a class column `label` for single-label data"


def parse_table(header: list[str], rows: list[tuple[int, list[str]]], where: str, hint: str = LABEL_HINT) -> Table:
    """Check and parse the rows of one file; one-line DatasetError naming the file, line and column."""
    task, columns = task_of(header, where)
    table = Table(where, task, columns)
    seen: set[str] = set()
    for line, cells in rows:
        cell = {h: (cells[i].strip() if i < len(cells) else "") for i, h in enumerate(header)}
        path = cell["path"]
        if not path:
            raise DatasetError(f"{where} line {line} has no path; fill it or remove the row")
        if path in seen:
            raise DatasetError(f"{where} line {line}: {path} is listed twice; keep one row per image")
        seen.add(path)
        table.rows.append((path, _label(task, columns, cell, f"{where} line {line}", hint)))
        if task == "captions":
            table.captions[path] = cell["caption"]
        if cell.get("group"):
            table.groups[path] = cell["group"]
    if not table.rows:
        raise DatasetError(f"{where} lists no images; add rows with a path")
    return table


def _label(task: str, columns: list[str], cell: dict[str, str], where: str, hint: str) -> object:
    if task == "multilabel":
        values = []
        for col in columns:
            value = cell[col]
            if value not in ("0", "1"):
                raise DatasetError(
                    f"{where}, column '{col}': '{value}' is not 0 or 1; multi-label columns hold 0/1 ({hint})"
                )
            values.append(int(value))
        return tuple(values)
    if task == "captions" and not cell["caption"]:
        raise DatasetError(f"{where} has an empty caption; fill it or remove the row")
    if task == "captions" and "label" not in columns:
        return None
    if not cell["label"]:
        raise DatasetError(f"{where} has no label; fill it or remove the row")
    return cell["label"]


def combine(tables: dict[str, Table], root: Path) -> Listing:
    """The listing of three tables that must share their task and columns; every path must exist."""
    first = tables[SPLITS[0]]
    seen: dict[str, str] = {}
    for table in tables.values():
        if (table.task, table.columns) != (first.task, first.columns):
            raise DatasetError(
                f"{table.where} holds {table.task} data with columns {', '.join(table.columns)} but "
                f"{first.where} holds {first.task} with {', '.join(first.columns)}; give the files the same columns"
            )
        for path, _ in table.rows:
            if path in seen:
                raise DatasetError(f"{path} is listed in both {seen[path]} and {table.where}; keep it in one split")
            seen[path] = table.where
        check_paths_exist(root, [p for p, _ in table.rows], table.where)
    if first.task == "multilabel":
        classes = list(first.columns)
    else:
        classes = sorted({label for t in tables.values() for _, label in t.rows if label is not None})
    return Listing(
        root=root,
        classes=classes,
        items={s: sorted(t.rows) for s, t in tables.items()},
        task=first.task,
        captions={p: c for t in tables.values() for p, c in t.captions.items()},
        groups={p: g for t in tables.values() for p, g in t.groups.items()},
    )


def check_paths_exist(root: Path, paths: list[str], where: str) -> None:
    """Fail naming the first few listed paths that are not files."""
    missing = [p for p in paths if not os.path.isfile(os.path.join(root, p))]
    if missing:
        shown = ", ".join(missing[:SHOW_MISSING]) + (", ..." if len(missing) > SHOW_MISSING else "")
        raise DatasetError(
            f"{len(missing)} image(s) listed in {where} are missing under {root}: {shown}; "
            "restore them or fix the CSV"
        )


def write_tables(dst: Path, header: list[str], per_split, overwrite: bool) -> None:
    """``<dst>/{train,val,test}.csv`` from (line, cells) rows per split, atomically; existing files are kept
    unless ``overwrite``."""
    present = [f"{s}.csv" for s in SPLITS if (dst / f"{s}.csv").exists()]
    if present and not overwrite:
        raise DatasetError(
            f"{dst} already holds {', '.join(present)}: use --overwrite to replace them, or another --dst"
        )
    for split in SPLITS:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(cells for _, cells in per_split[split])
        write_text_atomic(dst / f"{split}.csv", text.getvalue())
