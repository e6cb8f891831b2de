"""Steps per second of a feature-space stage (a linear head on cached features) through the engine's own path.

The features, the batch stream (engine.batches.stage_batches) and the trainer (engine.trainer.Trainer) are
the ones a run uses; only the split and the model are stand-ins (random features of the given width).

    python benchmarks/feature_steps.py                      # one CPU thread, width 512, batch 32, 25 x 16 rows
    python benchmarks/feature_steps.py --device cuda --threads 0 --steps 20000

On a busy machine the steps per CPU-second (this process's CPU time) show what one idle core would give; the
bare PyTorch loop beside it is the floor the engine is measured against.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.batches import stage_batches  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.context import RunContext  # noqa: E402
from engine.trainer import Trainer, TrainSettings  # noqa: E402
from methods.registry import Stage  # noqa: E402


def feature_context(rows: int, width: int, classes: int, batch: int, device: torch.device) -> RunContext:
    """A run context whose train features are `rows` random rows of `width` (no model, no images)."""
    config = RunConfig(method="linear", batch_size=batch, seed=1, device=device.type)
    split = SimpleNamespace(train=[(f"{i}.png", i % classes) for i in range(rows)], classes=list(range(classes)),
                            task="single_label")
    ctx = RunContext(config=config, out=Path(tempfile.gettempdir()), split=split, spec=None, device=device,
                     precision="fp32")
    g = torch.Generator().manual_seed(0)
    ctx._features["train"] = (torch.randn(rows, width, generator=g), torch.arange(rows) % classes)
    return ctx


def steps_per_second(ctx: RunContext, steps: int) -> tuple[float, float]:
    """Train a fresh linear head for `steps` steps through stage_batches and the trainer: steps per second of
    wall time and per second of this process's CPU time (what one idle core would give on a busy machine)."""
    torch.manual_seed(0)
    x, _ = ctx.features("train")
    head = nn.Linear(x.shape[1], len(ctx.split.classes)).to(ctx.device)
    stage = Stage("linear", head, "features", steps, 1e-3)
    c = ctx.config
    settings = TrainSettings(lr=stage.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps,
                             total_steps=steps, min_lr=c.min_lr, seed=c.seed, device=ctx.device, precision="fp32",
                             checkpoint_every=0)
    trainer = Trainer(head, settings, None, "benchmark")
    batches, prepare = stage_batches(ctx, stage)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(batches, prepare)
    return steps / (time.perf_counter() - t0), steps / (time.process_time() - c0)


def bare_steps_per_second(ctx: RunContext, steps: int) -> tuple[float, float]:
    """The floor: the same optimisation in a bare PyTorch loop (index, forward, loss, backward, AdamW, schedule),
    without the engine (no checkpoints, seeds, progress, NaN check)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    x, y = (t.to(ctx.device) for t in ctx.features("train"))
    head = nn.Linear(x.shape[1], len(ctx.split.classes)).to(ctx.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=ctx.config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    order = torch.randperm(len(y), device=ctx.device)
    per_epoch, b = -(-len(y) // ctx.config.batch_size), ctx.config.batch_size
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        ids = order[(step % per_epoch) * b:(step % per_epoch + 1) * b]
        loss = F.cross_entropy(head(x.index_select(0, ids)), y.index_select(0, ids))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    return steps / (time.perf_counter() - t0), steps / (time.process_time() - c0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=25)
    p.add_argument("--rows", type=int, default=400, help="train rows (25 classes x 16 shots by default)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3, help="best of this many timed runs (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    ctx = feature_context(a.rows, a.width, a.classes, a.batch, device)
    steps_per_second(ctx, min(a.steps, 500))  # warm-up: allocator, kernels, lazy imports
    engine, bare = [], []
    for _ in range(a.repeats):  # interleaved, so that a busy machine weighs on both alike
        engine.append(steps_per_second(ctx, a.steps))
        bare.append(bare_steps_per_second(ctx, a.steps))
    best = {"engine": max(engine), "bare": max(bare)}
    figures = {"device": str(device), "threads": torch.get_num_threads(), "width": a.width, "batch": a.batch,
               "classes": a.classes, "rows": a.rows, "steps": a.steps, "torch": torch.__version__,
               "steps_per_second": best["engine"][0], "steps_per_cpu_second": best["engine"][1],
               "bare_loop_steps_per_second": best["bare"][0], "bare_loop_steps_per_cpu_second": best["bare"][1]}
    print(f"feature stage (linear head {a.width} -> {a.classes}, batch {a.batch}, {a.rows} rows) on {device}, "
          f"{figures['threads']} thread(s), best of {a.repeats} x {a.steps} steps:")
    for name, label in (("engine", "engine (stage_batches + Trainer.fit)"), ("bare", "bare PyTorch loop (floor)")):
        wall, cpu = best[name]
        print(f"  {label:40s} {wall:8,.0f} steps/s wall   {cpu:8,.0f} steps per CPU-second")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
