"""Command line of the data layer: ``python -m datasets summary|prepare ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.errors import exit_status
from datasets import prepare as prep
from datasets.assign import DEFAULT_RATIOS
from datasets.errors import DatasetError
from datasets.images import load_image
from datasets.layouts import DATASET_NAMES, HICERVIX_LEVELS, SPLITS
from datasets.split import load_split

PREPARABLE = ("mlcc", "bcfc", "sipakmed", "hicervix", "folder")


def build_parser() -> argparse.ArgumentParser:
    """The ``summary`` and ``prepare`` sub-commands."""
    parser = argparse.ArgumentParser(prog="python -m datasets", description="Dataset tools of cytology-lora.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("summary", help="print a split's classes, counts per class and SHA-256 as JSON")
    s.add_argument("--root_path", default="", help="dataset root (not needed for demo)")
    s.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    s.add_argument("--shots", type=int, default=16, help="K per class, -1 for all, 0 with --pourcentage")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument(
        "--level", default=None, choices=HICERVIX_LEVELS, help="HiCervix label level (default level_3)"
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
        description=prep.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", choices=PREPARABLE)
    p.add_argument("--src", required=True, help="the unpacked raw download (never modified)")
    p.add_argument("--dst", default=None, help="dataset root to write (not used for hicervix)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val/test assignment (default 0)")
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
        "--manifest", default=None, help="folder only: CSV path,label,group (paths relative to --src)"
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
    )
    if args.decode:
        for name in SPLITS:
            for path, _ in split.items(name):
                load_image(path)
    if args.manifest_out:
        split.write_manifest(args.manifest_out)
    return {
        "classes": split.classes,
        "counts": split.counts(),
        "split_sha256": split.sha256,
        "left_out": split.left_out,
    }


def prepare(args: argparse.Namespace) -> dict:
    """Run the preparation of ``args.dataset``."""
    if args.manifest and args.dataset != "folder":
        raise DatasetError(f"--manifest applies to `prepare folder` only, not to {args.dataset}")
    if args.dataset == "hicervix":
        return prep.check_hicervix(Path(args.src))
    if not args.dst:
        raise DatasetError(f"--dst is required for `prepare {args.dataset}`: the dataset root to write")
    if args.dataset == "folder":
        manifest = Path(args.manifest) if args.manifest else None
        return prep.prepare_folder(
            Path(args.src), Path(args.dst), args.seed, args.ratios, args.overwrite, manifest
        )
    return prep.prepare_paper(
        args.dataset, Path(args.src), Path(args.dst), args.seed, args.ratios, args.overwrite
    )


def print_prepare_report(report: dict) -> None:
    """Human-readable report of ``prepare``."""
    if report["dataset"] == "hicervix":
        print(f"HiCervix at {report['root']} is complete: images {json.dumps(report['images'])}")
        for level, per_class in report["counts"].items():
            print(
                f"\n{level}: {report['classes'][level]} classes, "
                f"{report['left_out'][level]} image(s) without a label"
            )
            print(prep.format_counts(per_class))
        return
    print(prep.format_counts(report["counts"]))
    if "groups" in report:
        print(f"groups per split: {json.dumps(report['groups'])}")
    print(
        f"copied {report['images']} images to {report['written_to']} (seed {report['seed']}, "
        f"ratios {'/'.join(f'{r:g}' for r in report['ratios'])}); the source was not modified"
    )


def run(args: argparse.Namespace) -> int:
    """Run one parsed sub-command."""
    if args.command == "summary":
        print(json.dumps(summary(args), indent=2))
    else:
        report = prepare(args)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_prepare_report(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; user mistakes print one line and return 2."""
    args = build_parser().parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
