"""Helpers that every ``python -m datasets prepare NAME`` shares: check the source and the destination,
copy a planned split into place atomically, and report counts.

Each dataset kind's module owns its own preparation (how its raw download is laid out and how it
is split); this module holds what they have in common. Files are copied, never moved; the source
is never modified. ``<n>`` numbers the images of a class in the sorted order of their source paths,
and ``sources.csv`` beside the images maps each written file back to its source (and group). The
result is built in a temporary folder and renamed into place; a non-empty destination is refused
unless ``--overwrite``, which replaces only a folder this command wrote before.
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets.assign import assign_groups, assign_stratified, check_ratios
from datasets.base import PrepareRequest
from datasets.errors import DatasetError
from datasets.layouts import SOURCES_FILE, SPLITS
from datasets.readers import FolderLayout


def build_it(name: str, src: str = "RAW") -> str:
    """The how-to-prepare phrase of a dataset built by ``prepare``."""
    return f"build it with `python -m datasets prepare {name} --src {src} --dst ROOT`"


def refuse_options(dataset: str, request: PrepareRequest, needs_dst: bool = True, takes_manifest: bool = False
                   ) -> None:
    """Refuse the options a preparation does not take."""
    if request.manifest and not takes_manifest:
        raise DatasetError(f"--manifest applies to `prepare folder` only, not to {dataset}")
    if request.columns:
        raise DatasetError(f"--columns applies to `prepare csv` only, not to {dataset}")
    if needs_dst and not request.dst:
        raise DatasetError(f"--dst is required for `prepare {dataset}`: the dataset root to write")


@dataclass
class Planned:
    """One image to copy: where from, its class, split and group."""

    source: Path
    cls: str
    split: str
    group: str


def check_class_name(name: str, where: str) -> str:
    """A class name usable in ``<class>_<n>.<ext>`` file names, or DatasetError naming ``where``."""
    name = name.strip()
    if not name or name.startswith(".") or any(ch in name for ch in '/\\:*?"<>|'):
        raise DatasetError(f"{where}: class name '{name}' cannot be used in file names; rename it")
    return name


def plan_stratified(by_class: dict[str, list[Path]], ratios, seed: int) -> list[Planned]:
    """Each class's images cut into train/val/test by ``ratios``, seeded, with no groups."""
    where = assign_stratified({c: [str(f) for f in fs] for c, fs in by_class.items()}, ratios, seed)
    return [Planned(f, c, where[str(f)], "") for c, fs in by_class.items() for f in fs]


def plan_grouped(rows: list[tuple[Path, str, str]], ratios, seed: int) -> list[Planned]:
    """(image, class, group) rows cut into train/val/test by whole groups, each class close to ``ratios``."""
    groups: dict[str, Counter] = {}
    for _, label, group in rows:
        groups.setdefault(group, Counter())[label] += 1
    where = assign_groups(groups, ratios, seed)
    return [Planned(image, label, where[group], group) for image, label, group in rows]


def plan_official(rows: list[tuple[Path, str, str]], group: str = "") -> list[Planned]:
    """(image, class, split) rows of a dataset that comes with its own split, kept as they are."""
    return [Planned(image, label, split, group) for image, label, split in rows]


def prepare_folder_layout(dataset: str, layout: FolderLayout, request: PrepareRequest,
                          plan: Callable[[Path, tuple[float, float, float], int], list[Planned]]) -> dict:
    """Write ``<dst>/<folder>/images/<split>/<class>_<n>.<ext>`` from ``plan(src, ratios, seed)``, atomically."""
    refuse_options(dataset, request)
    ratios = check_ratios(request.ratios)
    src = source_dir(request.src)
    target = Path(os.path.abspath(request.dst)) / layout.folder
    check_target(target, src, request.overwrite, {"images", SOURCES_FILE})
    planned = plan(src, ratios, request.seed)
    write_plan(planned, target, "images", src, request.overwrite)
    return report(dataset, planned, list(layout.classes), layout.images_dir(target.parent), request.seed, ratios)


def source_dir(src: Path) -> Path:
    """The absolute source folder; DatasetError when it is not a folder."""
    src = Path(os.path.abspath(os.path.expanduser(str(src))))
    if not src.is_dir():
        raise DatasetError(f"source folder {src} not found: --src must be the unpacked raw download")
    return src


def _inside(a: Path, b: Path) -> bool:
    """True when ``a`` is ``b`` or lies below it (after resolving links)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_target(target: Path, src: Path, overwrite: bool, ours: set[str]) -> None:
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


def warn_stray(n: int, src: Path, where: str) -> None:
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


def write_plan(plan: list[Planned], target: Path, sub: str, src: Path, overwrite: bool) -> None:
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
        assert overwrite  # check_target refused otherwise
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if target.is_dir():
            target.rmdir()
        os.rename(tmp, target)


def report(
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
