"""python -m models list | show KEY [--backbone B] [--weights W]: the registry and what a key loads."""

from __future__ import annotations

import argparse
import json
import sys

from common.errors import exit_status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the model keys and their capabilities (nothing is built or downloaded)")
    show = sub.add_parser("show", help="load a model and print its feature size, preprocessing and weights")
    show.add_argument("key", help="a model key, e.g. clip, uni, tiny_clip, timm:resnet50")
    show.add_argument("--backbone", default=None, help="for clip: ViT-B/16 (default), ViT-L/14 or ViT-B/32")
    show.add_argument("--weights", default=None, help="a local file or folder, or 'random'")
    return p


def run(args: argparse.Namespace) -> int:
    """List the registry or describe one model."""
    import models

    if args.command == "list":
        print(list_table())
        return 0
    spec = models.load_model(args.key, backbone=args.backbone, weights=args.weights)
    trainable, total = models.count_parameters(spec.model)
    print(json.dumps({**models.describe(spec), "parameters": total, "trainable": trainable}, indent=2))
    return 0


COLUMNS = ("model", "backbone", "features", "input", "mean / std", "text", "attention (image / text)", "weights")


def list_table() -> str:
    """One row per key and backbone, from the registry's declared capabilities only."""
    from models.registry import entries

    rows = [COLUMNS]
    for entry in entries():
        if entry.namespace or entry.capabilities is None:
            rows.append((entry.label, "", "", "", "", "", "", entry.summary))
            continue
        facts = entry.capabilities if entry.backbones else {"": entry.capabilities}
        for backbone, f in facts.items():
            attention = f"{f.attention} / {f.text_attention}" if f.has_text else f.attention
            stats = f"{_short(f.mean)} / {_short(f.std)}"
            weights = f.weights + (" (gated)" if f.gated else "")
            rows.append((entry.key, backbone, str(f.feature_dim), str(f.input_size), stats,
                         "yes" if f.has_text else "no", attention, weights))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
                     for row in rows)


def _short(values: tuple[float, ...]) -> str:
    """Channel statistics to 3 decimals, one number when all channels agree."""
    text = [f"{v:.3f}" for v in values]
    return text[0] if len(set(text)) == 1 else ",".join(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print `error: ...` and return 2."""
    args = _parser().parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
