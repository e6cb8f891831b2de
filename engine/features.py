"""Frozen image features, extracted once per (model, weights, images, preprocessing) and cached."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.io import atomic_write, file_identity
from engine import distributed as dist
from engine import images as img
from engine.augment import normalise
from engine.trainer import collect_batches


def cache_root() -> Path:
    """$CYTOLORA_CACHE/features, else ~/.cache/cytology-lora/features."""
    base = os.environ.get("CYTOLORA_CACHE") or Path.home() / ".cache" / "cytology-lora"
    return Path(base) / "features"


def cache_key(spec, backbone: str | None, samples: Sequence[tuple[str, int]], precision: str = "fp32") -> str:
    """Hash of everything that determines the features of these images, including the precision they
    were computed in and the versions of the libraries that compute them."""
    from engine.results import package_versions

    versions = package_versions()
    payload = {
        "precision": precision,
        "libraries": {name: versions.get(name) for name in ("torch", "open_clip_torch", "timm", "transformers")},
        "model": spec.key,
        "backbone": backbone,
        "weights": file_identity(spec.weights),
        "preprocessing": [spec.input_size, list(spec.mean), list(spec.std), "resize-bicubic"],
        "images": [[str(Path(p).resolve()), Path(p).stat().st_mtime_ns, label] for p, label in samples],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_cached(path: Path) -> dict | None:
    """A cache file's tensors; None when it is absent or not a readable safetensors file of features (it is
    then computed again and replaced)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError):
        return None
    return tensors if {"features", "labels"} <= set(tensors) else None


def extract_features(
    spec,
    samples: Sequence[tuple[str, int]],
    device: torch.device,
    precision: str,
    batch_size: int,
    num_workers: int,
    backbone: str | None = None,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 features and (N,) labels, from the cache when present.

    Under torchrun the batches are shared out across processes and gathered, so every process
    gets all the features; only rank 0 writes the cache.
    """
    path = cache_root() / f"{cache_key(spec, backbone, samples, precision)}.safetensors"
    tensors = _read_cached(path)
    if dist.all_agree(tensors is not None):  # one decision for all ranks: they must run the same collectives
        return tensors["features"], tensors["labels"]
    mean = torch.tensor(spec.mean, device=device)
    std = torch.tensor(spec.std, device=device)
    n_batches = -(-len(samples) // batch_size)

    def compute(numbers: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = img.iterate_batches(samples, spec.input_size, batch_size, num_workers, batches=numbers)
        return collect_batches(spec.encode_image, spec.model, batches, lambda x: normalise(x, mean, std), device,
                               precision, len(numbers), desc)

    features, labels = dist.gather_outputs(compute, n_batches)
    tensors = {"features": features.contiguous(), "labels": labels.contiguous()}
    if dist.is_main():
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return features, labels
