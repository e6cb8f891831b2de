"""The run sequence, once for every method: context, split, model, method, trainer, evaluation, results.

A method (``methods/``) returns a Plan: the classifier to evaluate and the stages that train
it. Everything else (data, features, the training loop, checkpoints, saving, reloading with
--eval_only, metrics, results.json, predictions.csv) happens here, the same way for all.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import UserError
from common.io import atomic_write
from common.seeding import seed_everything
from engine import distributed as dist
from engine import images as img
from engine import results as res
from engine.augment import augment_batch_seeded, normalise
from engine.config import RunConfig, fingerprint, model_label, run_dir
from engine.tracking import Tracker, start_tracking
from engine.trainer import (
    CHECKPOINT_FILE,
    Trainer,
    TrainSettings,
    TrainStats,
    batch_indices,
    collect_batches,
    steps_per_epoch,
)
from evaluation.metrics import compute_metrics, hierarchical_metrics
from methods import get_method
from methods.registry import Plan, Stage, settings_dict

WEIGHTS_FILE = "weights.safetensors"
# the metric runs are compared on (captions: recall@1 averaged over image-to-text and text-to-image)
HEADLINE = {"single_label": "balanced_accuracy", "multilabel": "macro_auroc", "captions": "recall@1"}
DEMO_BANNER = (
    "SYNTHETIC DEMO: generated cell images and a small randomly initialised model, run offline. "
    "The numbers show that the pipeline learns; they are not a medical result."
)


# -- devices ------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """auto = cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """auto = bf16 on GPUs that support it, fp16 (with loss scaling) on older ones, fp32 elsewhere."""
    if name != "auto":
        if name != "fp32" and device.type == "cpu":
            return name if name == "bf16" else "fp32"
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


# -- the context a method builds from -----------------------------------------------------
@dataclass
class RunContext:
    """What a method sees: settings, split, model, device; frozen features on demand; step budgets."""

    config: RunConfig
    out: Path
    split: object
    spec: object
    device: torch.device
    precision: str
    _features: dict = field(default_factory=dict, repr=False)

    @property
    def model_label(self) -> str:
        return model_label(self.config)

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.spec.mean, device=self.device)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.spec.std, device=self.device)

    def features(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen backbone features and labels of one part of the split (cached on disk and here)."""
        if part not in self._features:
            from engine.features import extract_features

            c = self.config
            self.spec.model.to(self.device).eval()
            self._features[part] = extract_features(
                self.spec, self.split.items(part), self.device, self.precision, c.batch_size, c.num_workers,
                c.backbone, desc=f"features {part}")
        return self._features[part]

    def epoch_steps(self, warmup_epochs: bool = False) -> int:
        """Warmup plus n_iters epochs of the train set (the linear probe's budget).

        ``warmup_epochs``: warmup + n_iters whole epochs instead, as the original code's experiment 1
        counts its 50 warmup steps in epochs (``--compat seed``).
        """
        c = self.config
        per_epoch = steps_per_epoch(len(self.split.train), c.batch_size, c.drop_last)
        if warmup_epochs:
            return (c.warmup_steps + c.n_iters) * per_epoch
        return c.warmup_steps + c.n_iters * per_epoch

    def probe_steps(self) -> int:
        """The linear probe's budget (the paper's experiment 1): epoch_steps, or with --compat seed the
        original code's warmup + n_iters whole epochs."""
        return self.epoch_steps(warmup_epochs=self.config.compat == "seed")

    def paper_steps(self) -> int:
        """The paper's LoRA budget: warmup + n_iters x K steps few-shot, n_iters epochs otherwise.

        K is the largest number of train images actually drawn for a class, which is smaller than
        --shots when every class has fewer images than asked.
        """
        c = self.config
        if c.shots > 0:
            # image-text pairs without classes are one class: K pairs in all
            drawn = max(self.split.counts()["train"].values(), default=len(self.split.train))
            if drawn < c.shots:
                print(f"note: no class has {c.shots} train images (at most {drawn}); the step budget uses "
                      f"K = {drawn}", file=sys.stderr)
            return c.warmup_steps + c.n_iters * max(min(c.shots, drawn), 1)
        return self.epoch_steps()


def _synthetic(config: RunConfig) -> bool:
    from datasets import get_dataset

    return get_dataset(config.dataset).synthetic


def load_data(config: RunConfig):
    """The run's split, checked against --num_classes."""
    from datasets import load_split

    split = load_split(config.root_path or None, config.dataset, shots=config.shots, seed=config.seed,
                       level=config.level, percentage=config.percentage, protocol=config.protocol,
                       level_fallback=config.level_fallback or "original", label_map=config.label_map,
                       cv=config.cv, fold=config.fold, replacement=config.compat == "seed")
    if config.num_classes is not None and config.num_classes != len(split.classes):
        raise UserError(
            f"--num_classes {config.num_classes} disagrees with the data: {config.dataset} has "
            f"{len(split.classes)} classes ({', '.join(split.classes)}); drop the flag or fix it"
        )
    return split


def _cache_dir() -> Path:
    from engine.features import cache_root

    return cache_root().parent


def class_warnings(split) -> list[str]:
    """Classes too thin to support a conclusion: fewer than 2 train images, or none in test."""
    counts = split.counts()
    out = [f"class {name!r} has {n} train image(s): its metrics rest on almost nothing"
           for name, n in counts["train"].items() if n < 2]
    absent = [name for name, n in counts["test"].items() if n == 0]
    if absent and split.test:
        out.append(f"class(es) {', '.join(map(repr, absent))} absent from test: balanced accuracy and macro "
                   "scores average over the other classes only")
    return out


def _warn_about_classes(split) -> None:
    for message in class_warnings(split):
        print(f"warning: {message}", file=sys.stderr)


def prepare_context(config: RunConfig) -> RunContext | None:
    """Everything that can fail because of a user mistake happens here, before anything is written."""
    from models import load_model

    out = Path(config.run) if config.eval_only else run_dir(config)
    if _synthetic(config):
        print(DEMO_BANNER, file=sys.stderr)
    if not config.eval_only and res.is_finished(out) and not config.overwrite:
        print(f"already finished: {out / res.RESULTS_FILE} (add --overwrite to run it again)")
        return None
    seed_everything(config.seed)
    split = load_data(config)
    img.check_decodable([path for part in ("train", "val", "test") for path, _ in split.items(part)],
                        _cache_dir() / "decodable.json")
    _warn_about_classes(split)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    spec = load_model(config.model_name, backbone=config.backbone, weights=config.weights)
    spec.model.requires_grad_(False)
    return RunContext(config, out, split, spec, device, precision)


# -- training -------------------------------------------------------------------------------
def _train_settings(c: RunConfig, ctx: RunContext, stage: Stage) -> TrainSettings:
    return TrainSettings(lr=stage.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps,
                         total_steps=stage.steps, min_lr=c.min_lr, seed=c.seed, device=ctx.device,
                         precision=ctx.precision, checkpoint_every=c.checkpoint_every, compile=c.compile,
                         schedule=stage.schedule, cycle_steps=c.n_iters)


def _batches(ctx: RunContext, stage: Stage):
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
        batches, prepare = _batches(ctx, stage)
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
        evaluation = EVALUATORS[self.ctx.split.task](self.ctx, self.plan, parts=("val",), extras=False)
        score = evaluation.metrics["val"].get(HEADLINE[self.ctx.split.task])
        score = None if score is None or score != score else float(score)  # NaN: not comparable
        self.state["curve"].append([step, score])
        self.tracker.log({f"val/{HEADLINE[self.ctx.split.task]}": score}, step)
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
        return {"metric": HEADLINE[self.ctx.split.task], "every": self.every, "curve": s["curve"],
                "selected_step": s["best_step"] if self.keep_best else self.stage.steps,
                "selected_val": s["best_score"] if self.keep_best else (s["curve"][-1][1] if s["curve"] else None),
                "seconds": round(s["seconds"], 3)}


def task_loss(ctx: RunContext):
    """Cross-entropy for single-label data; per-label binary cross-entropy for multi-label data, with
    --pos_weight auto weighting each label's positives by its negative/positive ratio in train."""
    if ctx.split.task != "multilabel":
        return F.cross_entropy
    pos_weight = None
    if ctx.config.pos_weight == "auto":
        targets = torch.tensor([label for _, label in ctx.split.train], dtype=torch.float32)
        positives = targets.sum(0)
        pos_weight = ((len(targets) - positives) / positives.clamp_min(1)).to(ctx.device)

    def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=pos_weight)

    return bce


def _stage_record(stage: Stage, stats: TrainStats) -> dict:
    return {"name": stage.name, "inputs": stage.inputs, "steps": stage.steps, "lr": stage.lr,
            "train_seconds": round(stats.train_seconds, 3), "images_per_second": round(stats.images_per_second, 2),
            "steps_run": stats.steps, "resumed_from_step": stats.resumed_from}


def remove_checkpoints(out: Path) -> None:
    for path in out.glob("checkpoint*.pt"):
        path.unlink(missing_ok=True)


# -- saving and reloading the trained state -------------------------------------------------
def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _identity(ctx: RunContext) -> dict:
    c = ctx.config
    return {"method": c.method, "method_settings": json.dumps(c.method_settings, sort_keys=True),
            "classes": json.dumps(list(ctx.split.classes)), "model": model_label(c), "compat": c.compat}


def save_weights(ctx: RunContext, plan: Plan, folder: Path) -> None:
    """The trained parameters of the plan's classifier, with what they belong to, in weights.safetensors."""
    state = trained_state(plan.model)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata=_identity(ctx)))
    if plan.export is not None:
        plan.export(folder)


def load_weights(ctx: RunContext, plan: Plan, folder: Path) -> None:
    """Load what save_weights wrote; a file of another method, settings, model or classes is refused."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"no trained weights at {path}: point --run at a finished run folder of a trained method")
    with safe_open(str(path), "pt") as f:
        saved = {"compat": "none"} | (f.metadata() or {})  # files written before --compat existed: none
    for key, value in _identity(ctx).items():
        if saved.get(key) != value:
            raise UserError(f"{path} was saved with {key} {saved.get(key)}, but this run has {value}: "
                            "give the same method, settings, model and data as the saved run")
    state = load_file(str(path))
    expected = set(trained_state(plan.model))
    if set(state) != expected:
        raise UserError(f"{path} does not match the model built for this run ({len(state)} saved tensors, "
                        f"{len(expected)} expected): give the same settings as the saved run")
    plan.model.load_state_dict(state, strict=False)


# -- evaluation -----------------------------------------------------------------------------
@dataclass
class Evaluation:
    """What evaluating a run gives: metrics per part, one predictions.csv row per image, results.json extras."""

    metrics: dict
    rows: list  # (part, path, label, pred, values of the probability columns)
    columns: list[str]  # the probability columns of predictions.csv (the classes; none for image-text pairs)
    extra: dict = field(default_factory=dict)


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


PARTS = ("val", "test")


def evaluate(ctx: RunContext, plan: Plan) -> Evaluation:
    """Metrics of val and test, one prediction row per image, and what the task adds (see EVALUATORS).

    Every evaluator takes `parts` (the parts to evaluate) and `extras` (False: only the metrics, for
    validation during training)."""
    return EVALUATORS[ctx.split.task](ctx, plan)


def _logits(ctx: RunContext, plan: Plan, parts: tuple[str, ...]) -> dict:
    return {part: predict(ctx, plan, part) for part in parts if ctx.split.items(part)}


def _evaluate_single_label(ctx: RunContext, plan: Plan, parts=PARTS, extras: bool = True) -> Evaluation:
    """Softmax metrics, the label tree's upper levels where the dataset has one, and temperature scaling
    fitted on val (the reported metrics are the uncalibrated ones)."""
    logits = _logits(ctx, plan, parts)
    metrics, rows = {}, []
    tree = _label_tree(ctx)
    for part, (out, labels) in logits.items():
        probs = out.softmax(dim=1)
        metrics[part] = compute_metrics(probs.numpy(), labels.numpy(), ctx.split.classes)
        preds = probs.argmax(dim=1)
        if tree:
            metrics[part]["hierarchy"] = hierarchical_metrics(tree, list(ctx.split.classes), labels.numpy(),
                                                              preds.numpy())
        for (path, label), pred, p in zip(ctx.split.items(part), preds.tolist(), probs.tolist(), strict=True):
            rows.append((part, ctx.split.relative(path), label, pred, p))
    return Evaluation(metrics, rows, list(ctx.split.classes), _calibration(ctx, logits) if extras else {})


def _evaluate_multilabel(ctx: RunContext, plan: Plan, parts=PARTS, extras: bool = True) -> Evaluation:
    """Sigmoid metrics per label, with F1 also at thresholds chosen on val."""
    from evaluation.metrics import choose_thresholds, multilabel_metrics

    logits = _logits(ctx, plan, parts)
    probs = {part: out.sigmoid().numpy() for part, (out, _) in logits.items()}
    targets = {part: labels.numpy() for part, (_, labels) in logits.items()}
    thresholds = choose_thresholds(probs["val"], targets["val"]) if "val" in probs else None
    metrics, rows = {}, []
    for part in logits:
        metrics[part] = multilabel_metrics(probs[part], targets[part], list(ctx.split.classes), thresholds)
        for (path, label), p in zip(ctx.split.items(part), probs[part].tolist(), strict=True):
            pred = ";".join(str(int(v >= 0.5)) for v in p)
            rows.append((part, ctx.split.relative(path), ";".join(map(str, label)), pred, p))
    extra = {"thresholds": None if thresholds is None else [round(float(t), 6) for t in thresholds]}
    return Evaluation(metrics, rows, list(ctx.split.classes), extra)


def _evaluate_captions(ctx: RunContext, plan: Plan, parts=PARTS, extras: bool = True) -> Evaluation:
    """Retrieval both ways between each part's images and its captions (recall@1/5/10, median rank) and,
    when the pairs have classes, zero-shot classification from the class prompts; the same with the
    adapters switched off (the model before fine-tuning) in ``before_finetuning``.

    predictions.csv: label is the index of the image's own caption within its part, pred the caption
    retrieved first.
    """
    from lora import lora_disabled

    metrics, rows = _retrieval(ctx, plan, parts)
    if not extras:
        return Evaluation(metrics, rows, [])
    with lora_disabled(ctx.spec.model):
        before, _ = _retrieval(ctx, plan, parts)
    return Evaluation(metrics, rows, [], {"before_finetuning": before})


def _retrieval(ctx: RunContext, plan: Plan, parts: tuple[str, ...]) -> tuple[dict, list]:
    from evaluation.metrics import compute_metrics, retrieval_summary
    from methods.heads import class_text_embeddings

    metrics, rows = {}, []
    for part in parts:
        samples = ctx.split.items(part)
        if not samples:
            continue
        images, labels = predict(ctx, plan, part, fn=plan.model.embed_images)
        texts = plan.model.embed_texts([ctx.split.captions[path] for path, _ in samples])
        similarity = (images @ texts.t()).numpy()
        metrics[part] = retrieval_summary(similarity)
        if ctx.split.classes and int(labels.min()) >= 0:
            prompts = class_text_embeddings(ctx)  # the dataset's class prompts, as zero-shot runs embed them
            zeroshot = compute_metrics((images @ prompts.t()).softmax(dim=1).numpy(), labels.numpy(),
                                       ctx.split.classes)
            metrics[part].update({f"zeroshot_{k}": zeroshot[k] for k in ("accuracy", "balanced_accuracy")})
        for i, ((path, _), first) in enumerate(zip(samples, similarity.argmax(axis=1).tolist(), strict=True)):
            rows.append((part, ctx.split.relative(path), i, first, []))
    return metrics, rows


EVALUATORS = {"single_label": _evaluate_single_label, "multilabel": _evaluate_multilabel,
              "captions": _evaluate_captions}


def _label_tree(ctx: RunContext) -> dict | None:
    """The dataset's label tree when the run classifies at its deepest level, else None."""
    from datasets import get_dataset

    info = get_dataset(ctx.config.dataset)
    if info.hierarchy is None or not info.levels or ctx.config.level != info.default_level:
        return None
    return info.hierarchy(ctx.config.root_path, ctx.config.level_fallback or "original")


def _calibration(ctx: RunContext, logits: dict) -> dict:
    from evaluation.calibration import calibration_report, reliability_bins

    if "val" not in logits or "test" not in logits:
        return {"calibration": {"skipped": "no validation or no test images"}}
    (val, val_y), (test, test_y) = logits["val"], logits["test"]
    report = calibration_report(val.numpy(), val_y.numpy(), test.numpy(), test_y.numpy(), len(ctx.split.classes))
    report["test_reliability"] = reliability_bins(test.softmax(dim=1).numpy(), test_y.numpy())
    return report


# -- results ----------------------------------------------------------------------------------
def _record(ctx: RunContext, plan: Plan, metrics: dict, stages: list[dict], trainable: int, **extra) -> dict:
    split = ctx.split
    total = sum(p.numel() for p in {id(p): p for p in _all_parameters(ctx, plan)}.values())
    return res.build_record(
        ctx.config.to_dict(),
        level=split.level, synthetic_demo=_synthetic(ctx.config),
        model={"key": ctx.spec.key, "weights": ctx.spec.weights, "feature_dim": ctx.spec.feature_dim,
               "input_size": ctx.spec.input_size},
        classes=list(split.classes), n_train=len(split.train), n_val=len(split.val), n_test=len(split.test),
        left_out=getattr(split, "left_out", 0), split_sha256=split.sha256, warnings=class_warnings(split),
        task=split.task, headline=HEADLINE[split.task],
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


SUMMARY = {"single_label": (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                            ("macro_f1", "macro-F1")),
           "multilabel": (("macro_auroc", "mean AUROC"), ("mAP", "mAP"), ("macro_f1", "macro-F1 at 0.5"),
                          ("exact_match", "exact match")),
           "captions": (("image_to_text_recall@1", "image-to-text R@1"), ("image_to_text_recall@5", "R@5"),
                        ("text_to_image_recall@1", "text-to-image R@1"), ("text_to_image_recall@5", "R@5"),
                        ("zeroshot_accuracy", "zero-shot accuracy"))}


def _text(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary(ctx: RunContext, evaluation: Evaluation, path: Path, stages: list[dict]) -> None:
    """A short human summary on stdout."""
    shown = [(k, n) for k, n in SUMMARY[ctx.split.task]
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
    if _synthetic(ctx.config):
        print(DEMO_BANNER)


# -- the run ----------------------------------------------------------------------------------
def run(config: RunConfig) -> int:
    """One run of any method, from settings to results.json.

    Under torchrun every process runs this: all of them train and evaluate their share, rank 0
    alone writes files and prints, and the others wait for it at barriers.
    """
    method = get_method(config.method)
    if config.eval_only and not method.trains:
        raise UserError(f"--eval_only reloads trained weights, and --method {method.name} trains nothing: "
                        "run it without --eval_only")
    with dist.process_group(resolve_device(config.device).type), _silent_unless_main():
        ctx = dist.main_first(lambda: prepare_context(config))  # downloads and caches once
        if ctx is None:
            return 0
        ctx.device = dist.device_of_rank(ctx.device)
        check_task(method, ctx)
        plan = method.build(ctx, method.resolve(config.method_settings))
        plan.model.to(ctx.device)
        if config.eval_only:
            return _eval_only(ctx, plan)
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
                res.write_predictions(ctx.out / res.PREDICTIONS_FILE, evaluation.rows, evaluation.columns)
                record = _record(ctx, plan, evaluation.metrics, stages, trainable, **evaluation.extra)
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
            res.write_predictions(ctx.out / f"eval_{res.PREDICTIONS_FILE}", evaluation.rows, evaluation.columns)
            path = res.write_results(out, _record(ctx, plan, evaluation.metrics, [], 0, eval_only=True,
                                                  eval_seconds=round(time.perf_counter() - t0, 3),
                                                  **evaluation.extra))
            summary(ctx, evaluation, path, [])
    return 0


def check_task(method, ctx: RunContext) -> None:
    from methods.registry import check_task as check

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


def method_settings_of(config: RunConfig) -> dict:
    """The resolved settings of the config's method as plain values."""
    method = get_method(config.method)
    return settings_dict(method.resolve(config.method_settings))
