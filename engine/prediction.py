"""Outputs of a run's classifier on one part of the split (every image once, also under torchrun)."""

from __future__ import annotations

import torch

from engine import distributed as dist
from engine import images as img
from engine.augment import normalise
from engine.context import RunContext
from engine.trainer import collect_batches
from methods.registry import Plan

PARTS = ("val", "test")


@torch.no_grad()
def predict(ctx: RunContext, plan: Plan, part: str, fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32) and labels of the plan's classifier on one part of the split (or the outputs of
    `fn`, a forward of the plan's model, on images)."""
    model = plan.model
    if plan.inputs == "features":
        x, y = ctx.features(part)
        model.eval()
        return torch.cat([model(chunk.to(ctx.device)).float().cpu() for chunk in x.split(4096)]), y
    c = ctx.config
    samples = ctx.split.items(part)
    mean, std = ctx.mean, ctx.std

    def compute(numbers: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = img.iterate_batches(samples, ctx.spec.input_size, c.batch_size, c.num_workers, batches=numbers)
        return collect_batches(fn or model, model, batches, lambda x: normalise(x, mean, std), ctx.device,
                               ctx.precision, len(numbers), desc=f"eval {part}")

    # under torchrun each process evaluates every N-th batch; all of them get every image, in order
    return dist.gather_outputs(compute, -(-len(samples) // c.batch_size))
