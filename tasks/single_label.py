"""Single-label classification: one class per image (the paper's tasks)."""

from __future__ import annotations

import torch.nn.functional as F

from datasets import get_dataset
from evaluation.calibration import calibration_report, reliability_bins
from evaluation.metrics import compute_metrics, hierarchical_metrics
from tasks.registry import Evaluation, Task, probability_csv, register

PARTS = ("val", "test")


def evaluate(ctx, plan, predict, parts=PARTS, extras: bool = True) -> Evaluation:
    """Softmax metrics, the label tree's upper levels where the dataset has one, and temperature scaling
    fitted on val (the reported metrics are the uncalibrated ones)."""
    logits = {part: predict(part) for part in parts if ctx.split.items(part)}
    metrics, rows = {}, []
    tree = label_tree(ctx)
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


def label_tree(ctx) -> dict | None:
    """The dataset's label tree when the run classifies at its deepest level, else None."""
    info = get_dataset(ctx.config.dataset)
    if info.hierarchy is None or not info.levels or ctx.config.level != info.default_level:
        return None
    return info.hierarchy(ctx.config.root_path, ctx.config.level_fallback or "original")


def _calibration(ctx, logits: dict) -> dict:
    if "val" not in logits or "test" not in logits:
        return {"calibration": {"skipped": "no validation or no test images"}}
    (val, val_y), (test, test_y) = logits["val"], logits["test"]
    report = calibration_report(val.numpy(), val_y.numpy(), test.numpy(), test_y.numpy(), len(ctx.split.classes))
    report["test_reliability"] = reliability_bins(test.softmax(dim=1).numpy(), test_y.numpy())
    return report


def loss(ctx):
    return F.cross_entropy


def predictions_csv(names, probs, classes, record: dict) -> str:
    """`path,pred,p_<class>...`: the most probable class and one softmax probability per class."""
    preds = [classes[i] for i in probs.argmax(dim=1).tolist()] if len(names) else []
    return probability_csv(names, probs, classes, preds)


def export_info(record: dict) -> dict:
    return {"task": "single_label", "activation": "softmax",
            "outputs": "logits (B, classes): softmax gives the class probabilities; argmax the class"}


TASK = register(Task(
    name="single_label", description="one class per image (cross-entropy, softmax)",
    headline="balanced_accuracy", headline_name="balanced accuracy",
    summary=(("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1")),
    report_metrics=("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece"),
    evaluate=evaluate, activation="softmax", exclusive=True, chance=lambda n: 1.0 / n if n else None,
    loss=loss, predictions_csv=predictions_csv, export_info=export_info,
))
