"""Calibration: temperature scaling fitted on validation logits, and the scores that judge it.

Temperature scaling (Guo et al. 2017) divides the logits by one positive scalar T fitted to
minimise the validation negative log-likelihood; it never changes the predicted class.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from evaluation.metrics import ECE_BINS, expected_calibration_error

# T is searched over [1/50, 50]: a tiny or separable validation set can push the optimum to
# an extreme, and a bound keeps the fitted T finite instead of running off to 0 or infinity.
LOG_T_BOUNDS = (-math.log(50.0), math.log(50.0))
MIN_VAL_PER_CLASS = 2
PROB_FLOOR = 1e-12  # nll of a probability of exactly 0 is capped at -log(PROB_FLOOR) ~ 27.6


def _logits_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    logp = log_softmax(logits / temperature, axis=1)
    return float(-logp[np.arange(labels.size), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T); 1.0 when no T beats T = 1."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("fit_temperature needs at least one validation image")
    result = minimize_scalar(
        lambda log_t: _logits_nll(logits, labels, math.exp(log_t)),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = math.exp(float(result.x))
    # a flat objective (e.g. all logits equal) leaves an arbitrary T: keep the identity then
    if _logits_nll(logits, labels, temperature) >= _logits_nll(logits, labels) - 1e-12:
        return 1.0
    return temperature


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class (probabilities floored at PROB_FLOOR)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    return float(-np.log(np.maximum(probs[np.arange(labels.size), labels], PROB_FLOOR)).mean())


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of sum over classes of (p - one-hot)^2."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(labels, dtype=np.int64)]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Per confidence bin, (lo, hi] as in the ECE: edges, mean confidence, accuracy and count.

    Lists of length n_bins (edges n_bins + 1); an empty bin has count 0 and None confidence
    and accuracy.
    """
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    out: dict = {"edges": edges.tolist(), "confidence": [], "accuracy": [], "count": []}
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lo) & (confidence <= hi)
        count = int(in_bin.sum())
        out["count"].append(count)
        out["confidence"].append(float(confidence[in_bin].mean()) if count else None)
        out["accuracy"].append(float(correct[in_bin].mean()) if count else None)
    return out


def calibration_scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """ECE, NLL, Brier score and accuracy of one set of predicted probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    return {
        "ece": expected_calibration_error(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "accuracy": float((probs.argmax(axis=1) == labels).mean()),
    }


def calibration_report(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
) -> dict:
    """Test calibration before and after a temperature fitted on validation.

    {"calibration": {"temperature", "val_nll_before", "val_nll_after"} or {"skipped": reason},
    "test_before": scores, "test_after": scores or None when skipped}, with the scores of
    calibration_scores. Fitting is skipped when a class has fewer than MIN_VAL_PER_CLASS
    validation images, as a temperature fitted on them would be noise.
    """
    val_logits = np.asarray(val_logits, dtype=np.float64)
    val_labels = np.asarray(val_labels, dtype=np.int64)
    test_logits = np.asarray(test_logits, dtype=np.float64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    report: dict = {
        "calibration": None,
        "test_before": calibration_scores(softmax(test_logits, axis=1), test_labels),
        "test_after": None,
    }
    counts = np.bincount(val_labels, minlength=num_classes)[:num_classes]
    if (counts < MIN_VAL_PER_CLASS).any():
        few = [int(c) for c in np.nonzero(counts < MIN_VAL_PER_CLASS)[0]]
        report["calibration"] = {
            "skipped": f"validation has fewer than {MIN_VAL_PER_CLASS} images of class(es) {few} "
            f"(counts per class {counts.tolist()}); temperature not fitted"
        }
        return report
    temperature = fit_temperature(val_logits, val_labels)
    report["calibration"] = {
        "temperature": temperature,
        "val_nll_before": _logits_nll(val_logits, val_labels),
        "val_nll_after": _logits_nll(val_logits, val_labels, temperature),
    }
    report["test_after"] = calibration_scores(softmax(test_logits / temperature, axis=1), test_labels)
    return report
