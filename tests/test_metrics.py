"""Each metric against a case computed by hand or against scikit-learn's own routine."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from evaluation.metrics import choose_thresholds, compute_metrics, multilabel_metrics, retrieval_metrics

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


def _multilabel(n: int = 200, labels: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = rng.random((n, labels)) < np.array([0.1, 0.3, 0.5, 0.7])[:labels]
    probs = np.clip(0.35 * targets + rng.random((n, labels)) * 0.65, 0, 1)
    return probs, targets.astype(int)


def test_multilabel_metrics_match_scikit_learn():
    probs, targets = _multilabel()
    names = ["w", "x", "y", "z"]
    thresholds = [0.3, 0.4, 0.5, 0.6]
    m = multilabel_metrics(probs, targets, names, thresholds=thresholds)
    aurocs = [roc_auc_score(targets[:, j], probs[:, j]) for j in range(4)]
    aps = [average_precision_score(targets[:, j], probs[:, j]) for j in range(4)]
    assert [m["labels"][n]["auroc"] for n in names] == pytest.approx(aurocs)
    assert m["macro_auroc"] == pytest.approx(roc_auc_score(targets, probs, average="macro"))
    assert m["mAP"] == pytest.approx(np.mean(aps))
    assert m["macro_f1"] == pytest.approx(f1_score(targets, probs >= 0.5, average="macro"))
    tuned = f1_score(targets, probs >= np.array(thresholds), average="macro")
    assert m["macro_f1_at_threshold"] == pytest.approx(tuned)
    assert m["labels"]["x"]["f1"] == pytest.approx(f1_score(targets[:, 1], probs[:, 1] >= 0.5))
    assert m["exact_match"] == pytest.approx(np.mean(((probs >= 0.5) == targets).all(axis=1)))
    assert m["labels"]["y"]["threshold"] == 0.5 and m["labels"]["z"]["support"] == int(targets[:, 3].sum())


def test_multilabel_undefined_scores_are_none_and_left_out():
    probs, targets = _multilabel(n=50)
    targets[:, 0] = 0  # no positive: AUROC and AP undefined
    targets[:, 1] = 1  # no negative: AUROC undefined, AP defined
    probs[:, 0] = 0.1  # and never predicted: F1 undefined
    m = multilabel_metrics(probs, targets, ["a", "b", "c", "d"])
    assert m["labels"]["a"]["auroc"] is None and m["labels"]["a"]["average_precision"] is None
    assert m["labels"]["a"]["f1"] is None and m["labels"]["b"]["auroc"] is None
    assert m["labels"]["b"]["average_precision"] == pytest.approx(1.0)
    assert m["macro_auroc"] == pytest.approx(np.mean([roc_auc_score(targets[:, j], probs[:, j]) for j in (2, 3)]))
    assert m["mAP"] == pytest.approx(np.mean([average_precision_score(targets[:, j], probs[:, j]) for j in (1, 2, 3)]))
    with pytest.raises(ValueError, match="one threshold per label"):
        multilabel_metrics(probs, targets, ["a", "b", "c", "d"], thresholds=[0.5])


def test_chosen_thresholds_reach_the_best_validation_f1():
    probs, targets = _multilabel(seed=1)
    probs[:20, 2] = 0.5  # ties are kept or dropped together
    chosen = choose_thresholds(probs, targets)
    for j in range(probs.shape[1]):
        truth, cuts = targets[:, j].astype(bool), np.unique(probs[:, j])
        kept = probs[:, j][None, :] >= cuts[:, None]  # every possible cut, brute force
        best = (2 * (kept & truth).sum(1) / (kept.sum(1) + truth.sum())).max()
        assert f1_score(targets[:, j], probs[:, j] >= chosen[j]) == pytest.approx(best)
    assert choose_thresholds(probs, np.zeros_like(targets)).tolist() == [0.5] * 4


def test_retrieval_metrics_by_hand():
    # rows are images, columns texts; the diagonal holds the matching pairs
    sim = np.array([
        [0.9, 0.1, 0.2, 0.0],  # image 0: its text ranks 1
        [0.8, 0.5, 0.1, 0.0],  # image 1: text 0 scores higher -> rank 2
        [0.3, 0.4, 0.2, 0.6],  # image 2: texts 3, 1, 0 higher -> rank 4
        [0.0, 0.0, 0.0, 0.7],  # image 3: rank 1
    ])
    m = retrieval_metrics(sim, ks=(1, 2))
    # text-to-image ranks by column: 1, 1, 2 (image 0 ties the match at 0.2: a tie counts against it), 1
    assert m["image_to_text"] == {"recall@1": 0.5, "recall@2": 0.75, "median_rank": 1.5}
    assert m["text_to_image"] == {"recall@1": 0.75, "recall@2": 1.0, "median_rank": 1.0}
    assert m["n"] == 4
    flat = retrieval_metrics(np.ones((3, 3)))
    assert flat["image_to_text"]["recall@1"] == 0.0 and flat["image_to_text"]["median_rank"] == 3.0
    assert flat["text_to_image"]["recall@10"] == 1.0


def test_hierarchical_metrics_map_predictions_up_the_tree():
    from evaluation.metrics import hierarchical_metrics

    tree = {"a1": ("A", "a"), "a2": ("A", "a"), "b1": ("A", "b"), "c1": ("C", "c")}
    classes = ["a1", "a2", "b1", "c1"]
    y_true = [0, 0, 0, 0, 3]
    y_pred = [0, 1, 2, 3, 3]  # right, right parent, right grandparent, wrong, right
    m = hierarchical_metrics(tree, classes, y_true, y_pred)
    assert m["accuracy_level_3"] == 2 / 5
    assert m["accuracy_level_2"] == 3 / 5
    assert m["accuracy_level_1"] == 4 / 5
    assert m["mean_mistake_distance"] == (1 + 2 + 3) / 3
    assert m["mean_distance"] == 6 / 5

