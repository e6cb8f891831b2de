"""Turn raw downloads into the layouts the readers expect (``python -m datasets prepare``).

* ``mlcc``, ``bcfc``, ``sipakmed``: a class-per-folder tree as distributed on Kaggle (folder
  names are matched to the paper's class names whatever their case, with or without an
  ``im_`` prefix; MLCC's long names such as "High squamous intra-epithelial lesion" are
  known; for SIPaKMeD only the single-cell crops under ``.../CROPPED/`` are used). Every
  class is split, stratified and seeded, into train/val/test with the default ratios
  70/10/20 percent (``--ratios``), and copied to ``<dst>/<NAME>/images/<split>/<class>_<n>.<ext>``.
* ``folder``: any class-per-folder tree (class = top-level folder name), or the images a
  ``--manifest`` CSV (columns ``path,label,group``, paths relative to ``--src``) lists, to
  ``<dst>/<split>/<class>_<n>.<ext>``; ``<src>/manifest.csv`` is used when it exists and no
  ``--manifest`` is given. With groups (patient, slide, source image) all images of a group
  land in the same split, and each class comes as close to the ratios as groups allow; a
  split made without groups is warned about (cells of one patient may then sit in train and test).
* ``csv``: ``--src`` is a manifest CSV with ``path`` and ``split`` columns; writes
  ``<dst>/{train,val,test}.csv`` and copies nothing (see ``datasets/tabular.py``).
* ``hicervix``: already split; it is only checked (CSV columns, every listed image present)
  and its counts reported.

Files are copied, never moved; the source is never modified. ``<n>`` numbers the images of a
class in the sorted order of their source paths, and ``sources.csv`` beside the images maps
each written file back to its source (and group). The result is built in a temporary folder
and renamed into place; a non-empty destination is refused unless ``--overwrite``, which
replaces only a folder this command wrote before.
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from datasets.assign import (
    DEFAULT_RATIOS,
    assign_groups,
    assign_stratified,
    check_ratios,
)
from datasets.errors import DatasetError
from datasets.hicervix import check_listed_images, hicervix_label, read_hicervix_csv
from datasets.layouts import HICERVIX_LEVELS, PAPER_LAYOUTS, SPLITS
from datasets.raw import (
    NO_GROUP,
    images_below,
    read_group_manifest,
    scan_folder_raw,
    scan_paper_raw,
)
from datasets.readers import require_dir

SOURCES_FILE = "sources.csv"
DEFAULT_MANIFEST = "manifest.csv"  # `prepare folder` uses <src>/manifest.csv when no --manifest is given


@dataclass(frozen=True)
class PrepareRequest:
    """The settings of one ``python -m datasets prepare`` call."""

    src: Path
    dst: Path | None = None
    seed: int = 0
    ratios: tuple[float, float, float] = DEFAULT_RATIOS
    overwrite: bool = False
    manifest: Path | None = None
    columns: list[str] | None = None  # csv only: the columns kept besides path


def _plain(dataset: str, request: PrepareRequest, needs_dst: bool = True, takes_manifest: bool = False) -> None:
    """Refuse the options a preparation does not take."""
    if request.manifest and not takes_manifest:
        raise DatasetError(f"--manifest applies to `prepare folder` only, not to {dataset}")
    if request.columns:
        raise DatasetError(f"--columns applies to `prepare csv` only, not to {dataset}")
    if needs_dst and not request.dst:
        raise DatasetError(f"--dst is required for `prepare {dataset}`: the dataset root to write")


def paper_preparer(dataset: str):
    """The ``prepare`` function of a paper dataset (mlcc, bcfc, sipakmed)."""

    def run(request: PrepareRequest) -> dict:
        _plain(dataset, request)
        return prepare_paper(dataset, request.src, request.dst, request.seed, request.ratios, request.overwrite)

    return run


def run_prepare_folder(request: PrepareRequest) -> dict:
    """``prepare folder``: a class-per-folder tree or a grouped manifest."""
    _plain("folder", request, takes_manifest=True)
    return prepare_folder(
        request.src, request.dst, request.seed, request.ratios, request.overwrite, request.manifest
    )


def run_check_hicervix(request: PrepareRequest) -> dict:
    """``prepare hicervix``: check the download in place."""
    _plain("hicervix", request, needs_dst=False)
    return check_hicervix(request.src)


@dataclass
class Planned:
    """One image to copy: where from, its class, split and group."""

    source: Path
    cls: str
    split: str
    group: str


def prepare_paper(
    dataset: str, src: Path, dst: Path, seed: int = 0, ratios=DEFAULT_RATIOS, overwrite: bool = False
) -> dict:
    """Build ``<dst>/<NAME>/images/<split>/`` for mlcc, bcfc or sipakmed from a raw download."""
    ratios = check_ratios(ratios)
    src = _source_dir(src)
    layout = PAPER_LAYOUTS[dataset]
    target = Path(os.path.abspath(dst)) / layout.folder
    _check_target(target, src, overwrite, {"images", SOURCES_FILE})
    by_class, stray = scan_paper_raw(src, dataset)
    _warn_stray(stray, src, "outside the class folders")
    where = assign_stratified({c: [str(f) for f in fs] for c, fs in by_class.items()}, ratios, seed)
    plan = [Planned(f, c, where[str(f)], "") for c, fs in by_class.items() for f in fs]
    _write(plan, target, "images", src, overwrite)
    return _report(dataset, plan, list(layout.classes), layout.images_dir(target.parent), seed, ratios)


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
    src = _source_dir(src)
    target = Path(os.path.abspath(dst))
    _check_target(target, src, overwrite, {*SPLITS, SOURCES_FILE})
    if manifest is None and (src / DEFAULT_MANIFEST).is_file():
        manifest = src / DEFAULT_MANIFEST
        print(f"using {manifest} (path,label,group); give --manifest to use another file", file=sys.stderr)
    plan = _plan_from_folders(src, ratios, seed) if manifest is None else _plan_from_manifest(
        Path(manifest), src, ratios, seed
    )
    classes = sorted({p.cls for p in plan})
    _write(plan, target, "", src, overwrite)
    report = _report("folder", plan, classes, target, seed, ratios)
    if manifest is not None:
        report["groups"] = {s: len({p.group for p in plan if p.split == s}) for s in SPLITS}
    return report


def _plan_from_folders(src: Path, ratios, seed: int) -> list[Planned]:
    by_class, stray = scan_folder_raw(src)
    _warn_stray(stray, src, "directly in the source folder (not in a class folder)")
    print(
        f"warning: splitting {src} without groups: cells of one patient or slide may land in both train "
        "and test; give --manifest path,label,group to keep groups together",
        file=sys.stderr,
    )
    where = assign_stratified({c: [str(f) for f in fs] for c, fs in by_class.items()}, ratios, seed)
    return [Planned(f, c, where[str(f)], "") for c, fs in by_class.items() for f in fs]


def _plan_from_manifest(manifest: Path, src: Path, ratios, seed: int) -> list[Planned]:
    rows = read_group_manifest(manifest, src)
    listed = {os.path.normpath(str(image)) for image, _, _ in rows}
    unlisted = sum(1 for f in images_below(src) if os.path.normpath(str(f)) not in listed)
    _warn_stray(unlisted, src, f"not listed in {manifest}")
    ungrouped = sum(1 for _, _, group in rows if group.startswith(NO_GROUP))
    if ungrouped:
        print(
            f"warning: {ungrouped} of {len(rows)} image(s) in {manifest} have no group and are split one by one; "
            "fill the group column (patient, slide) to keep related cells together",
            file=sys.stderr,
        )
    groups: dict[str, Counter] = {}
    for _, label, group in rows:
        groups.setdefault(group, Counter())[label] += 1
    where = assign_groups(groups, ratios, seed)
    return [Planned(image, label, where[group], group) for image, label, group in rows]


def check_hicervix(src: Path) -> dict:
    """Check a HiCervix download in place and count its images per label at each level."""
    src = _source_dir(src)
    require_dir(src, "hicervix", "dataset root")
    counts: dict[str, dict[str, dict[str, int]]] = {}
    left_out: dict[str, int] = {}
    images: dict[str, int] = {}
    with_names = all(_has_class_name(src, s) for s in SPLITS if (src / f"{s}.csv").is_file())
    levels = [lv for lv in HICERVIX_LEVELS if lv != "class_name" or with_names]
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


def _source_dir(src: Path) -> Path:
    src = Path(os.path.abspath(os.path.expanduser(str(src))))
    if not src.is_dir():
        raise DatasetError(f"source folder {src} not found: --src must be the unpacked raw download")
    return src


def _inside(a: Path, b: Path) -> bool:
    """True when ``a`` is ``b`` or lies below it (after resolving links)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _check_target(target: Path, src: Path, overwrite: bool, ours: set[str]) -> None:
    """Refuse a destination that overlaps the source, or is not empty without --overwrite."""
    if _inside(target, src) or _inside(src, target):
        raise DatasetError(
            f"destination {target} overlaps the source {src}: choose a --dst outside the source"
        )
    if target.exists() and not target.is_dir():
        raise DatasetError(f"destination {target} is a file: choose another --dst")
    if not target.is_dir():
        return
    entries = sorted(os.listdir(target))
    if not entries:
        return
    if not overwrite:
        raise DatasetError(
            f"destination {target} is not empty: use --overwrite to replace it, or another --dst"
        )
    foreign = [e for e in entries if e not in ours]
    if foreign:
        raise DatasetError(
            f"--overwrite replaces only a folder written by prepare, and {target} also holds {foreign[0]}: "
            "choose another --dst or clear it yourself"
        )


def _warn_stray(n: int, src: Path, where: str) -> None:
    if n:
        print(f"warning: {n} image(s) under {src} are {where}; they were not copied", file=sys.stderr)


def _names(plan: list[Planned]) -> list[str]:
    """``<class>_<n>.<ext>`` for each planned image, n counting a class's sources in sorted order."""
    order = sorted(range(len(plan)), key=lambda i: (plan[i].cls, str(plan[i].source)))
    names = [""] * len(plan)
    counter: Counter = Counter()
    for i in order:
        counter[plan[i].cls] += 1
        names[i] = f"{plan[i].cls}_{counter[plan[i].cls]}{plan[i].source.suffix.lower()}"
    return names


def _write(plan: list[Planned], target: Path, sub: str, src: Path, overwrite: bool) -> None:
    """Copy the plan into a fresh folder beside ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.prepare-", dir=target.parent))
    try:
        base = tmp / sub if sub else tmp
        for split in SPLITS:
            (base / split).mkdir(parents=True)
        rows = []
        for p, name in zip(plan, _names(plan), strict=True):
            shutil.copyfile(p.source, base / p.split / name)
            rel = f"{sub}/{p.split}/{name}" if sub else f"{p.split}/{name}"
            rows.append((rel, p.source.relative_to(src).as_posix(), p.cls, p.group))
        with open(tmp / SOURCES_FILE, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "source", "label", "group"])
            writer.writerows(sorted(rows))
        _swap_into_place(tmp, target, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    if target.is_dir() and os.listdir(target):
        assert overwrite  # _check_target refused otherwise
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if target.is_dir():
            target.rmdir()
        os.rename(tmp, target)


def _report(
    dataset: str, plan: list[Planned], classes: list[str], images_dir: Path, seed: int, ratios
) -> dict:
    counts = {cls: dict.fromkeys(SPLITS, 0) for cls in classes}
    for p in plan:
        counts[p.cls][p.split] += 1
    for cls, per_split in counts.items():
        empty = [s for s in SPLITS if per_split[s] == 0]
        if empty:
            print(f"warning: class '{cls}' has no image in {', '.join(empty)}", file=sys.stderr)
    return {
        "dataset": dataset,
        "written_to": str(images_dir),
        "seed": seed,
        "ratios": list(ratios),
        "images": len(plan),
        "counts": counts,
    }


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    """A text table: one row per class with its train/val/test sizes, and a total row."""
    width = max([len("class"), len("total")] + [len(c) for c in counts])
    lines = [f"{'class':<{width}}  {'train':>6} {'val':>6} {'test':>6} {'total':>6}"]
    totals = dict.fromkeys(SPLITS, 0)
    for cls, per in counts.items():
        lines.append(
            f"{cls:<{width}}  " + " ".join(f"{per[s]:>6}" for s in SPLITS) + f" {sum(per.values()):>6}"
        )
        for s in SPLITS:
            totals[s] += per[s]
    lines.append(
        f"{'total':<{width}}  " + " ".join(f"{totals[s]:>6}" for s in SPLITS) + f" {sum(totals.values()):>6}"
    )
    return "\n".join(lines)
