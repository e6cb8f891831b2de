"""Classify new images with a finished run: its model, trained weights, method, preprocessing and classes.

    python -m utils.predict --run results/runs/folder/.../seed1-ab12cd34 --images new_cells/ --out predictions.csv
    python -m utils.predict --run RUN_FOLDER --images cells.csv     # a `path` column, relative to the CSV

Writes `path,pred,p_<class>...`: one row per image, the prediction and one probability per class, in the
run's class order, as the run's task defines them: single-label runs the most probable class and softmax
probabilities; multi-label runs the labels (joined by ';') whose sigmoid probability reaches the threshold
chosen on the run's validation set; image-text runs the class whose prompt the image matches best.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from common.errors import UserError, exit_status
from common.io import write_text_atomic
from datasets.layouts import IMAGE_EXTENSIONS, is_image_name
from engine.augment import normalise
from engine.features import cache_root
from engine.images import check_decodable, iterate_batches
from engine.results import RESULTS_FILE, read_results
from engine.trainer import autocast
from tasks import get_task
from utils.cli import open_run

DEFAULT_OUT = "predictions.csv"


def require_run(folder: str | Path) -> Path:
    """A finished run folder (one that holds results.json); UserError saying what to point at otherwise."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"run folder {folder} not found: point --run at a finished run folder (it holds "
                        f"{RESULTS_FILE})")
    if not (path / RESULTS_FILE).is_file():
        raise UserError(f"{folder} holds no {RESULTS_FILE}: point --run at a finished run folder")
    return path


def list_images(source: str | Path) -> list[tuple[str, str]]:
    """(path to read, name to report) of each image: every image file below a folder (recursive, sorted,
    named relative to it), the `path` column of a CSV (relative to the CSV's folder), or one image file."""
    source = Path(source).expanduser()
    if source.is_dir():
        found = sorted(
            (p.relative_to(source).as_posix(), p) for p in source.rglob("*")
            if p.is_file() and is_image_name(p.name)
            and not any(part.startswith(".") for part in p.relative_to(source).parts)
        )
        images = [(str(p), name) for name, p in found]
    elif source.suffix.lower() == ".csv" and source.is_file():
        images = _csv_images(source)
    elif source.is_file() and is_image_name(source.name):
        images = [(str(source), source.name)]
    else:
        raise UserError(f"--images {source} is not a folder, a CSV file or an image: give a folder of images or a "
                        "CSV with a `path` column")
    if not images:
        raise UserError(f"no images found in {source}: expected image files ("
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}) below a folder, or rows in a CSV's `path` column")
    return images


def _csv_images(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            if "path" not in columns:
                raise UserError(f"{path} has no `path` column (columns: {', '.join(columns) or 'none'}): give one "
                                "image path per row, relative to the CSV's folder")
            names = [(row.get("path") or "").strip() for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}): give a UTF-8 CSV with a `path` column") from None
    empty = [i + 2 for i, name in enumerate(names) if not name]  # line numbers, after the header
    if empty:
        raise UserError(f"{path} has an empty `path` on line(s) {', '.join(map(str, empty[:10]))}: fill or remove "
                        "those rows")
    return [(str(path.parent / name), name) for name in names]


@torch.no_grad()
def predict_paths(ctx, plan, paths: Sequence[str], batch_size: int | None = None,
                  num_workers: int | None = None, desc: str = "predict") -> torch.Tensor:
    """Probabilities (N, C), float32 on the CPU, of the run's classifier on the images at `paths`, through its
    task's activation (softmax for single-label runs, a sigmoid per label for multi-label runs; image-text
    runs through the class prompts).

    `ctx, plan` come from ``utils.cli.open_run``. Images are preprocessed as the run evaluated its
    test set (whole image resized bicubic to the input size, normalised), and a feature method's head
    sees float32 features, as in the run.
    """
    task = get_task(ctx.split.task)
    config, device = ctx.config, ctx.device
    batch_size = batch_size or config.batch_size
    workers = config.num_workers if num_workers is None else num_workers
    ctx.spec.model.to(device).eval()
    plan.model.to(device).eval()
    score = task.scorer(ctx, plan) if task.scorer else None
    mean, std, on_features = ctx.mean, ctx.std, plan.inputs == "features"
    batches = iterate_batches([(str(p), 0) for p in paths], ctx.spec.input_size, batch_size, workers)
    out = []
    for images, _ in tqdm(batches, total=-(-len(paths) // batch_size), desc=desc, unit="batch"):
        x = normalise(images.to(device), mean, std)
        with autocast(device, ctx.precision):
            if score is not None:
                x = score(x)
            elif on_features:
                x = ctx.spec.encode_image(x)
            else:
                x = plan.model(x)
        if on_features and score is None:
            x = plan.model(x.float())  # the head sees float32 features, as in the run
        out.append(activate(task.activation, x.float()).cpu())
    return torch.cat(out) if out else torch.zeros(0, len(ctx.split.classes))


def activate(activation: str, outputs: torch.Tensor) -> torch.Tensor:
    """The task's output activation: class probabilities (softmax) or per-label probabilities (sigmoid)."""
    return outputs.sigmoid() if activation == "sigmoid" else outputs.softmax(dim=1)


def predictions_csv(ctx, names: Sequence[str], probs: torch.Tensor) -> str:
    """The task's `path,pred,p_<class>...` text for these images (multi-label: the labels that reach the run's
    validation thresholds)."""
    record_path = Path(ctx.out) / RESULTS_FILE
    record = read_results(record_path) if record_path.is_file() else {}
    return get_task(ctx.split.task).predictions_csv(ctx, names, probs, record)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run folder (results.json, weights.safetensors)")
    p.add_argument("--images", required=True, help="a folder (every image below it) or a CSV with a `path` column")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"the CSV to write (default {DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--root_path", default=None, help="where the run's dataset lives on this machine, if it moved")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: the run's)")
    p.add_argument("--batch_size", type=int, default=None, help="images per batch (default: the run's)")
    p.add_argument("--num_workers", type=int, default=None, help="data-loader workers (default: the run's)")
    return p


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The open_run arguments that the command line changes: data root and device."""
    out = []
    for flag in ("root_path", "device"):
        if getattr(args, flag, None) is not None:
            out += [f"--{flag}", str(getattr(args, flag))]
    return out


def run(args: argparse.Namespace) -> int:
    """Check everything a user can get wrong, then load the run, predict and write the CSV."""
    folder = require_run(args.run)
    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists: add --overwrite to replace it, or choose another --out")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    images = list_images(args.images)
    paths = [path for path, _ in images]
    check_decodable(paths, cache_root().parent / "decodable.json")  # all bad files named at once
    ctx, plan = open_run(folder, run_overrides(args))
    probs = predict_paths(ctx, plan, paths, args.batch_size, args.num_workers)
    text = predictions_csv(ctx, [name for _, name in images], probs)
    write_text_atomic(out, text)
    counts = Counter(label for row in csv.DictReader(io.StringIO(text)) for label in row["pred"].split(";") if label)
    print(f"{len(images)} image(s): " + ", ".join(f"{c} {counts[c]}" for c in ctx.split.classes))
    print(f"predictions: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print `error: ...` and return 2."""
    args = _parser().parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
