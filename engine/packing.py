"""Packed runs: runs that share a frozen backbone train together, one forward over their concatenated batches.

Runs whose ``pack_key`` agree (same model, weights, data, method settings, precision and device; other
seeds, learning rates, shots, folds or budgets) are prepared and built one after the other exactly as
``engine.run.run`` prepares and builds them (the same seeded initialisation), then their frozen tensors are
made one storage. Each step, every run draws its own batch, augmentation and dropout streams, the batches
are concatenated, the frozen computation runs once (``lora.packed``), and each run's loss is the mean over
its own slice; the step minimises their sum, so each run's gradients are those it gets alone, and each run
steps its own AdamW, schedule and gradient scaler (its own ``engine.trainer.Trainer``). A run that reaches
its step budget leaves the pack and is evaluated and written at once; its folder, checkpoints, weights,
predictions and results.json are those ``engine.run.run`` writes, with ``packed: {"runs": N}`` added.

What differs from a run alone is only floating-point rounding in the frozen products over more rows (see
tests/test_packing.py for the measured differences). Packing runs in one process, eagerly: runs under
torchrun, with --compile, --wandb or --eval_only, and methods whose registry entry is not ``packable``
run alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from common.errors import UserError, exit_status
from engine import distributed as dist
from engine import guard
from engine import results as res
from engine.batches import stage_batches
from engine.config import RunConfig, computing_settings, fingerprint
from engine.context import RunContext, prepare_context
from engine.evaluate import evaluate, task_loss
from engine.record import build_record, summary
from engine.run import run as run_alone
from engine.tracking import Tracker
from engine.trainer import (
    CHECKPOINT_FILE,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
    TrainStats,
    _catch_signals,
    autocast,
    dropout_seed,
    freeze_batchnorm,
    sample_seeds,
)
from engine.training import Validation, _stage_record, _train_settings, remove_checkpoints
from engine.weights import save_weights
from lora.packed import Pack, RandomStream, pack_problem, packed_forward
from methods import get_method
from methods.registry import Plan, check_task

# Settings that may differ between the runs of one pack: what each run draws, how long and how fast it
# learns, and where it writes. Everything else (model, weights, data, method settings, precision, device)
# must agree, so that the frozen computation is the same for all of them.
PER_RUN_FIELDS = frozenset({
    "seed", "shots", "percentage", "cv", "fold", "lr", "n_iters", "n_iters_from", "weight_decay", "warmup_steps",
    "min_lr", "batch_size", "drop_last", "select", "eval_every", "pos_weight", "preset", "experiment", "warnings",
})


def pack_key(config: RunConfig) -> str | None:
    """The key runs that can train packed share (equal keys: one pack), or None when `config` runs alone."""
    method = get_method(config.method)
    if not (method.packable and method.trains) or config.eval_only or config.compile or config.wandb:
        return None
    shared = {k: v for k, v in computing_settings(config).items() if k not in PER_RUN_FIELDS}
    shared["device"] = config.device
    return json.dumps(shared, sort_keys=True, default=str)


def run_packed(configs: Sequence[RunConfig], max_pack: int | None = None) -> list[int]:
    """Run every config, packing those with the same ``pack_key`` (at most `max_pack` per pack; 1: none).

    Returns one exit status per config, in order: 0 done (or already finished), 2 a user mistake printed as
    ``error: ...`` on stderr (the other runs go on). A run that cannot be packed runs alone through
    ``engine.run.run``, with the same results. SIGINT/SIGTERM during packed training saves every unfinished
    run's checkpoint and raises TrainingInterrupted (calling again with the same configs resumes them all).
    """
    codes: list[int | None] = [None] * len(configs)
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        key = None if dist.active() or (max_pack is not None and max_pack < 2) else pack_key(config)
        groups.setdefault(key if key is not None else f"alone-{i}", []).append(i)
    size = max(max_pack or len(configs), 1)
    for indices in groups.values():
        for start in range(0, len(indices), size):
            chunk = indices[start:start + size]
            if len(chunk) == 1:
                codes[chunk[0]] = exit_status(lambda c=configs[chunk[0]]: run_alone(c))
                continue
            for i, code in zip(chunk, _run_pack([configs[i] for i in chunk]), strict=True):
                codes[i] = code
    return [int(code) for code in codes]


@dataclass
class _Member:
    """One run of a pack: its context, plan, trainer and streams, and how far it got."""

    config: RunConfig
    ctx: RunContext
    plan: Plan
    trainer: Trainer
    validation: Validation | None
    batches: Iterator
    prepare: object
    stream: RandomStream
    held: contextlib.ExitStack
    start: int = 0
    images: int = 0
    loss: float = float("nan")
    code: int = 0
    extra: dict = field(default_factory=dict)


def _run_pack(configs: list[RunConfig]) -> list[int]:
    """Prepare, train packed, evaluate and write the runs of one pack; their exit statuses."""
    codes = [0] * len(configs)
    members: dict[int, _Member] = {}
    alone: list[int] = []
    try:
        for i, config in enumerate(configs):
            host = next(iter(members.values()), None)
            member, codes[i] = _prepared(config, host)
            if member is _ALONE:
                alone.append(i)
            elif member is not None:
                members[i] = member
        if len(members) > 1:
            _train(list(members.values()), len(members))
        elif members:  # the others finished or failed: the last one is a run alone, resumed from its state
            _train(list(members.values()), 1)
        for i, member in members.items():
            codes[i] = member.code
    finally:
        for member in members.values():
            member.held.close()
    for i in alone:
        codes[i] = exit_status(lambda c=configs[i]: run_alone(c))
    return codes


_ALONE = object()  # _prepared's answer for a run whose built plan cannot be packed


def _prepared(config: RunConfig, host: _Member | None) -> tuple[object, int]:
    """(the run ready to train in the pack, or None when there is nothing to do, or _ALONE; exit status)."""
    held = contextlib.ExitStack()
    try:
        member = _prepare(config, host, held)
    except UserError as exc:
        held.close()
        print(f"error: {exc}", file=sys.stderr)
        return None, 2
    except BaseException:
        held.close()
        raise
    if not isinstance(member, _Member):
        held.close()
    return member, 0


def _prepare(config: RunConfig, host: _Member | None, held: contextlib.ExitStack) -> object:
    """engine.run.run's preparation of one run, with its frozen tensors made those of `host`."""
    method = get_method(config.method)
    ctx = prepare_context(config)
    if ctx is None or not held.enter_context(guard.owning_run_folder(ctx)):
        return None
    check_task(method, ctx.split.task)
    plan = method.build(ctx, method.resolve(config.method_settings))
    problem = _plan_problem(plan)
    if problem is None and host is not None:
        problem = _share_frozen(host.plan.model, plan.model)
    if problem is not None:
        print(f"note: {ctx.out} trains alone ({problem})", file=sys.stderr)
        return _ALONE
    plan.model.to(ctx.device)
    guard.check_room(ctx, plan)
    if config.overwrite:
        remove_checkpoints(ctx.out)
    stage = plan.stages[0]
    trainer = Trainer(stage.module, _train_settings(config, ctx, stage), ctx.out, fingerprint(config),
                      checkpoint_name=CHECKPOINT_FILE, extra_loss=stage.extra_loss,
                      loss_fn=stage.loss or task_loss(ctx))
    validation = Validation.of(ctx, plan, stage, Tracker())
    if validation is not None:
        trainer.extra_state = validation.state  # kept in the checkpoint, as alone
    if trainer.try_resume():
        print(f"resuming {ctx.out} from step {trainer.step} of {stage.steps}", file=sys.stderr)
    batches, prepare = stage_batches(ctx, stage)
    return _Member(config, ctx, plan, trainer, validation, batches(trainer.step), prepare, RandomStream(ctx.device),
                   held, start=trainer.step)


def _plan_problem(plan: Plan) -> str | None:
    """Why a built plan cannot train in a pack (one image stage training its classifier), or None."""
    if len(plan.stages) != 1:
        return f"{len(plan.stages)} training stages"
    stage = plan.stages[0]
    if stage.module is not plan.model or stage.inputs != "images" or stage.targets is not None:
        return "its stage does not train its classifier on labelled images"
    return pack_problem(plan.model)


def _share_frozen(host: torch.nn.Module, model: torch.nn.Module) -> str | None:
    """Point `model`'s frozen parameters and buffers at `host`'s (which must hold the same values)."""
    mine = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    theirs = {**dict(host.named_parameters()), **dict(host.named_buffers())}
    if mine.keys() != theirs.keys():
        return "its model differs from the pack's"
    frozen = [(t, theirs[n]) for n, t in mine.items() if not t.requires_grad]
    for tensor, shared in frozen:
        if tensor.shape != shared.shape or not torch.equal(tensor.detach().to(shared.device), shared.detach()):
            return "its frozen weights differ from the pack's"
    for tensor, shared in frozen:
        tensor.data = shared.data
    return None


# -- training -------------------------------------------------------------------------------------


def _train(members: list[_Member], size: int) -> None:
    """Train the members together until each has its steps; each is finished (evaluated, written) as it ends."""
    active = list(members)
    for m in active:
        _train_mode(m)
    t0 = time.perf_counter()
    for m in active:
        m.trainer._t0, m.trainer._images_now = t0, 0  # checkpoints add this attempt's time and images
    progress = tqdm(total=max(m.trainer.s.total_steps for m in active), desc=f"train {size} packed", unit="step",
                    leave=False, **dist.quiet_unless_main())
    try:
        with _catch_signals() as received:
            while active:
                for m in [m for m in active if m.trainer.step >= m.trainer.s.total_steps]:
                    active.remove(m)
                    m.code = exit_status(lambda m=m: _finish(m, size))
                if not active:
                    break
                _step(active, members)
                progress.update(1)
                if received:
                    paths = [m.trainer.save_checkpoint() for m in active]
                    raise TrainingInterrupted(active[0].trainer.step, received[0], paths[0])
                for m in active:
                    every = m.trainer.s.checkpoint_every
                    if every > 0 and m.trainer.step % every == 0 and m.trainer.step < m.trainer.s.total_steps:
                        m.trainer.save_checkpoint()
    finally:
        progress.close()


def _train_mode(m: _Member) -> None:
    m.trainer.module.train()
    freeze_batchnorm(m.trainer.module)


def _step(active: list[_Member], members: list[_Member]) -> None:
    """One optimiser step of every active run, their batches through one packed forward."""
    device, precision = active[0].ctx.device, active[0].ctx.precision
    inputs, labels, shards = [], [], []
    for m in active:
        x, y, shard = next(m.batches)
        t = m.trainer
        m.stream.seed(dropout_seed(t.s.seed, t.step, dist.rank()))  # what Trainer does to the global generator
        with m.stream.drawing():
            inputs.append(m.prepare(x.to(device, non_blocking=True), sample_seeds(t.s.seed, t.step, shard.first,
                                                                                 len(y))))
        labels.append(y.to(device, non_blocking=True))
        shards.append(shard)
    pack = Pack([m.stream for m in active], [len(y) for y in labels])
    with packed_forward([m.plan.model for m in active], pack) as host, autocast(device, precision):
        logits = host(torch.cat(inputs) if len(inputs) > 1 else inputs[0])
    losses, reported = [], []
    for m, out, y, shard in zip(active, logits.split(pack.counts), labels, shards, strict=True):
        t = m.trainer
        task = t.loss_fn(out.float(), y)
        extra = t.extra_loss(t.module) if t.extra_loss is not None else None
        losses.append(task * shard.weight + (0.0 if extra is None else extra))
        reported.append(task.detach() * shard.weight + (0.0 if extra is None else extra.detach()))
    values = torch.stack(reported).tolist()  # one host sync for every run's NaN check
    stepping = []
    for m, loss, value, shard in zip(list(active), losses, values, shards, strict=True):
        if not math.isfinite(value):
            active.remove(m)
            m.code = exit_status(lambda m=m, value=value: _diverged(m, value))
            m.held.close()
            continue
        m.loss = value
        m.trainer.optimizer.zero_grad(set_to_none=True)
        stepping.append((m, m.trainer.scaler.scale(loss), shard))
    if not stepping:
        return
    torch.stack([loss for _, loss, _ in stepping]).sum().backward()
    for m, _, shard in stepping:
        t = m.trainer
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.scheduler.step()
        t.step += 1
        m.images += shard.total
        t._images_now = m.images
        if m.validation is not None:
            m.validation(t.step)
            _train_mode(m)


def _diverged(m: _Member, value: float) -> int:
    raise TrainingDiverged(f"the loss became {value} at step {m.trainer.step + 1}: lower the learning rate "
                           f"(--lr {m.trainer.s.lr:g} now) or use --precision fp32")


def _finish(m: _Member, size: int) -> int:
    """engine.run.run's end of one run: weights, evaluation, predictions, results.json (with ``packed``)."""
    ctx, plan, t = m.ctx, m.plan, m.trainer
    stats = TrainStats(t.step - m.start, t._images_before + m.images, t._seconds_so_far(), m.loss, m.start)
    stage = _stage_record(plan.stages[0], stats)
    if m.validation is not None:
        stage["validation"] = m.validation.finish()
    trainable = sum(p.numel() for p in t.module.parameters() if p.grad is not None)
    ctx.out.mkdir(parents=True, exist_ok=True)
    save_weights(ctx, plan, ctx.out)  # before evaluation: a failed evaluation keeps the trained state
    evaluation = evaluate(ctx, plan)
    ctx.split.write_manifest(ctx.out / res.SPLIT_FILE)
    res.write_predictions(ctx.out / res.PREDICTIONS_FILE, evaluation.rows, evaluation.columns)
    packed = {"runs": size} if size > 1 else None
    record = build_record(ctx, plan, evaluation.metrics, [stage], trainable, packed=packed, **evaluation.extra)
    path = res.write_results(ctx.out / res.RESULTS_FILE, record)
    remove_checkpoints(ctx.out)
    summary(ctx, evaluation, path, [stage])
    m.held.close()  # the folder's lock: this run is done
    return 0


__all__ = ["PER_RUN_FIELDS", "pack_key", "run_packed"]
