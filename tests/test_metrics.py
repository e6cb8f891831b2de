"""Each metric against a case computed by hand (and AUROC against scikit-learn's own routine)."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from utils.metrics import compute_metrics

CLASSES = ["a", "b", "c"]
Y = np.array([0, 0, 0, 1, 1, 2])
P = np.array([
    [0.92, 0.04, 0.04],  # 0 -> 0 right, confidence 0.92
    [0.62, 0.28, 0.10],  # 0 -> 0 right, 0.62
    [0.28, 0.62, 0.10],  # 0 -> 1 wrong, 0.62
    [0.18, 0.72, 0.10],  # 1 -> 1 right, 0.72
    [0.10, 0.28, 0.62],  # 1 -> 2 wrong, 0.62
    [0.04, 0.04, 0.92],  # 2 -> 2 right, 0.92
])


@pytest.fixture(scope="module")
def m():
    return compute_metrics(P, Y, CLASSES)


def test_confusion_matrix_rows_are_true_classes(m):
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["n"] == 6


def test_accuracy_and_balanced_accuracy(m):
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["per_class_recall"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 1.0})


def test_macro_f1(m):
    # F1 per class: a 2*2/(3+2), b 2*1/(2+2), c 2*1/(1+2)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_ece_with_15_bins(m):
    # bins: 0.62 holds 3 (1 right), 0.72 holds 1 (right), 0.92 holds 2 (both right)
    expected = 3 / 6 * abs(1 / 3 - 0.62) + 1 / 6 * abs(1 - 0.72) + 2 / 6 * abs(1 - 0.92)
    assert m["ece"] == pytest.approx(expected)


def test_auroc_is_macro_one_vs_rest(m):
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, P, multi_class="ovr", average="macro"))


def test_perfect_predictions():
    y = np.array([0, 1, 1, 0])
    p = np.eye(2)[y] * 0.98 + 0.01
    m = compute_metrics(p, y, ["x", "y"])
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert m["auroc"] == 1.0
    assert m["ece"] == pytest.approx(0.01)


def test_class_absent_from_labels_is_not_counted_in_balanced_accuracy():
    y = np.array([0, 0, 1])
    p = np.array([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])
    m = compute_metrics(p, y, CLASSES)
    assert m["per_class_recall"]["c"] is None
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
