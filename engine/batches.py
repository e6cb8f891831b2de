"""Batch streams of a training stage: feature rows, or uint8 images augmented on the device.

Data that fits is kept on the training device (features always, decoded images when they fit): each step then
indexes it there with the batch's sample indices, which are the same as engine.trainer.batch_indices draws,
so no step waits on a data loader, a host-side copy or a device-to-host transfer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch

from engine import distributed as dist
from engine import images as img
from engine.augment import augment_batch_seeded, crop_flip_params_seeded, normalise, random_resized_crop_flip
from engine.context import RunContext
from engine.trainer import batch_indices, batch_slices
from methods.registry import Stage

Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor, dist.Shard]]]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait for the device (pinned, non-blocking on a GPU)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def resident_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, drop_last: bool) -> Batches:
    """batches(start) over rows of `x` and `y` (on the training device): this rank's slice of each global batch,
    indexed on their device with the batch's sample indices (each epoch's order moved there once)."""
    device = x.device
    shards: dict[int, tuple[dist.Shard, int, int]] = {}  # batch length -> (shard, first, stop) within the batch

    def shard_of(length: int) -> tuple[dist.Shard, int, int]:
        if length not in shards:
            # positions within the batch; an empty slice is a stand-in row whose loss weighs nothing
            shard = dist.shard_batch(range(length))
            shards[length] = (shard, shard.indices[0], shard.indices[-1] + 1)
        return shards[length]

    def batches(start: int):
        host_order, order = None, None
        for epoch_order, first, stop in batch_slices(len(y), batch_size, seed, start, drop_last):
            if epoch_order is not host_order:
                host_order, order = epoch_order, to_device(epoch_order, device)
            shard, lo, hi = shard_of(stop - first)
            ids = order[first + lo:first + hi]
            yield x.index_select(0, ids), y.index_select(0, ids), shard

    return batches


def stage_batches(ctx: RunContext, stage: Stage):
    """(batches(start), prepare) for a stage: this process's slice of each global batch (all of it
    without torchrun) of feature rows, or of uint8 images augmented on the device with per-sample seeds."""
    c = ctx.config
    if stage.inputs == "features":
        x, y = ctx.features("train")
        if stage.targets is not None:
            y = torch.as_tensor(stage.targets)
        x, y = to_device(x, ctx.device), to_device(y, ctx.device)
        return resident_batches(x, y, c.batch_size, c.seed, c.drop_last), lambda x, seeds: x
    items = ctx.split.train
    if stage.targets is not None:
        items = [(path, target) for (path, _), target in zip(items, stage.targets, strict=True)]
    data = img.IndexedBatches(items, ctx.spec.input_size, c.num_workers, device=ctx.device)
    mean, std = ctx.mean, ctx.std
    if data.images is not None:
        batches = resident_batches(data.images, data.labels, c.batch_size, c.seed, c.drop_last)
    else:
        def batches(start: int):
            shards: deque[dist.Shard] = deque()
            indices = dist.shard_batches(batch_indices(len(data), c.batch_size, c.seed, start, c.drop_last), shards)
            for images, labels in data.stream(indices):
                yield images, labels, shards.popleft()

    if stage.augment:
        return batches, augmenter(mean, std, ctx.device)
    return batches, lambda x, seeds: normalise(x, mean, std)


def augmenter(mean: torch.Tensor, std: torch.Tensor, device: torch.device):
    """prepare(images, seeds): engine.augment.augment_batch_seeded, with the crops (drawn on the CPU from each
    sample's seed) sent to a GPU without a blocking copy."""
    if device.type != "cuda":
        return lambda x, seeds: augment_batch_seeded(x, mean, std, seeds)

    def prepare(x: torch.Tensor, seeds) -> torch.Tensor:
        if len(seeds) != x.shape[0]:
            raise ValueError(f"need one seed per image: got {len(seeds)} seeds for {x.shape[0]} images")
        params = crop_flip_params_seeded(seeds, size=x.shape[-2:])
        return random_resized_crop_flip(normalise(x, mean, std), to_device(params, x.device))

    return prepare
