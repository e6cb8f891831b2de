"""Batch streams of a training stage: feature rows, or uint8 images augmented on the device."""

from __future__ import annotations

from collections import deque

import torch

from engine import distributed as dist
from engine import images as img
from engine.augment import augment_batch_seeded, normalise
from engine.context import RunContext
from engine.trainer import batch_indices
from methods.registry import Stage


def stage_batches(ctx: RunContext, stage: Stage):
    """(batches(start), prepare) for a stage: this process's slice of each global batch (all of it
    without torchrun) of feature rows, or of uint8 images augmented on the device with per-sample seeds."""
    c = ctx.config
    if stage.inputs == "features":
        x, y = ctx.features("train")
        if stage.targets is not None:
            y = torch.as_tensor(stage.targets)

        def feature_batches(start: int):
            for idx in batch_indices(len(y), c.batch_size, c.seed, start, c.drop_last):
                shard = dist.shard_batch(idx)
                ids = torch.as_tensor(shard.indices)
                yield x[ids], y[ids], shard

        return feature_batches, lambda x, seeds: x
    items = ctx.split.train
    if stage.targets is not None:
        items = [(path, target) for (path, _), target in zip(items, stage.targets, strict=True)]
    data = img.IndexedBatches(items, ctx.spec.input_size, c.num_workers)
    mean, std = ctx.mean, ctx.std

    def image_batches(start: int):
        shards: deque[dist.Shard] = deque()
        indices = dist.shard_batches(batch_indices(len(data), c.batch_size, c.seed, start, c.drop_last), shards)
        for images, labels in data.stream(indices):
            yield images, labels, shards.popleft()

    if stage.augment:
        return image_batches, lambda x, seeds: augment_batch_seeded(x, mean, std, seeds)
    return image_batches, lambda x, seeds: normalise(x, mean, std)
