"""python -m models list | show KEY [--backbone B] [--weights W]: the registry and what a key loads."""

from __future__ import annotations

import argparse
import json
import sys

from common.errors import exit_status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the model keys and what they load")
    show = sub.add_parser("show", help="load a model and print its feature size, preprocessing and weights")
    show.add_argument("key", help="a model key, e.g. clip, uni, tiny_clip, timm:resnet50")
    show.add_argument("--backbone", default=None, help="for clip: ViT-B/16 (default), ViT-L/14 or ViT-B/32")
    show.add_argument("--weights", default=None, help="a local file or folder, or 'random'")
    return p


def run(args: argparse.Namespace) -> int:
    """List the registry or describe one model."""
    import models

    if args.command == "list":
        for entry in models.entries():
            print(f"{entry.label:20s} {entry.summary}")
        return 0
    spec = models.load_model(args.key, backbone=args.backbone, weights=args.weights)
    trainable, total = models.count_parameters(spec.model)
    print(json.dumps({**models.describe(spec), "parameters": total, "trainable": trainable}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print `error: ...` and return 2."""
    args = _parser().parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
