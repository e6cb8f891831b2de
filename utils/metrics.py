"""Classification metrics: the one place every reported number is computed."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

ECE_BINS = 15


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with true classes in rows and predicted classes in columns."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of each class; NaN for a class absent from the labels."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[present].mean()) if present.any() else float("nan")


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE with equal-width confidence bins, (lo, hi] as in Guo et al. 2017."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=False):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def macro_auroc(probs: np.ndarray, y_true: np.ndarray, num_classes: int) -> float | None:
    """Macro one-vs-rest AUROC over classes present in the labels; None when undefined."""
    present = [c for c in range(num_classes) if (y_true == c).any()]
    if len(present) < 2:
        return None
    scores = []
    for c in present:
        positives = y_true == c
        if positives.all():
            continue
        scores.append(roc_auc_score(positives.astype(int), probs[:, c]))
    return float(np.mean(scores))


def _finite_or_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def compute_metrics(probs: np.ndarray, y_true: np.ndarray, class_names: list[str]) -> dict:
    """All metrics of one evaluation; accuracies are fractions in [0, 1]."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    num_classes = len(class_names)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, num_classes)
    recall = per_class_recall(cm)
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()),
        "balanced_accuracy": float(np.nanmean(recall)),
        "macro_f1": macro_f1(cm),
        "auroc": macro_auroc(probs, y_true, num_classes),
        "ece": expected_calibration_error(probs, y_true),
        "per_class_recall": {name: _finite_or_none(r) for name, r in zip(class_names, recall, strict=False)},
        "confusion_matrix": cm.tolist(),
    }
