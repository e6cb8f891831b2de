"""Decoding a split's images once into uint8 tensors at the model's input size."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.io import write_json_atomic
from common.seeding import seed_worker
from engine.distributed import quiet_unless_main

# Sets below this many bytes are decoded once and kept in memory for the whole run.
IN_MEMORY_BYTES = 2 * 1024**3


def decode_resized(path: str, size: int) -> torch.Tensor:
    """One image as a (3, size, size) uint8 tensor, resized with bicubic like the eval transform."""
    from datasets import load_image

    image = load_image(path).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class ResizedImages(Dataset):
    """A list of (path, label) read as uint8 tensors of one size."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int):
        self.samples = list(samples)
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        """(image, label, error): a decoding error travels as text, so that a data-loader worker
        hands it back as the one-line message it is rather than as a worker traceback."""
        from datasets import DatasetError

        path, label = self.samples[index]
        try:
            return decode_resized(path, self.size), torch.as_tensor(label), ""
        except DatasetError as exc:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), torch.as_tensor(label), str(exc)


def _raise_errors(errors) -> None:
    from datasets import DatasetError

    for message in errors:
        if message:
            raise DatasetError(message)


def _loader(dataset: Dataset, batch_size: int, num_workers: int, sampler=None) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None if sampler is not None else batch_size,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        persistent_workers=False,
    )


def fits_in_memory(n_images: int, size: int) -> bool:
    """Whether a split of n images at this size is kept decoded in memory."""
    return n_images * 3 * size * size <= IN_MEMORY_BYTES


def load_all(
    samples: Sequence[tuple[str, int]], size: int, num_workers: int = 0, desc: str | None = "decode"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image once: (N, 3, S, S) uint8 and (N,) int64 labels (`desc` None: no progress bar, for
    decoding inside another one)."""
    dataset = ResizedImages(samples, size)
    images = torch.empty((len(dataset), 3, size, size), dtype=torch.uint8)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    start = 0
    loader = _loader(dataset, batch_size=64, num_workers=num_workers)
    quiet = quiet_unless_main() if desc is not None else {"disable": True}
    for batch, _, errors in tqdm(loader, desc=desc, unit="batch", leave=False, **quiet):
        _raise_errors(errors)
        images[start : start + len(batch)] = batch
        start += len(batch)
    return images, labels


def iterate_batches(
    samples: Sequence[tuple[str, int]], size: int, batch_size: int, num_workers: int = 0,
    batches: Sequence[int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream a split in order as uint8 batches, for sets too large to keep in memory.

    With `batches`, only those batch numbers (0 = the first `batch_size` samples), in the given
    order: one process's share of an evaluation split across processes.
    """
    shared = _SHARED.get()
    if shared is not None and fits_in_memory(len(samples), size):
        yield from _shared_batches(shared, samples, size, batch_size, num_workers, batches)
        return
    dataset = ResizedImages(samples, size)
    if batches is None:
        loader = _loader(dataset, batch_size=batch_size, num_workers=num_workers)
    else:
        n = len(dataset)
        lists = [list(range(b * batch_size, min((b + 1) * batch_size, n))) for b in batches]
        loader = _loader(_BatchByIndex(dataset), batch_size=1, num_workers=num_workers, sampler=lists)
    for images, labels, errors in loader:
        _raise_errors(errors)
        yield images, torch.as_tensor(labels).long()


# A GPU keeps a decoded train set in its own memory when the set takes at most this share of the free memory.
DEVICE_SHARE = 0.25


def fits_on_device(nbytes: int, device: torch.device | None) -> bool:
    """Whether a decoded set of `nbytes` is kept on `device` (a GPU with room for it) rather than in host memory."""
    if device is None or device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_SHARE * free


class IndexedBatches:
    """Serves batches by explicit index lists, from memory or decoded on the fly.

    A set that fits in memory is decoded once; on a GPU with room for it, it is kept there (`images` and
    `labels` on the device), so that a training step indexes it without a host-to-device copy.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, num_workers: int = 0,
                 device: torch.device | None = None):
        self.samples = list(samples)
        self.size = size
        self.num_workers = num_workers
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        self.images: torch.Tensor | None = None
        if fits_in_memory(len(self.samples), size):
            self.images = _decode_all(self.samples, size, num_workers, desc="decode train")
            if fits_on_device(self.images.numel(), device):
                self.images, self.labels = self.images.to(device), self.labels.to(device)

    def __len__(self) -> int:
        return len(self.samples)

    def stream(self, index_lists: Iterator[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images, labels) for each list of indices, in order."""
        if self.images is not None:
            for idx in index_lists:
                ids = torch.as_tensor(idx, device=self.images.device)
                yield self.images[ids], self.labels[ids]
            return
        dataset = _BatchByIndex(ResizedImages(self.samples, self.size))
        loader = _loader(dataset, batch_size=1, num_workers=self.num_workers, sampler=index_lists)
        for images, labels, errors in loader:
            _raise_errors(errors)
            yield images, labels


class ImageSource(Protocol):
    """Decoded images kept by a long-lived process for its runs (``engine.session.DecodedImages``)."""

    def images(self, samples: Sequence[tuple[str, int]], size: int, num_workers: int = 0,
               desc: str | None = "decode") -> list[torch.Tensor]: ...


_SHARED: ContextVar[ImageSource | None] = ContextVar("shared_decoded_images", default=None)


@contextmanager
def sharing(cache: ImageSource) -> Iterator[None]:
    """Within the block, training batches and evaluation read their images through `cache` (decoded once
    per process instead of once per run)."""
    token = _SHARED.set(cache)
    try:
        yield
    finally:
        _SHARED.reset(token)


def _decode_all(samples: Sequence[tuple[str, int]], size: int, num_workers: int, desc: str) -> torch.Tensor:
    """load_all's images, read through the shared cache of decoded images when one is active."""
    shared = _SHARED.get()
    if shared is None:
        return load_all(samples, size, num_workers, desc)[0]
    return torch.stack(shared.images(samples, size, num_workers, desc))


def _shared_batches(
    shared: ImageSource, samples: Sequence[tuple[str, int]], size: int, batch_size: int, num_workers: int,
    batches: Sequence[int] | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """iterate_batches' batches, read through a shared cache of decoded images."""
    n = len(samples)
    numbers = range(-(-n // batch_size)) if batches is None else batches
    ranges = [range(b * batch_size, min((b + 1) * batch_size, n)) for b in numbers]
    wanted = sorted({i for r in ranges for i in r})
    decoded = shared.images([samples[i] for i in wanted], size, num_workers, desc=None)  # inside the caller's bar
    images = dict(zip(wanted, decoded, strict=True))
    for r in ranges:
        yield torch.stack([images[i] for i in r]), torch.tensor([samples[i][1] for i in r], dtype=torch.int64)


class _BatchByIndex(Dataset):
    """Dataset whose item is a whole batch, so a sampler of index lists drives the loader."""

    def __init__(self, base: ResizedImages):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        items = [self.base[i] for i in indices]
        images = torch.stack([im for im, _, _ in items])
        labels = torch.stack([label for _, label, _ in items]).long()
        return images, labels, [error for _, _, error in items]


# The image-check cache remembers images by the hash of their content (an image corrupted in place is checked
# again), with the day each was last seen; entries unseen for PRUNE_DAYS are dropped, and at most MAX_ENTRIES kept.
CACHE_VERSION = 2
PRUNE_DAYS = 90
MAX_ENTRIES = 2_000_000


def content_digest(path: str) -> str | None:
    """A hash of a file's bytes (None when it cannot be read; decoding it then says why)."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _read_cache(cache_file: Path | None) -> dict[str, int]:
    """digest -> day last seen; an unreadable or foreign cache counts as empty (it is rebuilt)."""
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    entries = data.get("decodable") if isinstance(data, dict) and data.get("version") == CACHE_VERSION else None
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, int)}


def _write_cache(cache_file: Path, entries: dict[str, int], today: int) -> None:
    recent = {k: day for k, day in entries.items() if today - day <= PRUNE_DAYS}
    if len(recent) > MAX_ENTRIES:
        recent = dict(sorted(recent.items(), key=lambda kv: kv[1])[-MAX_ENTRIES:])
    write_json_atomic(cache_file, {"version": CACHE_VERSION, "decodable": recent})


def check_decodable(paths: Sequence[str], cache_file: Path | None = None) -> None:
    """Decode every image once before a run builds its model; DatasetError listing all bad files at once.

    Images already seen to decode are remembered in `cache_file` by the hash of their content (not by path
    or modification time), so a second run over the same data decodes nothing again, and a file changed in
    place is checked again.
    """
    from concurrent.futures import ThreadPoolExecutor

    from datasets import DatasetError, load_image

    today = int(time.time() // 86400)
    known = _read_cache(cache_file)
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = dict(zip(unique, pool.map(content_digest, unique), strict=True))
    todo = [p for p in unique if digests[p] is None or digests[p] not in known]
    bad = []
    quiet = quiet_unless_main().get("disable", False)
    for path in tqdm(todo, desc="check images", unit="image", leave=False, disable=quiet or not todo):
        try:
            load_image(path)
        except DatasetError as exc:
            bad.append(f"{path} ({str(exc).split('(')[-1].split(';')[0].rstrip(')')})")
            digests[path] = None
    seen = {d for d in digests.values() if d is not None}
    if cache_file is not None and any(known.get(d) != today for d in seen):
        _write_cache(cache_file, {**known, **dict.fromkeys(seen, today)}, today)
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DatasetError(f"{len(bad)} image(s) cannot be read: {shown}. Replace or remove them, then rerun")
