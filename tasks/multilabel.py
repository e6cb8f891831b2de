"""Multi-label classification: any subset of the labels per image (per-label sigmoid)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import UserError
from evaluation.metrics import choose_thresholds, multilabel_metrics
from tasks.registry import Evaluation, Task, probability_csv, register

PARTS = ("val", "test")


def evaluate(ctx, plan, predict, parts=PARTS, extras: bool = True) -> Evaluation:
    """Sigmoid metrics per label, with F1 also at thresholds chosen on val."""
    logits = {part: predict(part) for part in parts if ctx.split.items(part)}
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


def loss(ctx):
    """Per-label binary cross-entropy; --pos_weight auto weights each label's positives by its
    negative/positive ratio in train."""
    pos_weight = None
    if ctx.config.pos_weight == "auto":
        targets = torch.tensor([label for _, label in ctx.split.train], dtype=torch.float32)
        positives = targets.sum(0)
        pos_weight = ((len(targets) - positives) / positives.clamp_min(1)).to(ctx.device)

    def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=pos_weight)

    return bce


def thresholds_of(record: dict, classes) -> list[float]:
    """The run's per-label thresholds chosen on validation, or 0.5 for each label when it had no validation."""
    chosen = record.get("thresholds")
    if chosen is None:
        return [0.5] * len(classes)
    if len(chosen) != len(classes):
        raise UserError(f"the run's results.json has {len(chosen)} thresholds for {len(classes)} labels: "
                        "evaluate the run again (--eval_only) to rewrite it")
    return [float(t) for t in chosen]


def predictions_csv(ctx, names, probs, record: dict) -> str:
    """`path,pred,p_<label>...`: the labels whose sigmoid probability reaches the run's validation threshold
    (joined by ';', empty for none) and one probability per label."""
    classes = list(ctx.split.classes)
    thresholds = thresholds_of(record, classes)
    preds = [";".join(c for c, p, t in zip(classes, row, thresholds, strict=True) if p >= t)
             for row in probs.tolist()]
    return probability_csv(names, probs, classes, preds)


def export_info(record: dict) -> dict:
    return {"task": "multilabel", "activation": "sigmoid", "thresholds": record.get("thresholds"),
            "outputs": "logits (B, labels): a sigmoid per label gives its probability; a label is predicted when "
                       "it reaches its threshold (chosen on validation; 0.5 where none)"}


TASK = register(Task(
    name="multilabel", description="any subset of the labels per image (binary cross-entropy per label, sigmoid)",
    headline="macro_auroc", headline_name="mean AUROC",
    summary=(("macro_auroc", "mean AUROC"), ("mAP", "mAP"), ("macro_f1", "macro-F1 at 0.5"),
             ("exact_match", "exact match")),
    report_metrics=("macro_auroc", "mAP", "macro_f1", "exact_match"),
    evaluate=evaluate, activation="sigmoid", chance=lambda n: 0.5,
    loss=loss, predictions_csv=predictions_csv, export_info=export_info,
))
