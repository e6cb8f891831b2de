"""The run's record (results.json) and the short summary printed at its end."""

from __future__ import annotations

from pathlib import Path

import torch

from engine import distributed as dist
from engine import results as res
from engine.config import budget_record
from engine.context import DEMO_BANNER, RunContext, class_warnings, synthetic
from engine.evaluate import headline
from methods.registry import Plan
from tasks import Evaluation, get_task


def build_record(ctx: RunContext, plan: Plan, metrics: dict, stages: list[dict], trainable: int,
                 packed: dict | None = None, **extra) -> dict:
    """results.json of a run; `packed` ({"runs": N}) when it trained packed with others (engine.packing)."""
    split = ctx.split
    if packed is not None:
        extra["packed"] = packed
    total = sum(p.numel() for p in {id(p): p for p in _all_parameters(ctx, plan)}.values())
    return res.build_record(
        ctx.config.to_dict(),
        level=split.level, synthetic_demo=synthetic(ctx.config),
        model={"key": ctx.spec.key, "weights": ctx.spec.weights, "feature_dim": ctx.spec.feature_dim,
               "input_size": ctx.spec.input_size},
        classes=list(split.classes), n_train=len(split.train), n_val=len(split.val), n_test=len(split.test),
        left_out=getattr(split, "left_out", 0), split_sha256=split.sha256,
        warnings=[*ctx.config.warnings, *class_warnings(split)], budget=budget_record(ctx.config, stages),
        task=split.task, headline=headline(ctx),
        trainable_params=trainable, total_params=total, metrics=metrics, stages=stages,
        timing={"train_seconds": round(sum(s["train_seconds"] for s in stages), 3),
                "train_steps": sum(s["steps_run"] for s in stages),
                "images_per_second": _mean_rate(stages),
                "resumed_from_step": stages[-1]["resumed_from_step"] if stages else 0},
        method_notes=plan.notes, env=res.environment(str(ctx.device), ctx.precision),
        world_size=dist.world_size(), per_process_batch=-(-ctx.config.batch_size // dist.world_size()),
        peak_gpu_memory_bytes=torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None,
        **extra,
    )

def _all_parameters(ctx: RunContext, plan: Plan):
    yield from ctx.spec.model.parameters()
    yield from plan.model.parameters()

def _mean_rate(stages: list[dict]) -> float:
    seconds = sum(s["train_seconds"] for s in stages)
    images = sum(s["images_per_second"] * s["train_seconds"] for s in stages)
    return round(images / seconds, 2) if seconds > 0 else 0.0

def _text(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"

def summary(ctx: RunContext, evaluation: Evaluation, path: Path, stages: list[dict]) -> None:
    """A short human summary on stdout."""
    shown = [(k, n) for k, n in get_task(ctx.split.task).summary
             if any(k in m for m in evaluation.metrics.values())]
    before = evaluation.extra.get("before_finetuning", {})
    for part in ("val", "test"):
        for m, when in ((before.get(part), "before fine-tuning"), (evaluation.metrics.get(part), "")):
            if m:
                values = "  ".join(f"{name} {_text(m.get(key))}" for key, name in shown)
                print(f"{part:>4}: {values}  (n={m['n']}{', ' + when if when else ''})")
    for s in stages:
        if s["steps_run"]:
            print(f"train {s['name']}: {s['steps_run']} steps in {s['train_seconds']:.1f} s "
                  f"({s['images_per_second']:.1f} images/s)")
    print(f"results: {path}")
    if synthetic(ctx.config):
        print(DEMO_BANNER)
