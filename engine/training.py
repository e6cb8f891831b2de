"""Training a plan: each stage in order through the trainer, resumable, with validation during training."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common.errors import UserError
from engine import distributed as dist
from engine.batches import stage_batches
from engine.config import RunConfig, fingerprint
from engine.context import RunContext
from engine.evaluate import evaluate, headline, task_loss
from engine.trainer import CHECKPOINT_FILE, Trainer, TrainSettings, TrainStats
from engine.weights import trained_state
from methods.registry import Plan, Stage


def _train_settings(c: RunConfig, ctx: RunContext, stage: Stage) -> TrainSettings:
    return TrainSettings(lr=stage.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps,
                         total_steps=stage.steps, min_lr=c.min_lr, seed=c.seed, device=ctx.device,
                         precision=ctx.precision, checkpoint_every=c.checkpoint_every, compile=c.compile,
                         schedule=stage.schedule, cycle_steps=c.n_iters,
                         full_batch=min(c.batch_size, len(ctx.split.train)))

def train(ctx: RunContext, plan: Plan, tracker) -> tuple[list[dict], int]:
    """Run every stage in order, each resumable from its own checkpoint.

    Returns one record per stage and the number of parameters that received a gradient.
    """
    records, touched = [], {}
    for i, stage in enumerate(plan.stages):
        name = CHECKPOINT_FILE if len(plan.stages) == 1 else f"checkpoint-{stage.name}.pt"
        settings = _train_settings(ctx.config, ctx, stage)
        trainer = Trainer(stage.module, settings, ctx.out, fingerprint(ctx.config), checkpoint_name=name,
                          extra_loss=stage.extra_loss, loss_fn=stage.loss or task_loss(ctx),
                          forward_targets=stage.targets is not None)
        validation = Validation.of(ctx, plan, stage, tracker)
        if validation is not None:
            trainer.extra_state = validation.state  # kept in the checkpoint: a resumed run selects the same
        if trainer.try_resume() and dist.is_main():
            print(f"resuming {stage.name} from step {trainer.step} of {stage.steps}", file=sys.stderr)
        batches, prepare = stage_batches(ctx, stage)
        stats = trainer.fit(batches, prepare, log=tracker.log, desc=f"train {stage.name}", after_step=validation)
        record = _stage_record(stage, stats)
        if validation is not None:
            record["validation"] = validation.finish()
        if i < len(plan.stages) - 1:
            trainer.save_checkpoint()  # a finished stage is not trained again when the run resumes
        for p in stage.module.parameters():
            if p.grad is not None:
                touched[id(p)] = p.numel()
        records.append(record)
    return records, sum(touched.values())

class Validation:
    """Validation during one stage: the headline metric on val every `every` steps and at the last step
    (the curve), and with --select best_val the trained state of the best step, restored when the stage
    ends (the first best step wins ties). Its state travels in the stage's checkpoint."""

    def __init__(self, ctx: RunContext, plan: Plan, stage: Stage, every: int, keep_best: bool, tracker):
        self.ctx, self.plan, self.stage, self.every, self.keep_best, self.tracker = (
            ctx, plan, stage, every, keep_best, tracker)
        self.state: dict = {"curve": [], "best_step": None, "best_score": None, "best_state": None, "seconds": 0.0}

    @classmethod
    def of(cls, ctx: RunContext, plan: Plan, stage: Stage, tracker) -> Validation | None:
        c = ctx.config
        keep_best = c.select == "best_val"
        if not (keep_best or c.eval_every) or not ctx.split.val or stage.steps < 1:
            if keep_best and not ctx.split.val:
                raise UserError("--select best_val needs validation images, and this split has none")
            return None
        return cls(ctx, plan, stage, c.eval_every or max(stage.steps // 10, 1), keep_best, tracker)

    def __call__(self, step: int) -> None:
        if step % self.every and step != self.stage.steps:
            return
        t0 = time.perf_counter()
        evaluation = evaluate(self.ctx, self.plan, parts=("val",), extras=False)
        score = evaluation.metrics["val"].get(headline(self.ctx))
        score = None if score is None or score != score else float(score)  # NaN: not comparable
        self.state["curve"].append([step, score])
        self.tracker.log({f"val/{headline(self.ctx)}": score}, step)
        best = self.state["best_score"]
        if self.keep_best and score is not None and (best is None or score > best):
            # a copy: on the CPU trained_state's tensors are the live parameters
            best = {name: value.clone() for name, value in trained_state(self.plan.model).items()}
            self.state.update(best_step=step, best_score=score, best_state=best)
        self.state["seconds"] += time.perf_counter() - t0

    def finish(self) -> dict:
        """Restore the best state (with --select best_val) and describe the validation for results.json."""
        s = self.state
        if self.keep_best and s["best_state"] is not None:
            self.plan.model.load_state_dict(s["best_state"], strict=False)
        return {"metric": headline(self.ctx), "every": self.every, "curve": s["curve"],
                "selected_step": s["best_step"] if self.keep_best else self.stage.steps,
                "selected_val": s["best_score"] if self.keep_best else (s["curve"][-1][1] if s["curve"] else None),
                "seconds": round(s["seconds"], 3)}

def _stage_record(stage: Stage, stats: TrainStats) -> dict:
    return {"name": stage.name, "inputs": stage.inputs, "steps": stage.steps, "lr": stage.lr,
            "train_seconds": round(stats.train_seconds, 3), "images_per_second": round(stats.images_per_second, 2),
            "steps_run": stats.steps, "resumed_from_step": stats.resumed_from}

def remove_checkpoints(out: Path) -> None:
    for path in out.glob("checkpoint*.pt"):
        path.unlink(missing_ok=True)
