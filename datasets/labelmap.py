"""Merge or rename classes at load time: ``{new class: [old classes...]}``.

Old classes the map does not name keep their name. The new classes come first, in the map's
order, then the classes kept as they are, in the dataset's order. The map is applied to the
listing before sampling, so few-shot counts the merged classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from datasets.base import Listing
from datasets.errors import DatasetError

LabelMap = dict[str, list[str]]
INLINE_FORM = 'name=a,b,c;other=d (or a JSON file {"name": ["a", "b", "c"], "other": ["d"]})'


def parse_label_map(text: str | os.PathLike) -> LabelMap:
    """A label map from a JSON file path or the inline form ``name=a,b,c;other=d``."""
    text = os.fspath(text).strip()
    path = Path(os.path.expanduser(text))
    if text.lower().endswith(".json") or path.is_file():
        return check_label_map(_read_json(path), f"label map {path}")
    out: LabelMap = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        new, sep, olds = part.partition("=")
        if not sep or not new.strip():
            raise DatasetError(f"cannot read label map part '{part}': write {INLINE_FORM}")
        if new.strip() in out:
            raise DatasetError(f"label map gives class '{new.strip()}' twice; list all its classes once")
        out[new.strip()] = [o.strip() for o in olds.split(",") if o.strip()]
    return check_label_map(out, "label map")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DatasetError(f"label map {path} not found; give a JSON file or {INLINE_FORM}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot read label map {path} ({err}); write {INLINE_FORM}") from err


def check_label_map(mapping: object, where: str = "label map") -> LabelMap:
    """The map as ``{str: [str, ...]}`` in its own order; DatasetError when it has another shape."""
    if not isinstance(mapping, dict) or not mapping:
        raise DatasetError(f"{where} must map each new class to a list of old classes: {INLINE_FORM}")
    out: LabelMap = {}
    for new, olds in mapping.items():
        if isinstance(olds, str) or not isinstance(olds, list | tuple) or not all(isinstance(o, str) for o in olds):
            raise DatasetError(f"{where}: class '{new}' must map to a list of class names, not {olds!r}")
        if not str(new).strip() or not olds:
            raise DatasetError(f"{where}: class '{new}' needs a name and at least one old class")
        out[str(new).strip()] = [o.strip() for o in olds]
    return out


def renaming(mapping: LabelMap, classes: list[str], dataset: str) -> dict[str, str]:
    """Old class -> new class for every class of the dataset; one-line DatasetError naming a bad class."""
    named: dict[str, str] = {}
    for new, olds in mapping.items():
        for old in olds:
            if old in named:
                raise DatasetError(
                    f"label map names class '{old}' twice (in '{named[old]}' and '{new}'); keep it in one list"
                )
            if old not in classes:
                raise DatasetError(
                    f"label map names class '{old}', which {dataset} does not have (classes: {', '.join(classes)})"
                )
            named[old] = new
    for old in classes:
        if old not in named and old in mapping:
            raise DatasetError(
                f"label map class '{old}' is also a class it does not list; add '{old}' to its list or rename it"
            )
    return {old: named.get(old, old) for old in classes}


def apply_label_map(listing: Listing, mapping: LabelMap, dataset: str) -> Listing:
    """The listing with its classes renamed and merged (multi-label: a merged label is any of its old ones)."""
    rename = renaming(mapping, listing.classes, dataset)
    classes = list(mapping) + [c for c in listing.classes if rename[c] == c and c not in mapping]
    if listing.task == "multilabel":
        columns = [[i for i, old in enumerate(listing.classes) if rename[old] == new] for new in classes]

        def relabel(label):
            return tuple(max(label[i] for i in cols) for cols in columns)
    else:

        def relabel(label):
            return None if label is None else rename[label]

    listing.items = {s: [(path, relabel(label)) for path, label in v] for s, v in listing.items.items()}
    listing.classes = classes
    return listing
