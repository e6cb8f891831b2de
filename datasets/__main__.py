"""Command line of the data layer: ``python -m datasets summary|prepare ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.errors import exit_status
from datasets import prepare as prep
from datasets.base import DEFAULT_RATIOS, PrepareRequest
from datasets.images import load_image
from datasets.layouts import SPLITS
from datasets.registry import dataset_names, dataset_setting_fields, get_dataset
from datasets.split import load_split

NAMED_SETTINGS = ("level", "level_fallback", "protocol")  # load_split's own parameters; other settings go by name


def preparable() -> tuple[str, ...]:
    """Registered datasets that have a ``prepare`` step."""
    return tuple(n for n in dataset_names() if get_dataset(n).prepare is not None)


def prepare_description() -> str:
    """The prepare sub-command's help: the shared rules, then one line per dataset from its preparer."""
    ratios = "/".join(f"{r:g}" for r in DEFAULT_RATIOS)
    lines = [prep.__doc__.strip(), "", f"Where a download comes without its own split, each class is split, "
             f"stratified and seeded, with the default ratios {ratios} percent (--ratios).", "", "Per dataset:"]
    for name in preparable():
        info = get_dataset(name)
        doc = (info.prepare.__doc__ or "").strip().splitlines()
        lines.append(f"  {name}: {doc[0] if doc else info.how_to_prepare} -> {info.layout}")
    return "\n".join(lines)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per dataset setting (from the registry's settings dataclasses), None meaning its default."""
    for name, (f, takers) in dataset_setting_fields().items():
        parser.add_argument(f"--{name}", default=None,
                            help=f"{f.metadata.get('help', '')} [{', '.join(takers)}]")
    if "level" not in dataset_setting_fields():
        parser.add_argument("--level", default=None, help="label level of a dataset with levels")


def build_parser() -> argparse.ArgumentParser:
    """The ``summary`` and ``prepare`` sub-commands."""
    parser = argparse.ArgumentParser(prog="python -m datasets", description="Dataset tools of cytology-lora.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("summary", help="print a split's classes, counts per class and SHA-256 as JSON")
    s.add_argument("--root_path", default="", help="dataset root (not needed for demo)")
    s.add_argument("--dataset", required=True, choices=dataset_names())
    s.add_argument("--shots", type=int, default=16, help="K per class, -1 for all, 0 with --pourcentage")
    s.add_argument("--seed", type=int, default=1)
    add_setting_flags(s)
    s.add_argument(
        "--label_map", default=None, help="merge classes: new=old1,old2;other=old3 or a JSON file {new: [old...]}"
    )
    pct = s.add_mutually_exclusive_group()
    pct.add_argument(
        "--pourcentage",
        "--percentage",
        dest="percentage",
        type=float,
        default=None,
        help="with --shots 0: percent of each class kept in train and val",
    )
    s.add_argument("--manifest_out", default=None, help="also write the split's manifest (JSON) to this file")
    s.add_argument("--decode", action="store_true", help="also decode every image of the split (slow)")

    ratios = "/".join(f"{r:g}" for r in DEFAULT_RATIOS)
    p = sub.add_parser(
        "prepare",
        help="turn a raw download into the layout the readers expect",
        description=prepare_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", choices=preparable())
    p.add_argument("--src", required=True, help="the unpacked raw download (never modified); csv: the manifest CSV")
    p.add_argument("--dst", default=None, help="dataset root to write (not used for hicervix)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the train/val/test assignment where the download has no split (default 0)")
    p.add_argument(
        "--ratios",
        type=float,
        nargs=3,
        default=list(DEFAULT_RATIOS),
        metavar=("TRAIN", "VAL", "TEST"),
        help=f"train/val/test percentages per class (default {ratios})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a destination written by prepare before")
    p.add_argument(
        "--manifest",
        default=None,
        help="folder only: CSV path,label,group (paths relative to --src; default <src>/manifest.csv if present)",
    )
    p.add_argument(
        "--columns", default=None, help="csv only: comma-separated columns to keep besides path (default all)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    return parser


def summary(args: argparse.Namespace) -> dict:
    """Load the split and describe it."""
    split = load_split(
        args.root_path or None,
        args.dataset,
        shots=args.shots,
        seed=args.seed,
        level=args.level,
        percentage=args.percentage,
        level_fallback=getattr(args, "level_fallback", None),
        protocol=getattr(args, "protocol", None),
        label_map=args.label_map,
        settings={name: getattr(args, name) for name in dataset_setting_fields() if name not in NAMED_SETTINGS},
    )
    if args.decode:
        for name in SPLITS:
            for path, _ in split.items(name):
                load_image(path)
    if args.manifest_out:
        split.write_manifest(args.manifest_out)
    return {
        "task": split.task,
        "classes": split.classes,
        # multi-label: positives per label; images per split below
        "counts": split.counts(),
        "images": split.sizes(),
        "split_sha256": split.sha256,
        "left_out": split.left_out,
    }


def prepare(args: argparse.Namespace) -> dict:
    """Run the preparation of ``args.dataset``."""
    request = PrepareRequest(
        src=Path(args.src),
        dst=Path(args.dst) if args.dst else None,
        seed=args.seed,
        ratios=tuple(args.ratios),
        overwrite=args.overwrite,
        manifest=Path(args.manifest) if args.manifest else None,
        columns=[c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None,
    )
    return get_dataset(args.dataset).prepare(request)


def print_prepare_report(report: dict) -> None:
    """Human-readable report of ``prepare``."""
    if "left_out" in report:  # a check in place (hicervix): counts per level, nothing written
        print(f"HiCervix at {report['root']} is complete: images {json.dumps(report['images'])}")
        for level, per_class in report["counts"].items():
            print(
                f"\n{level}: {report['classes'][level]} classes, "
                f"{report['left_out'][level]} image(s) without a label"
            )
            print(prep.format_counts(per_class))
        return
    print(prep.format_counts(report["counts"]))
    if "task" in report:  # CSV tables written (csv): nothing copied
        print(
            f"wrote {report['written_to']}/{{train,val,test}}.csv: {report['task']} data, "
            f"{report['images']} images {json.dumps(report['split_images'])}"
        )
        return
    if "groups" in report:
        print(f"groups per split: {json.dumps(report['groups'])}")
    how = {"official": "the download's own split",
           "official test": f"the download's own train/test split, val drawn from train with seed {report['seed']}"
           }.get(report.get("split"), f"seed {report['seed']}, ratios {'/'.join(f'{r:g}' for r in report['ratios'])}")
    print(f"copied {report['images']} images to {report['written_to']} ({how}); the source was not modified")


def run(args: argparse.Namespace) -> int:
    """Run one parsed sub-command."""
    if args.command == "summary":
        print(json.dumps(summary(args), indent=2, ensure_ascii=False))
    else:
        report = prepare(args)
        if args.json:
            print(json.dumps(report, indent=2, ensure_ascii=False))
        else:
            print_prepare_report(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; user mistakes print one line and return 2."""
    args = build_parser().parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
