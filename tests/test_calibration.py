"""Temperature scaling recovers a known temperature, never moves the argmax, and skips tiny validation sets."""

import numpy as np
import pytest
from scipy.special import softmax

from evaluation.calibration import brier, calibration_report, fit_temperature, nll, reliability_bins
from evaluation.metrics import expected_calibration_error


def _sample(n: int, classes: int, temperature: float, seed: int):
    """Labels drawn from softmax(true logits); the model reports true logits * temperature."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 2.0, size=(n, classes))
    p = softmax(true_logits, axis=1)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return true_logits * temperature, labels


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_fit_recovers_a_known_temperature(temperature):
    logits, labels = _sample(4000, 4, temperature, seed=0)
    assert fit_temperature(logits, labels) == pytest.approx(temperature, rel=0.08)


def test_fit_is_finite_on_a_tiny_separable_validation_set():
    t = fit_temperature(np.array([[3.0, 0.0], [0.0, 3.0]]), np.array([0, 1]))
    assert 0 < t < 1  # sharpening helps, and the search bound keeps it away from 0
    assert fit_temperature(np.zeros((3, 3)), np.array([0, 1, 2])) == 1.0  # flat: identity


def test_report_lowers_validation_nll_and_keeps_accuracy():
    val_logits, val_labels = _sample(600, 3, 3.0, seed=1)
    test_logits, test_labels = _sample(600, 3, 3.0, seed=2)
    r = calibration_report(val_logits, val_labels, test_logits, test_labels, num_classes=3)
    cal = r["calibration"]
    assert cal["val_nll_after"] <= cal["val_nll_before"]
    assert cal["temperature"] == pytest.approx(3.0, rel=0.2)
    assert r["test_after"]["accuracy"] == r["test_before"]["accuracy"]
    assert r["test_after"]["nll"] < r["test_before"]["nll"] and r["test_after"]["ece"] < r["test_before"]["ece"]
    assert set(r["test_before"]) >= {"ece", "nll", "brier"}


def test_report_skips_when_a_class_has_fewer_than_two_validation_images():
    logits, labels = _sample(50, 3, 1.0, seed=3)
    val_labels = np.array([0, 0, 1, 1, 2])
    r = calibration_report(logits[:5], val_labels, logits, labels, num_classes=3)
    assert "class(es) [2]" in r["calibration"]["skipped"]
    assert r["test_after"] is None and r["test_before"]["nll"] > 0
    absent = calibration_report(logits[:4], val_labels[:4], logits, labels, num_classes=3)
    assert "skipped" in absent["calibration"]


def test_nll_and_brier_by_hand():
    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    y = np.array([0, 2])
    assert nll(p, y) == pytest.approx(-(np.log(0.5) + np.log(0.1)) / 2)
    assert brier(p, y) == pytest.approx(((0.25 + 0.0625 + 0.0625) + (0.01 + 0.64 + 0.81)) / 2)
    assert np.isfinite(nll(np.array([[1.0, 0.0]]), np.array([1])))


def test_reliability_bins_add_up_to_the_ece():
    logits, labels = _sample(500, 4, 2.0, seed=4)
    p = softmax(logits, axis=1)
    bins = reliability_bins(p, labels)
    assert sum(bins["count"]) == 500 and len(bins["edges"]) == 16
    rows = zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
    ece = sum(c / 500 * abs(a - f) for c, a, f in rows if c)
    assert ece == pytest.approx(expected_calibration_error(p, labels))
    assert bins["confidence"][0] is None  # no top-label confidence below 1/15 with 4 classes
