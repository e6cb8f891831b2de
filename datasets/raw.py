"""Find the images of each class in a raw download (class-per-folder trees, as on Kaggle)."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable
from pathlib import Path

from datasets.errors import DatasetError
from datasets.layouts import PAPER_LAYOUTS, is_image_name

# Raw folder names seen in the public downloads, compared after _normalise(), per paper class.
ALIASES = {
    "mlcc": {
        "HSIL": (
            "high squamous intra-epithelial lesion",
            "high-grade squamous intraepithelial lesion",
            "high grade squamous intraepithelial lesion",
        ),
        "LSIL": (
            "low squamous intra-epithelial lesion",
            "low-grade squamous intraepithelial lesion",
            "low grade squamous intraepithelial lesion",
        ),
        "NL": (
            "NILM",
            "normal",
            "negative for intraepithelial malignancy",
            "negative for intraepithelial lesion or malignancy",
        ),
        "SCC": ("squamous cell carcinoma",),
    },
    "bcfc": {"malignant": (), "benign": ()},
    "sipakmed": {name: () for name in PAPER_LAYOUTS["sipakmed"].classes},
}
NO_GROUP = "image:"  # the group of a manifest row without one: the image alone
CROPPED = "cropped"  # SIPaKMeD keeps single-cell crops in .../CROPPED/; the rest are whole slides


def _normalise(name: str) -> str:
    """Folder name -> comparison key: case, an ``im_`` prefix and punctuation do not matter."""
    name = name.strip().lower()
    name = name.removeprefix("im_")
    return re.sub(r"[^a-z0-9]", "", name)


def class_resolver(dataset: str) -> Callable[[str], str | None]:
    """A function mapping a raw folder name to the paper's class name (None if it is no class)."""
    table = {}
    for cls, aliases in ALIASES[dataset].items():
        for alias in (cls, *aliases):
            table[_normalise(alias)] = cls
    return lambda folder: table.get(_normalise(folder))


def images_below(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, hidden entries skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if is_image_name(f))
    return sorted(found)


def _only_cropped(files: list[Path], folder: Path) -> list[Path]:
    """SIPaKMeD: keep the cell crops when the class folder has a CROPPED sub-folder."""
    cropped = [f for f in files if CROPPED in (p.lower() for p in f.relative_to(folder).parts[:-1])]
    return cropped or files


def scan_paper_raw(src: Path, dataset: str) -> tuple[dict[str, list[Path]], int]:
    """Images per paper class under ``src`` and the number of images outside any class folder.

    The top-most folder whose name maps to a class claims every image below it (so that
    SIPaKMeD's nested ``im_<Class>/im_<Class>/CROPPED/`` counts once).
    """
    resolve = class_resolver(dataset)
    found: dict[str, list[Path]] = {}
    stray = 0
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        keep = []
        for d in sorted(x for x in dirnames if not x.startswith(".")):
            cls = resolve(d)
            if cls is None:
                keep.append(d)
                continue
            files = images_below(here / d)
            if dataset == "sipakmed":
                files = _only_cropped(files, here / d)
            found.setdefault(cls, []).extend(files)
        dirnames[:] = keep
        stray += sum(1 for f in filenames if is_image_name(f))
    missing = [c for c in PAPER_LAYOUTS[dataset].classes if not found.get(c)]
    if missing:
        names = ", ".join(missing)
        raise DatasetError(
            f"no images found for class(es) {names} under {src}: {dataset} needs one folder per class "
            f"({', '.join(PAPER_LAYOUTS[dataset].classes)}; case and an im_ prefix do not matter)"
        )
    return {c: sorted(found[c]) for c in PAPER_LAYOUTS[dataset].classes}, stray


def check_class_name(name: str, where: str) -> str:
    """A class name usable in ``<class>_<n>.<ext>`` file names, or DatasetError naming ``where``."""
    name = name.strip()
    if not name or name.startswith(".") or any(ch in name for ch in '/\\:*?"<>|'):
        raise DatasetError(f"{where}: class name '{name}' cannot be used in file names; rename it")
    return name


def scan_folder_raw(src: Path) -> tuple[dict[str, list[Path]], int]:
    """Images per class of a class-per-folder tree (class = top-level folder name) and strays."""
    found: dict[str, list[Path]] = {}
    stray = 0
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = images_below(Path(entry.path))
            if files:
                found[check_class_name(entry.name, entry.path)] = files
        elif is_image_name(entry.name):
            stray += 1
    if not found:
        raise DatasetError(f"no class folders with images under {src}: expected {src}/<class>/<images>")
    return found, stray


def read_group_manifest(path: Path, src: Path) -> list[tuple[Path, str, str]]:
    """Rows (image, label, group) of a ``path,label,group`` CSV whose paths are relative to ``src``.

    An image with an empty or absent group is a group of its own.
    """
    if not path.is_file():
        raise DatasetError(f"manifest {path} not found: give a CSV with columns path,label,group")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in ("path", "label") if c not in header]
            if missing:
                raise DatasetError(
                    f"{path} has no column {', '.join(missing)} (columns: {', '.join(header) or 'none'}); "
                    "a manifest needs path,label and optionally group"
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read {path}: {err}") from err
    return _manifest_rows(rows, path, src)


def _manifest_rows(rows: list[dict[str, str]], path: Path, src: Path) -> list[tuple[Path, str, str]]:
    out, seen, missing = [], set(), []
    for line, row in enumerate(rows, start=2):
        rel = row.get("path", "")
        if not rel:
            continue
        if rel in seen:
            raise DatasetError(f"{path} line {line}: {rel} is listed twice; keep one row per image")
        seen.add(rel)
        label = check_class_name(row.get("label", ""), f"{path} line {line}")
        image = src / rel
        if not image.is_file():
            missing.append(rel)
        out.append((image, label, row.get("group") or f"{NO_GROUP}{rel}"))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetError(f"{len(missing)} image(s) listed in {path} are missing under {src}: {shown}")
    if not out:
        raise DatasetError(f"{path} lists no images")
    return out
