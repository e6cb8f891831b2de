"""What one long-lived process (a sweep worker) keeps across the runs it makes one after another.

A run made with a session (``engine.run.run(config, session)``) computes what the same run computes in a
process of its own; the session only saves work that does not depend on the run:

- models: each (model, backbone, weights) is built once and kept pristine; every run gets a copy of it
  (``copy.deepcopy``), so whatever a run injects, trains or moves (LoRA layers, fine-tuned weights, the
  device) never reaches the next run. Building leaves the global random streams untouched (the registry's
  builders seed their own), so a copied model is the model a fresh process builds.
- decoded images: every image is decoded once per input size (``engine.images.DecodedImages``) and served
  to the training batches and the evaluation of every later run on it.
- image checks: a file set already checked to decode (same path, size and modification time) is not read
  again.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from common.io import file_identity
from engine import images as img
from models import load_model
from models.spec import ModelSpec

# Pristine models kept at once: a sweep visits its models one after another (the grid's model axis is
# outside its shots, learning rates and seeds), so two cover the switch without holding every model.
KEPT_MODELS = 2
# Decoded images kept for later runs, at most (further ones are decoded for the run that asks, not kept).
IMAGE_BYTES = 8 * 1024**3


class DecodedImages:
    """Images decoded once per input size and kept for the later runs of one process (a sweep worker).

    A file is known by its path, size and modification time, so one changed on disk is decoded again. Past
    `max_bytes` further images are decoded for the run that asks and not kept.
    """

    def __init__(self, max_bytes: int = IMAGE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.decoded = 0  # images this cache has decoded
        self._kept: dict[tuple[str, int], tuple[tuple[int, int], torch.Tensor]] = {}

    def images(self, samples: Sequence[tuple[str, int]], size: int, num_workers: int = 0,
               desc: str | None = "decode") -> list[torch.Tensor]:
        """One (3, size, size) uint8 tensor per sample, decoding only the files not kept yet."""
        paths = [str(path) for path, _ in samples]
        stamps = {path: _stamp(path) for path in dict.fromkeys(paths)}
        missing = [path for path, stamp in stamps.items()
                   if stamp is None or self._kept.get((path, size), (None,))[0] != stamp]
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            decoded, _ = img.load_all([(path, 0) for path in missing], size, num_workers, desc)
            self.decoded += len(missing)
            for path, image in zip(missing, decoded, strict=True):
                fresh[path] = image
                self._keep(path, size, stamps[path], image)
        return [fresh[path] if path in fresh else self._kept[(path, size)][1] for path in paths]

    def _keep(self, path: str, size: int, stamp: tuple[int, int] | None, image: torch.Tensor) -> None:
        old = self._kept.pop((path, size), None)
        if old is not None:
            self.bytes -= old[1].numel()
        if stamp is not None and self.bytes + image.numel() <= self.max_bytes:
            self._kept[(path, size)] = (stamp, image.clone())  # its own storage, not a view of the decoded batch
            self.bytes += image.numel()


def _stamp(path: str) -> tuple[int, int] | None:
    """A file as this module remembers it: its size and modification time (None: unreadable)."""
    try:
        info = os.stat(path)
    except OSError:
        return None  # decoding says why
    return info.st_size, info.st_mtime_ns


class Session:
    """Models, decoded images and image checks kept by one process across the runs it makes."""

    def __init__(self, kept_models: int = KEPT_MODELS, image_bytes: int = IMAGE_BYTES):
        self.kept_models = kept_models
        self.images = DecodedImages(image_bytes)
        self._models: OrderedDict[tuple, ModelSpec] = OrderedDict()
        self._checked: set[tuple[str, int, int]] = set()  # (path, size, mtime) seen to decode
        self.builds = 0  # models built (not copied) by this session

    def model(self, key: str, backbone: str | None = None, weights: str | None = None) -> ModelSpec:
        """A fresh copy of the model `load_model(key, backbone, weights)` builds, built once per session."""
        ident = (key, backbone, weights, file_identity(weights))  # a local weights file changed on disk: rebuilt
        pristine = self._models.get(ident)
        if pristine is None:
            pristine = load_model(key, backbone=backbone, weights=weights)
            self.builds += 1
            self._models[ident] = pristine
            while len(self._models) > self.kept_models:
                self._models.popitem(last=False)
        self._models.move_to_end(ident)
        spec = copy.copy(pristine)
        spec.model = copy.deepcopy(pristine.model)
        return spec

    def check_decodable(self, paths: Sequence[str], cache_file: Path | None = None) -> None:
        """``engine.images.check_decodable`` for the files this session has not yet seen decode."""
        known = {path: (path, *stamp) for path in dict.fromkeys(paths) if (stamp := _stamp(path)) is not None}
        todo = [path for path in dict.fromkeys(paths) if known.get(path) not in self._checked]
        if todo:
            img.check_decodable(todo, cache_file)  # raises for a bad file: nothing is remembered then
        self._checked.update(known.values())

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Within the block, image batches and evaluations read this session's decoded images."""
        with img.sharing(self.images):
            yield
