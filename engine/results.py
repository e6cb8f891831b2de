"""results.json: the one module that builds, writes, reads and validates it; and predictions.csv.

Reading needs no torch, so the sweep and the report can check runs quickly.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from common.errors import UserError
from common.io import write_json_atomic, write_text_atomic

SCHEMA_VERSION = 2
RESULTS_FILE = "results.json"
EVAL_FILE = "eval_results.json"
PREDICTIONS_FILE = "predictions.csv"
SPLIT_FILE = "split.json"
PACKAGES = ("torch", "torchvision", "timm", "open_clip_torch", "peft", "transformers", "numpy", "scikit-learn")
REQUIRED = ("schema_version", "config", "method", "metrics")


class ResultsError(UserError):
    """A results.json that cannot be used."""


def git_commit() -> str | None:
    """The commit of the code that produced a result, with '+dirty' for uncommitted changes."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(device: str, precision: str) -> dict:
    """Library versions, hardware and code version, for the results file."""
    env = {"python": platform.python_version(), "platform": platform.platform(), **package_versions()}
    env["device"] = device
    if device.startswith("cuda"):
        import torch

        env["device_name"] = torch.cuda.get_device_name()
    env["precision"] = precision
    env["git_commit"] = git_commit()
    return env


def build_record(config: dict, **parts) -> dict:
    """The results.json document: schema version, the resolved config, then the run's parts in order."""
    record = {"schema_version": SCHEMA_VERSION, "method": config["method"],
              "method_settings": config["method_settings"], "experiment": config["experiment"],
              "preset": config["preset"], "dataset": config["dataset"], "model_name": config["model_name"],
              "seed": config["seed"], "shots": config["shots"], "percentage": config["percentage"],
              "lr": config["lr"], "config": config}
    record.update(parts)
    problem = validate(record)
    if problem:
        raise ValueError(f"results record {problem}")
    return record


def validate(data: object) -> str | None:
    """Why a parsed results.json cannot be used, or None."""
    if not isinstance(data, dict):
        return "is not a JSON object"
    for key in REQUIRED:
        if key not in data:
            return f"has no {key!r} field"
    if not isinstance(data["config"], dict) or "seed" not in data["config"]:
        return "has no config with a seed"
    headline = data.get("headline", "balanced_accuracy")
    for split in ("val", "test"):
        metrics = data["metrics"].get(split) if isinstance(data["metrics"], dict) else None
        if not isinstance(metrics, dict) or not isinstance(metrics.get(headline), (int, float)):
            return f"has no metrics.{split}.{headline}"
    return None


def write_results(path: str | Path, record: dict) -> Path:
    """Write a record atomically (last step of a run)."""
    return write_json_atomic(path, record)


def read_results(path: str | Path) -> dict:
    """Parse and validate one results.json; ResultsError naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ResultsError(f"{path} is not readable JSON ({type(exc).__name__}); delete it and rerun that run") \
            from None
    problem = validate(data)
    if problem:
        raise ResultsError(f"{path} {problem}; delete it and rerun that run")
    return data


def is_finished(folder: str | Path) -> bool:
    """A run is finished when its results.json exists and is valid."""
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        return False
    try:
        read_results(path)
    except ResultsError:
        return False
    return True


def write_predictions(path: str | Path, rows: list[tuple], classes: list[str], extra_columns=()) -> Path:
    """predictions.csv: split, path, label, pred, one probability column per class, in class order, and the
    task's extra columns (e.g. the decided node of a class tree); rows are (split, path, label, pred, probs,
    *extra values)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["split", "path", "label", "pred", *(f"p_{c}" for c in classes), *extra_columns])
    for split, image, label, pred, probs, *extra in rows:
        # 9 significant digits: a float32 probability read back is the one computed, so a tolerance means something
        writer.writerow([split, image, label, pred, *(format(p, ".9g") for p in probs), *extra])
    return write_text_atomic(path, buffer.getvalue())
