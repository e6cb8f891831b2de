"""Evaluation of a run, by its task: metrics of val and test and one predictions.csv row per image."""

from __future__ import annotations

from engine.context import RunContext
from engine.prediction import PARTS, predict
from methods.registry import Plan
from tasks import Evaluation, get_task


def evaluate(ctx: RunContext, plan: Plan, parts: tuple[str, ...] = PARTS, extras: bool = True) -> Evaluation:
    """Metrics of `parts`, one prediction row per image, and what the task adds (``extras`` False: only the
    metrics, for validation during training). The task (``tasks/``) decides what is computed."""
    task = get_task(ctx.split.task)
    return task.evaluate(ctx, plan, lambda part, fn=None: predict(ctx, plan, part, fn), parts, extras)


def headline(ctx: RunContext) -> str:
    """The metric runs of this task are compared and selected on."""
    return get_task(ctx.split.task).headline


def task_loss(ctx: RunContext):
    """The loss of a classifier trained on this run's data (the task's)."""
    return get_task(ctx.split.task).loss(ctx)
