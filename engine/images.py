"""Decoding a split's images once into uint8 tensors at the model's input size."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

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
    samples: Sequence[tuple[str, int]], size: int, num_workers: int = 0, desc: str = "decode"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image once: (N, 3, S, S) uint8 and (N,) int64 labels."""
    dataset = ResizedImages(samples, size)
    images = torch.empty((len(dataset), 3, size, size), dtype=torch.uint8)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    start = 0
    loader = _loader(dataset, batch_size=64, num_workers=num_workers)
    for batch, _, errors in tqdm(loader, desc=desc, unit="batch", leave=False, **quiet_unless_main()):
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


class IndexedBatches:
    """Serves batches by explicit index lists, from memory or decoded on the fly."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, num_workers: int = 0):
        self.samples = list(samples)
        self.size = size
        self.num_workers = num_workers
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        self.images: torch.Tensor | None = None
        if fits_in_memory(len(self.samples), size):
            self.images, _ = load_all(self.samples, size, num_workers, desc="decode train")

    def __len__(self) -> int:
        return len(self.samples)

    def stream(self, index_lists: Iterator[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images, labels) for each list of indices, in order."""
        if self.images is not None:
            for idx in index_lists:
                ids = torch.as_tensor(idx)
                yield self.images[ids], self.labels[ids]
            return
        dataset = _BatchByIndex(ResizedImages(self.samples, self.size))
        loader = _loader(dataset, batch_size=1, num_workers=self.num_workers, sampler=index_lists)
        for images, labels, errors in loader:
            _raise_errors(errors)
            yield images, labels


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


def _stamp(path: str) -> str:
    st = os.stat(path)
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def check_decodable(paths: Sequence[str], cache_file: Path | None = None) -> None:
    """Decode every image once before a run builds its model; DatasetError listing all bad files at once.

    Files already seen to decode (same path, size and modification time) are remembered in
    `cache_file`, so a second run over the same data checks nothing again.
    """
    from datasets import DatasetError, load_image

    known: set[str] = set()
    if cache_file is not None and cache_file.is_file():
        try:
            known = set(json.loads(cache_file.read_text()))
        except (OSError, ValueError):
            known = set()
    todo = [p for p in dict.fromkeys(paths) if _stamp_or_none(p) not in known]
    bad, good = [], []
    quiet = quiet_unless_main().get("disable", False)
    for path in tqdm(todo, desc="check images", unit="image", leave=False, disable=quiet or not todo):
        try:
            load_image(path)
            good.append(_stamp(path))
        except DatasetError as exc:
            bad.append(f"{path} ({str(exc).split('(')[-1].split(';')[0].rstrip(')')})")
    if cache_file is not None and good:
        write_json_atomic(cache_file, sorted(known | set(good)))
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DatasetError(f"{len(bad)} image(s) cannot be read: {shown}. Replace or remove them, then rerun")


def _stamp_or_none(path: str) -> str | None:
    try:
        return _stamp(path)
    except OSError:
        return None
