"""The ``folder`` dataset: any single-label data stored as ``<root>/{train,val,test}/<class>_<n>.<ext>``.

``python -m datasets prepare folder --src RAW --dst ROOT`` builds it from any class-per-folder tree
(class = top-level folder name), or from the images a ``--manifest`` CSV (columns ``path,label,group``,
paths relative to ``--src``) lists; ``<src>/manifest.csv`` is used when it exists and no ``--manifest``
is given. With groups (patient, slide, source image) all images of a group land in the same split, and
each class comes as close to the ratios as groups allow; a split made without groups is warned about
(cells of one patient may then sit in train and test).
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

from datasets.assign import check_ratios
from datasets.base import DEFAULT_RATIOS, Listing, PrepareRequest, ReadRequest
from datasets.errors import DatasetError
from datasets.layouts import CLASS_FOLDERS, SOURCES_FILE, SPLITS, is_image_name
from datasets.prepare import (
    Planned,
    build_it,
    check_class_name,
    check_target,
    plan_grouped,
    plan_stratified,
    refuse_options,
    report,
    source_dir,
    warn_stray,
    write_plan,
)
from datasets.readers import images_below, read_class_folders
from datasets.registry import DatasetInfo, register

DEFAULT_MANIFEST = "manifest.csv"  # `prepare folder` uses <src>/manifest.csv when no --manifest is given
NO_GROUP = "image:"  # the group of a manifest row without one: the image alone


def read_folder(root: Path, request: ReadRequest) -> Listing:
    """The generic ``folder`` dataset: classes inferred from the file names."""
    return read_class_folders(root, request.dataset, None)


def run_prepare_folder(request: PrepareRequest) -> dict:
    """A class-per-folder tree or a path,label,group manifest, split by class (and group) (seeded, --ratios)."""
    refuse_options("folder", request, takes_manifest=True)
    return prepare_folder(
        request.src, request.dst, request.seed, request.ratios, request.overwrite, request.manifest
    )


def prepare_folder(
    src: Path,
    dst: Path,
    seed: int = 0,
    ratios=DEFAULT_RATIOS,
    overwrite: bool = False,
    manifest: Path | None = None,
) -> dict:
    """Build ``<dst>/<split>/<class>_<n>.<ext>`` from a class-per-folder tree or a grouped manifest."""
    ratios = check_ratios(ratios)
    src = source_dir(src)
    target = Path(os.path.abspath(dst))
    check_target(target, src, overwrite, {*SPLITS, SOURCES_FILE})
    if manifest is None and (src / DEFAULT_MANIFEST).is_file():
        manifest = src / DEFAULT_MANIFEST
        print(f"using {manifest} (path,label,group); give --manifest to use another file", file=sys.stderr)
    plan = _plan_from_folders(src, ratios, seed) if manifest is None else _plan_from_manifest(
        Path(manifest), src, ratios, seed
    )
    classes = sorted({p.cls for p in plan})
    write_plan(plan, target, "", src, overwrite)
    out = report("folder", plan, classes, target, seed, ratios)
    if manifest is not None:
        out["groups"] = {s: len({p.group for p in plan if p.split == s}) for s in SPLITS}
    return out


def _plan_from_folders(src: Path, ratios, seed: int) -> list[Planned]:
    by_class, stray = scan_folder_raw(src)
    warn_stray(stray, src, "directly in the source folder (not in a class folder)")
    print(
        f"warning: splitting {src} without groups: cells of one patient or slide may land in both train "
        "and test; give --manifest path,label,group to keep groups together",
        file=sys.stderr,
    )
    return plan_stratified(by_class, ratios, seed)


def _plan_from_manifest(manifest: Path, src: Path, ratios, seed: int) -> list[Planned]:
    rows = read_group_manifest(manifest, src)
    listed = {os.path.normpath(str(image)) for image, _, _ in rows}
    unlisted = sum(1 for f in images_below(src) if os.path.normpath(str(f)) not in listed)
    warn_stray(unlisted, src, f"not listed in {manifest}")
    ungrouped = sum(1 for _, _, group in rows if group.startswith(NO_GROUP))
    if ungrouped:
        print(
            f"warning: {ungrouped} of {len(rows)} image(s) in {manifest} have no group and are split one by one; "
            "fill the group column (patient, slide) to keep related cells together",
            file=sys.stderr,
        )
    return plan_grouped(rows, ratios, seed)


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


register(DatasetInfo(
    name="folder",
    generic=True,
    description="any single-label dataset stored as <root>/<split>/<class>_<n>.<ext>",
    reader=read_folder,
    layout=CLASS_FOLDERS,
    prepare=run_prepare_folder,
    how_to_prepare=build_it("folder"),
))
