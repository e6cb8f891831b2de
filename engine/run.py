"""The run pipeline, once for every method: the stages of the data-flow picture in order.

    prepare_context (split, model, checks) -> method.build (a Plan) -> train (stages) -> save_weights
    -> evaluate (by the task) -> record (results.json, predictions.csv, split.json)

A method (``methods/``) returns a Plan: the classifier to evaluate and the stages that train it.
Each stage lives in its own module of this package; this one only sequences them.
"""

from __future__ import annotations

import contextlib
import os
import time

from common.errors import UserError
from engine import distributed as dist
from engine import guard
from engine import results as res
from engine.config import RunConfig
from engine.context import RunContext, prepare_context, resolve_device
from engine.evaluate import evaluate
from engine.record import build_record, summary
from engine.session import Session
from engine.tracking import Tracker, start_tracking
from engine.training import remove_checkpoints, train
from engine.weights import load_weights, save_weights
from methods import get_method
from methods.registry import Plan
from methods.registry import check_task as check


def run(config: RunConfig, session: Session | None = None) -> int:
    """One run of any method, from settings to results.json.

    Under torchrun every process runs this: all of them train and evaluate their share, rank 0
    alone writes files and prints, and the others wait for it at barriers. A `session` (a sweep worker's)
    lends the run the model, decoded images and image checks it keeps across runs; the results are the same.
    """
    method = get_method(config.method)
    if config.eval_only and not method.trains:
        raise UserError(f"--eval_only reloads trained weights, and --method {method.name} trains nothing: "
                        "run it without --eval_only")
    with dist.process_group(resolve_device(config.device).type), _silent_unless_main(), \
            contextlib.ExitStack() as held:
        if session is not None:
            held.enter_context(session.serving())
        ctx = dist.main_first(lambda: prepare_context(config, session))  # downloads and caches once
        if ctx is None:
            return 0
        if not config.eval_only and not held.enter_context(guard.owning_run_folder(ctx)):  # writable, locked
            return 0
        ctx.device = dist.device_of_rank(ctx.device)
        check_task(method, ctx)
        plan = method.build(ctx, method.resolve(config.method_settings))
        plan.model.to(ctx.device)
        if config.eval_only:
            return _eval_only(ctx, plan)
        guard.check_room(ctx, plan)  # free space for the checkpoints, before any training
        with dist.main_writes() as writer:
            if writer and config.overwrite:
                remove_checkpoints(ctx.out)
        tracker = start_tracking(config.wandb, config.to_dict(), ctx.out, ctx.out.as_posix()) if dist.is_main() \
            else Tracker()
        stages, trainable = train(ctx, plan, tracker)
        with dist.main_writes() as writer:
            if writer:
                ctx.out.mkdir(parents=True, exist_ok=True)
                if plan.stages:
                    save_weights(ctx, plan, ctx.out)  # before evaluation: a failed evaluation keeps the trained state
        evaluation = evaluate(ctx, plan)
        with dist.main_writes() as writer:
            if writer:
                ctx.split.write_manifest(ctx.out / res.SPLIT_FILE)
                res.write_predictions(ctx.out / res.PREDICTIONS_FILE, evaluation.rows, evaluation.columns,
                                    evaluation.extra_columns)
                record = build_record(ctx, plan, evaluation.metrics, stages, trainable, **evaluation.extra)
                path = res.write_results(ctx.out / res.RESULTS_FILE, record)
                remove_checkpoints(ctx.out)
                tracker.results(record)  # val/test metrics, confusion matrix and per-class recall tables
                tracker.finish()
                summary(ctx, evaluation, path, stages)
    return 0

@contextlib.contextmanager
def _silent_unless_main():
    """Ranks other than 0 print nothing (rank 0 says the same); their errors still propagate."""
    if dist.is_main():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield

def _eval_only(ctx: RunContext, plan: Plan) -> int:
    """Reload a run's trained weights, evaluate, and write eval_results.json and predictions beside them."""
    out = ctx.out / res.EVAL_FILE
    if out.exists() and not ctx.config.overwrite:
        raise UserError(f"{out} exists: add --overwrite to replace it")
    load_weights(ctx, plan, ctx.out)
    t0 = time.perf_counter()
    evaluation = evaluate(ctx, plan)
    with dist.main_writes() as writer:
        if writer:
            res.write_predictions(ctx.out / f"eval_{res.PREDICTIONS_FILE}", evaluation.rows, evaluation.columns,
                                    evaluation.extra_columns)
            path = res.write_results(out, build_record(ctx, plan, evaluation.metrics, [], 0, eval_only=True,
                                                  eval_seconds=round(time.perf_counter() - t0, 3),
                                                  **evaluation.extra))
            summary(ctx, evaluation, path, [])
    return 0

def check_task(method, ctx: RunContext) -> None:
    check(method, ctx.split.task)

def load_run(config: RunConfig) -> tuple[RunContext, Plan]:
    """A finished run's context and classifier with its trained weights loaded, in eval mode.

    `config` is the run's own configuration (``--eval_only --run FOLDER``, parsed by the application
    that asks: ``utils.cli.open_run``). Methods that train nothing rebuild their classifier from the
    run's train features, so the data must be reachable.
    """
    method = get_method(config.method)
    ctx = prepare_context(config)
    plan = method.build(ctx, method.resolve(config.method_settings))
    plan.model.to(ctx.device)
    if method.trains:
        load_weights(ctx, plan, ctx.out)
    plan.model.eval()
    return ctx, plan
