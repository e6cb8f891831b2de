"""Classification, multi-label and retrieval metrics: the one place every reported number is computed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

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


def balanced_accuracy_rows(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Balanced accuracy of each row of (R, n) label and prediction arrays, as in compute_metrics.

    The mean recall over the classes present in that row's labels, computed for all rows
    with two bincounts (for bootstrap resamples); NaN for a row without labels.
    """
    y_true = np.atleast_2d(np.asarray(y_true, dtype=np.int64))
    y_pred = np.atleast_2d(np.asarray(y_pred, dtype=np.int64))
    if num_classes is None:
        num_classes = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    rows = y_true.shape[0]
    flat = (np.arange(rows)[:, None] * num_classes + y_true).ravel()
    support = np.bincount(flat, minlength=rows * num_classes).reshape(rows, num_classes)
    hits = np.bincount(flat[(y_true == y_pred).ravel()], minlength=rows * num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits.reshape(rows, num_classes) / np.maximum(support, 1), 0.0)
        return recall.sum(axis=1) / (support > 0).sum(axis=1)


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
        "balanced_accuracy_over": [name for name, r in zip(class_names, recall, strict=True) if not np.isnan(r)],
        "macro_f1": macro_f1(cm),
        "auroc": macro_auroc(probs, y_true, num_classes),
        "ece": expected_calibration_error(probs, y_true),
        "per_class_recall": {name: _finite_or_none(r) for name, r in zip(class_names, recall, strict=False)},
        "confusion_matrix": cm.tolist(),
    }


def _binary_f1(truth: np.ndarray, predicted: np.ndarray) -> float | None:
    """F1 of one label; None when the label is absent from both truth and predictions."""
    tp = int((truth & predicted).sum())
    denom = int(truth.sum() + predicted.sum())
    return 2 * tp / denom if denom else None


def _mean_defined(values: Sequence[float | None]) -> float | None:
    """Mean over the defined values; None when none is defined (never a made-up 0 or 0.5)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def choose_thresholds(probs: np.ndarray, targets: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per-label threshold maximising F1 of ``probs >= threshold`` on validation; (L,) floats.

    The threshold sits halfway between the lowest score kept positive and the next score
    below it; a label without positives keeps ``default``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    thresholds = np.full(probs.shape[1], float(default))
    for j in range(probs.shape[1]):
        positives = int(targets[:, j].sum())
        if positives == 0:
            continue
        order = np.argsort(-probs[:, j], kind="stable")
        scores, truth = probs[order, j], targets[order, j]
        tp = np.cumsum(truth)
        kept = np.arange(1, scores.size + 1)
        f1 = 2 * tp / (kept + positives)
        # only cut between distinct scores: tied images are kept or dropped together
        f1[:-1][scores[:-1] == scores[1:]] = -1.0
        best = int(np.argmax(f1))
        if best == scores.size - 1:
            thresholds[j] = scores[best]
        else:
            middle = (scores[best] + scores[best + 1]) / 2
            thresholds[j] = middle if middle > scores[best + 1] else scores[best]
    return thresholds


def multilabel_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    label_names: list[str],
    thresholds: Sequence[float] | None = None,
) -> dict:
    """Per-label and macro AUROC, average precision and F1, and the exact-match ratio.

    ``probs`` and ``targets`` are (N, L). AUROC is defined for labels with both classes in
    ``targets`` and AP for labels with a positive; the others are None and left out of the
    macro means. F1 uses ``probs >= 0.5`` and, with ``thresholds`` (one per label, e.g. from
    choose_thresholds on validation), also ``probs >= thresholds``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    if probs.shape != targets.shape or probs.ndim != 2 or probs.shape[1] != len(label_names):
        raise ValueError(
            f"probs {probs.shape} and targets {targets.shape} must both be (images, {len(label_names)} labels)"
        )
    cuts = {"": np.full(probs.shape[1], 0.5)}
    if thresholds is not None:
        if len(thresholds) != len(label_names):
            raise ValueError(f"need one threshold per label: got {len(thresholds)} for {len(label_names)} labels")
        cuts["_at_threshold"] = np.asarray(thresholds, dtype=np.float64)
    per_label = {}
    for j, name in enumerate(label_names):
        truth, score = targets[:, j], probs[:, j]
        positives = int(truth.sum())
        row = {
            "support": positives,
            "auroc": float(roc_auc_score(truth, score)) if 0 < positives < truth.size else None,
            "average_precision": float(average_precision_score(truth, score)) if positives else None,
        }
        for suffix, cut in cuts.items():
            row["f1" + suffix] = _binary_f1(truth, score >= cut[j])
        if thresholds is not None:
            row["threshold"] = float(cuts["_at_threshold"][j])
        per_label[name] = row
    out = {
        "n": int(probs.shape[0]),
        "macro_auroc": _mean_defined([r["auroc"] for r in per_label.values()]),
        "mAP": _mean_defined([r["average_precision"] for r in per_label.values()]),
    }
    for suffix, cut in cuts.items():
        out["macro_f1" + suffix] = _mean_defined([r["f1" + suffix] for r in per_label.values()])
        out["exact_match" + suffix] = float(((probs >= cut) == targets).all(axis=1).mean())
    out["labels"] = per_label
    return out


def retrieval_metrics(similarity: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k and median rank (1-based) both ways for a square image-text similarity matrix.

    Rows are images and columns texts; image i matches text i. A tie with the match counts
    against it, so a constant matrix ranks every match last.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity must be square (images x texts, pair i matches i), got {sim.shape}")
    match = np.diag(sim)
    ranks = {
        "image_to_text": (sim >= match[:, None]).sum(axis=1),
        "text_to_image": (sim >= match[None, :]).sum(axis=0),
    }
    out: dict = {"n": int(sim.shape[0])}
    for direction, rank in ranks.items():
        scores = {f"recall@{k}": float((rank <= k).mean()) for k in ks}
        scores["median_rank"] = float(np.median(rank))
        out[direction] = scores
    return out


def retrieval_summary(similarity: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """:func:`retrieval_metrics` as flat keys (``image_to_text_recall@5``, ``text_to_image_median_rank``, ...)
    plus ``recall@1``, the mean of the two directions' recall@1 (the headline of image-text runs)."""
    nested = retrieval_metrics(similarity, ks)
    out: dict = {"n": nested["n"]}
    for direction in ("image_to_text", "text_to_image"):
        out.update({f"{direction}_{k}": v for k, v in nested[direction].items()})
    out["recall@1"] = (out["image_to_text_recall@1"] + out["text_to_image_recall@1"]) / 2
    return out


def hierarchical_metrics(tree: dict, class_names: list[str], y_true, y_pred) -> dict:
    """Accuracy at the two upper levels of a label tree and the mean tree distance of mistakes.

    `tree` maps each deepest-level label to its (level_1, level_2) ancestors; a prediction is
    mapped up the tree, so a level-3 mistake inside the right parent still counts as right at
    level 2. Distance: 0 = right, 1 = right parent, 2 = right grandparent, 3 = otherwise.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    chain = [(name, *reversed(tree.get(name, (name, name)))) for name in class_names]  # (l3, l2, l1)
    t = [chain[i] for i in y_true]
    p = [chain[i] for i in y_pred]
    distance = np.array([next((k for k in range(3) if a[k] == b[k]), 3) for a, b in zip(t, p, strict=True)])
    wrong = distance > 0
    return {
        "accuracy_level_1": float(np.mean([a[2] == b[2] for a, b in zip(t, p, strict=True)])),
        "accuracy_level_2": float(np.mean([a[1] == b[1] for a, b in zip(t, p, strict=True)])),
        "accuracy_level_3": float((~wrong).mean()),
        "mean_mistake_distance": float(distance[wrong].mean()) if wrong.any() else 0.0,
        "mean_distance": float(distance.mean()),
    }
