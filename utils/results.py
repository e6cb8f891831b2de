"""Writing results: the environment a run ran in."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

SCHEMA_VERSION = 1
_PACKAGES = ("torch", "torchvision", "timm", "open_clip_torch", "peft", "transformers", "numpy", "scikit-learn")


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


def environment(device: str, precision: str) -> dict:
    """Library versions, hardware and code version, for the results file."""
    env = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    env["device"] = device
    if device.startswith("cuda"):
        import torch

        env["device_name"] = torch.cuda.get_device_name()
    env["precision"] = precision
    env["git_commit"] = git_commit()
    return env
