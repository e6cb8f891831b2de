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
import re
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
from datasets.layouts import SOURCES_FILE, SPLITS, is_image_name
from datasets.readers import FolderLayout, images_below


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
    origin: str = ""  # what sources.csv names as the source when it is no file under --src (an array entry)
    given: bool = False  # the split comes with the download (official), not from this tool's seeded draw


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


def plan_official(rows: list[tuple[Path, str, str]]) -> list[Planned]:
    """(image, class, split) rows of a dataset that comes with its own split, kept as they are."""
    return [Planned(image, label, split, "", given=True) for image, label, split in rows]


def scan_class_folders(src: Path, resolve: Callable[[str], str | None], classes: tuple[str, ...], dataset: str,
                       keep: Callable[[list[Path], Path], list[Path]] | None = None
                       ) -> tuple[dict[str, list[Path]], int]:
    """Images per class under ``src`` and the number of images outside any class folder.

    ``resolve`` maps a folder name to a class (None: no class folder); the top-most folder whose name maps to
    a class claims every image below it (so that nested copies of a class folder count once); ``keep(files,
    folder)`` may narrow a class folder's images. DatasetError naming the expected folders when a class has none.
    """
    found: dict[str, list[Path]] = {}
    stray = 0
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        descend = []
        for d in sorted(x for x in dirnames if not x.startswith(".")):
            cls = resolve(d)
            if cls is None:
                descend.append(d)
                continue
            files = images_below(here / d)
            found.setdefault(cls, []).extend(keep(files, here / d) if keep else files)
        dirnames[:] = descend
        stray += sum(1 for f in filenames if is_image_name(f))
    missing = [c for c in classes if not found.get(c)]
    if missing:
        raise DatasetError(
            f"no images found for class(es) {', '.join(missing)} under {src}: {dataset} needs one folder per class "
            f"({', '.join(classes)}; case and an im_ prefix do not matter)"
        )
    return {c: sorted(found[c]) for c in classes}, stray


def normalise(name: str) -> str:
    """Folder name -> comparison key: case, an ``im_`` prefix and punctuation do not matter."""
    name = name.strip().lower()
    name = name.removeprefix("im_")
    return re.sub(r"[^a-z0-9]", "", name)


def class_resolver(aliases: dict[str, tuple[str, ...]]) -> Callable[[str], str | None]:
    """A function mapping a raw folder name to a class name (None if it is no class): the class itself or
    one of its aliases, compared by :func:`normalise`."""
    table = {}
    for cls, names in aliases.items():
        for alias in (cls, *names):
            table[normalise(alias)] = cls
    return lambda folder: table.get(normalise(folder))


SPLIT_LISTS = "splits"  # <src>/splits/{train,val,test}.txt: the benchmark's lists of `relative/path label`
LISTED_IMAGES = "images"  # ... whose paths are relative to <src>/images/


def read_split_lists(src: Path, resolve: Callable[[str], str | None], dataset: str) -> list[tuple[Path, str, str]]:
    """(image, class, split) from ``<src>/splits/{train,val,test}.txt``, lines ``relative/path label`` (the path,
    relative to ``<src>/images``, may hold spaces; its first folder names the class)."""
    rows: list[tuple[Path, str, str]] = []
    for split in SPLITS:
        path = src / SPLIT_LISTS / f"{split}.txt"
        if not path.is_file():
            raise DatasetError(f"{path} not found: {dataset} split lists are {SPLIT_LISTS}/{{train,val,test}}.txt "
                               f"with lines `relative/path label` (paths under {src / LISTED_IMAGES})")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            rel, _, label = line.strip().rpartition(" ")
            cls = resolve(rel.split("/", 1)[0]) if rel else None
            if not rel or not label.lstrip("-").isdigit() or cls is None:
                raise DatasetError(f"{path} line {number}: expected `<class folder>/<file> <label>`, got {line!r}")
            image = src / LISTED_IMAGES / rel
            if not image.is_file():
                raise DatasetError(f"{path} line {number}: {image} not found; restore it or fix the list")
            rows.append((image, cls, split))
    return rows


def plan_download(src: Path, ratios, seed: int, dataset: str, aliases: dict[str, tuple[str, ...]],
                  group_of: Callable[[Path], str] | None = None) -> list[Planned]:
    """The plan of a download in one of three forms, tried in this order:

    * the benchmark's layout, ``<src>/images/<class>/...`` with ``<src>/splits/{train,val,test}.txt``: kept;
    * split folders ``<src>/{train,test}/<class>/...`` (and ``val/`` if present): kept, val drawn from train
      (seeded, by ``ratios``) when absent;
    * class folders anywhere under ``<src>``: split per class, seeded, by ``ratios``; grouped by ``group_of(image)``
      (patient, slide, source image) when the dataset's file names say it.
    """
    resolve, classes = class_resolver(aliases), tuple(aliases)
    if (src / SPLIT_LISTS).is_dir():
        return plan_official(read_split_lists(src, resolve, dataset))
    if (src / "train").is_dir() and (src / "test").is_dir():
        rows = []
        for split in SPLITS:
            if (src / split).is_dir():
                by_class, _ = scan_class_folders(src / split, resolve, classes, dataset)
                rows += [(f, c, split) for c, files in by_class.items() for f in files]
        planned = plan_official(rows)
        if not (src / "val").is_dir():
            train = [p for p in planned if p.split == "train"]
            share = ratios[1] / (ratios[0] + ratios[1])
            drawn = plan_stratified({c: [p.source for p in train if p.cls == c] for c in classes},
                                    (100 * (1 - share), 100 * share, 0.0), seed)
            val = {p.source for p in drawn if p.split == "val"}
            for p in train:
                p.split, p.given = ("val", False) if p.source in val else ("train", True)
        return planned
    by_class, stray = scan_class_folders(src, resolve, classes, dataset)
    warn_stray(stray, src, "outside the class folders")
    if group_of is None:
        return plan_stratified(by_class, ratios, seed)
    return plan_grouped([(f, c, group_of(f)) for c, files in by_class.items() for f in files], ratios, seed)


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
            rows.append((rel, p.origin or p.source.relative_to(src).as_posix(), p.cls, p.group))
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


def split_kind(plan: list[Planned]) -> str:
    """How a plan's split was made: "official" (the download's), "official test" (val drawn from its train) or
    "seeded" (this tool's draw)."""
    if plan and all(p.given for p in plan):
        return "official"
    if any(p.given for p in plan) and all(p.given for p in plan if p.split == "test"):
        return "official test"
    return "seeded"


def report(dataset: str, plan: list[Planned], classes: list[str], images_dir: Path, seed: int, ratios) -> dict:
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
        "split": split_kind(plan),
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
