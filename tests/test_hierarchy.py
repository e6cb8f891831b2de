"""Class trees, hierarchy-aware losses, decisions and metrics, checked against hand computations.

The toy tree used throughout (every leaf at depth 3):

    root ── A ── A1 ── a
       │     │     └── b
       │     └── A2 ── c
       └── B ── B1 ── d

Heights: leaves 0, A1/A2/B1 1, A/B 2, root 3. LCA distances: d(a,b) = 1, d(a,c) = d(b,c) = 2, d(x,d) = 3.
"""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from common.errors import UserError
from datasets.hicervix import hierarchical_distance
from evaluation.hierarchy import (
    ClassTree,
    argmax_nodes,
    backoff_nodes,
    choose_backoff_threshold,
    crm_nodes,
    crm_risk,
    decide,
    decision_scores,
    hicervix_distance,
    hicervix_protocol_metrics,
    hierarchy_metrics,
)
from tasks.hierarchy_losses import HierarchicalCrossEntropy, SoftLabelCrossEntropy, build_loss, soft_label_targets

TOY_PARENTS = {"A": None, "B": "", "A1": "A", "A2": "A", "B1": "B", "a": "A1", "b": "A1", "c": "A2", "d": "B1"}
TOY_CLASSES = ["a", "b", "c", "d"]
# four images: truths a, a, c, b; argmax leaves a, d, b, a
TOY_PROBS = np.array([[0.4, 0.3, 0.2, 0.1], [0.3, 0.25, 0.0, 0.45], [0.1, 0.6, 0.2, 0.1], [0.5, 0.3, 0.1, 0.1]])
TOY_LABELS = np.array([0, 0, 2, 1])

# HiCervix's shape ({leaf: (level_1, level_2)}, as datasets.hicervix.hicervix_tree gives it): level-2 labels
# used as leaves repeat their level-2 label; AGC-NOS and ADC have level-3 children
HICERVIX_LEVELS = {
    "Normal": ("negative", "Normal"), "ECC": ("negative", "ECC"),
    "ASC-US": ("ASC", "ASC-US"), "LSIL": ("ASC", "LSIL"),
    "AGC-FN": ("AGC", "AGC-FN"), "AGC-ECC-NOS": ("AGC", "AGC-NOS"), "AGC-EMC-NOS": ("AGC", "AGC-NOS"),
    "ADC-ECC": ("AGC", "ADC"), "FUNGI": ("microbe", "FUNGI"),
}
HICERVIX_CLASSES = sorted(HICERVIX_LEVELS)


@pytest.fixture(scope="module")
def toy() -> ClassTree:
    return ClassTree.from_parents(TOY_PARENTS, TOY_CLASSES)


@pytest.fixture(scope="module")
def hicervix() -> ClassTree:
    return ClassTree.from_levels(HICERVIX_LEVELS, HICERVIX_CLASSES)


def _nodes(tree: ClassTree, *keys: str) -> np.ndarray:
    return np.array([tree.node(k) for k in keys])


# -- the tree ---------------------------------------------------------------------------------------


def test_toy_tree_structure(toy):
    assert [toy.labels[n] for n in toy.leaves] == TOY_CLASSES
    depth = {toy.keys[n]: int(toy.depth[n]) for n in range(toy.num_nodes)}
    height = {toy.keys[n]: int(toy.height[n]) for n in range(toy.num_nodes)}
    assert depth == {"<root>": 0, "A": 1, "B": 1, "A1": 2, "A2": 2, "B1": 2, "a": 3, "b": 3, "c": 3, "d": 3}
    assert height == {"<root>": 3, "A": 2, "B": 2, "A1": 1, "A2": 1, "B1": 1, "a": 0, "b": 0, "c": 0, "d": 0}
    assert [toy.keys[n] for n in toy.ancestors(toy.node("b"))] == ["<root>", "A", "A1"]
    assert sorted(toy.keys[n] for n in toy.nodes_at_level(2)) == ["A1", "A2", "B1"]
    assert toy.keys[int(toy.lca(toy.node("b"), toy.node("c")))] == "A"
    assert toy.keys[int(toy.lca(toy.node("A1"), toy.node("a")))] == "A1"
    np.testing.assert_array_equal(toy.distance_matrix(), [[0, 1, 2, 3], [1, 0, 2, 3], [2, 2, 0, 3], [3, 3, 3, 0]])


def test_leaves_follow_the_dataset_class_order():
    order = ["d", "a", "c", "b"]
    tree = ClassTree.from_parents(TOY_PARENTS, order)
    assert [tree.labels[n] for n in tree.leaves] == order
    np.testing.assert_array_equal(tree.distance_matrix(), [[0, 3, 3, 3], [3, 0, 2, 1], [3, 2, 0, 2], [3, 1, 2, 0]])


def test_unbalanced_tree_distance_is_the_height_of_the_lca():
    tree = ClassTree.from_parents({"X": None, "Y": "X", "p": "Y", "q": "X", "r": None}, ["p", "q", "r"])
    assert tree.height[0] == 3 and tree.height[tree.node("X")] == 2
    np.testing.assert_array_equal(tree.distance_matrix(), [[0, 2, 3], [2, 0, 3], [3, 3, 0]])


def test_tree_csv_reads_rows_and_drops_nodes_without_classes(tmp_path):
    path = tmp_path / "tree.csv"
    path.write_text("class,parent\nnormal,\nabnormal,\nnormal_columnar,normal\nnormal_superficiel,normal\n"
                    "carcinoma_in_situ,abnormal\nunused_leaf,abnormal\nunused_branch,\n")
    classes = ["carcinoma_in_situ", "normal_columnar", "normal_superficiel"]
    tree = ClassTree.from_csv(path, classes)
    assert set(tree.keys) == {"<root>", "normal", "abnormal", *classes}
    np.testing.assert_array_equal(tree.distance_matrix(), [[0, 2, 2], [2, 0, 1], [2, 1, 0]])


@pytest.mark.parametrize("rows, classes, says", [
    ("a,b\nb,a\n", ["a"], "cycle"),
    ("a,a\n", ["a"], "cycle"),
    ("a,nowhere\n", ["a"], "parent 'nowhere' of 'a' is not in the tree"),
    ("a,\na,\n", ["a"], "listed twice"),
    ("a,\n", ["a", "b"], "'b' of the dataset are not in the tree"),
    ("g,\na,g\n", ["a", "g"], "'g' have children"),
    ("a,b,c\n", ["a"], "is not 'class,parent'"),
])
def test_tree_csv_mistakes_are_one_line_errors(tmp_path, rows, classes, says):
    path = tmp_path / "tree.csv"
    path.write_text(rows)
    with pytest.raises(UserError, match=says) as err:
        ClassTree.from_csv(path, classes)
    assert "\n" not in str(err.value)


def test_hicervix_level_map_distance_agrees_with_the_dataset_module(hicervix):
    dist = hicervix.distance_matrix()
    for i, a in enumerate(HICERVIX_CLASSES):
        for j, b in enumerate(HICERVIX_CLASSES):
            assert dist[i, j] == hierarchical_distance(HICERVIX_LEVELS, a, b), (a, b)
    # labels keep the dataset's names; a leaf that repeats its level-2 label sits one level below it
    normal = hicervix.node("Normal")
    assert hicervix.describe([normal, hicervix.parent[normal]]) == [("Normal", 3), ("Normal", 2)]
    assert {hicervix.labels[n] for n in hicervix.nodes_at_level(1)} == {"negative", "ASC", "AGC", "microbe"}


@pytest.mark.parametrize("a, b, expected", [
    ("Normal", "ECC", math.log(2)),             # same depth (2), LCA one step up
    ("Normal", "ASC-US", math.log(3)),          # same depth (2), LCA the root
    ("AGC-ECC-NOS", "AGC-EMC-NOS", math.log(2)),
    ("ADC-ECC", "AGC-ECC-NOS", math.log(3)),
    ("Normal", "AGC-ECC-NOS", 3.0),             # depths 2 and 3: steps from the deeper one, not logged
    ("AGC-FN", "AGC-ECC-NOS", 2.0),
    ("LSIL", "LSIL", 0.0),
])
def test_hicervix_own_distance_matches_its_lca_height(hicervix, a, b, expected):
    assert hicervix_distance(hicervix, hicervix.node(a), hicervix.node(b)) == pytest.approx(expected)


# -- losses -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tree_name", ["toy", "hicervix"])
def test_hxe_with_alpha_zero_is_cross_entropy(request, tree_name):
    tree = request.getfixturevalue(tree_name)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, tree.num_classes, generator=gen) * 3
    target = torch.randint(tree.num_classes, (16,), generator=gen)
    torch.testing.assert_close(HierarchicalCrossEntropy(tree, 0.0)(logits, target), F.cross_entropy(logits, target))


@pytest.mark.parametrize("tree_name", ["toy", "hicervix"])
def test_soft_labels_with_huge_beta_are_one_hot_cross_entropy(request, tree_name):
    tree = request.getfixturevalue(tree_name)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, tree.num_classes, generator=gen) * 3
    target = torch.randint(tree.num_classes, (16,), generator=gen)
    np.testing.assert_allclose(soft_label_targets(tree, 1e4), np.eye(tree.num_classes), atol=1e-12)
    torch.testing.assert_close(SoftLabelCrossEntropy(tree, 1e4)(logits, target), F.cross_entropy(logits, target))


def test_hxe_by_hand_on_the_toy_tree(toy):
    # p = (0.4, 0.3, 0.2, 0.1), truth a: p(A) = 0.9, p(A1) = 0.7; weights exp(-alpha * depth), alpha = 0.5
    # HXE = -[e^-0.5 ln(0.9 / 1) + e^-1 ln(0.7 / 0.9) + e^-1.5 ln(0.4 / 0.7)]
    #     = 0.6065307 * 0.1053605 + 0.3678794 * 0.2513144 + 0.2231302 * 0.5596158 = 0.2812250
    expected = -(math.exp(-0.5) * math.log(0.9) + math.exp(-1.0) * math.log(0.7 / 0.9)
                 + math.exp(-1.5) * math.log(0.4 / 0.7))
    assert expected == pytest.approx(0.2812250, abs=1e-7)
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    assert HierarchicalCrossEntropy(toy, 0.5)(logits, torch.tensor([0])).item() == pytest.approx(expected, abs=1e-6)
    # truth d: p(B) = 0.1 and the unary steps B -> B1 -> d are certain: only -e^-0.5 ln 0.1 is left
    got = HierarchicalCrossEntropy(toy, 0.5)(logits, torch.tensor([3])).item()
    assert got == pytest.approx(-math.exp(-0.5) * math.log(0.1), abs=1e-6)


def test_soft_labels_by_hand_on_the_toy_tree(toy):
    # beta = 3 and d_max = 3, so the target of truth a is proportional to exp(-d): (1, e^-1, e^-2, e^-3) / Z,
    # Z = 1 + 0.3678794 + 0.1353353 + 0.0497871 = 1.5530018
    z = 1 + math.exp(-1) + math.exp(-2) + math.exp(-3)
    q = [1 / z, math.exp(-1) / z, math.exp(-2) / z, math.exp(-3) / z]
    assert q == pytest.approx([0.6439143, 0.2368828, 0.0871443, 0.0320586], abs=1e-7)
    np.testing.assert_allclose(soft_label_targets(toy, 3.0)[0], q, atol=1e-12)
    # loss = -sum q_c ln p_c with p = (0.4, 0.3, 0.2, 0.1) = 1.0892842
    expected = -sum(qc * math.log(pc) for qc, pc in zip(q, [0.4, 0.3, 0.2, 0.1], strict=True))
    assert expected == pytest.approx(1.0892842, abs=1e-7)
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    assert SoftLabelCrossEntropy(toy, 3.0)(logits, torch.tensor([0])).item() == pytest.approx(expected, abs=1e-6)


def test_losses_train_with_finite_gradients_on_saturated_logits(toy):
    logits = torch.tensor([[60.0, -60.0, -60.0, 60.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([1, 2])
    for loss in (HierarchicalCrossEntropy(toy, 0.3), SoftLabelCrossEntropy(toy, 5.0)):
        logits.grad = None
        value = loss(logits, target)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_build_loss_needs_a_tree_for_hierarchical_losses(toy):
    assert isinstance(build_loss("ce", None, alpha=0.1, beta=10), torch.nn.CrossEntropyLoss)
    assert isinstance(build_loss("hxe", toy, alpha=0.1, beta=10), HierarchicalCrossEntropy)
    with pytest.raises(UserError, match="needs a class tree"):
        build_loss("soft", None, alpha=0.1, beta=10)
    with pytest.raises(UserError, match="unknown --loss"):
        build_loss("focal", toy, alpha=0.1, beta=10)


# -- decisions ----------------------------------------------------------------------------------------


def test_crm_with_all_distances_equal_is_the_argmax():
    tree = ClassTree.flat([f"c{i}" for i in range(7)])
    probs = np.random.default_rng(0).dirichlet(np.ones(7), size=200)
    assert set(np.unique(tree.distance_matrix())) == {0.0, 1.0}
    np.testing.assert_array_equal(crm_nodes(tree, probs), argmax_nodes(tree, probs))


def test_crm_by_hand_on_the_toy_tree(toy):
    # p = (0.3, 0.25, 0, 0.45): argmax d, but the risks are a: 0.25*1 + 0.45*3 = 1.60, b: 0.3 + 1.35 = 1.65,
    # c: 0.6 + 0.5 + 1.35 = 2.45, d: 0.55 * 3 = 1.65, so CRM predicts a
    probs = TOY_PROBS[1:2]
    np.testing.assert_allclose(crm_risk(toy, probs), [[1.60, 1.65, 2.45, 1.65]])
    assert toy.keys[int(argmax_nodes(toy, probs)[0])] == "d"
    assert toy.keys[int(crm_nodes(toy, probs)[0])] == "a"
    assert toy.keys[int(decide(toy, probs, "crm")[0])] == "a"


def test_backoff_threshold_zero_is_the_argmax_and_one_the_root(hicervix):
    probs = np.random.default_rng(1).dirichlet(np.ones(hicervix.num_classes) * 0.3, size=100)
    np.testing.assert_array_equal(backoff_nodes(hicervix, probs, 0.0), argmax_nodes(hicervix, probs))
    assert (backoff_nodes(hicervix, probs, 1.0) == 0).all()
    # even when one class holds all the probability
    assert (backoff_nodes(hicervix, np.eye(hicervix.num_classes), 1.0) == 0).all()


def test_backoff_walks_up_the_argmax_path(toy):
    # image 0: path probabilities root 1, A 0.9, A1 0.7, a 0.4 (the deepest node above the threshold wins)
    probs = TOY_PROBS[:1]
    got = {t: toy.describe(backoff_nodes(toy, probs, t))[0] for t in (0.0, 0.39, 0.4, 0.5, 0.8, 0.95, 1.0)}
    assert got == {0.0: ("a", 3), 0.39: ("a", 3), 0.4: ("A1", 2), 0.5: ("A1", 2), 0.8: ("A", 1),
                   0.95: ("root", 0), 1.0: ("root", 0)}
    with pytest.raises(UserError, match="needs --backoff_threshold"):
        decide(toy, probs, "backoff")


def test_backoff_threshold_chosen_on_validation_is_the_smallest_that_meets_the_target(toy):
    # an image is correct-or-ancestor once the threshold reaches the probability of its path's first node
    # below LCA(argmax, truth): image 0 always (argmax right), 1 at p(B) = 0.45, 2 at p(A1) = 0.7, 3 at p(a) = 0.5
    picks = {target: choose_backoff_threshold(toy, TOY_PROBS, TOY_LABELS, target) for target in (0.25, 0.5, 0.75, 1)}
    assert picks == {0.25: 0.0, 0.5: 0.45, 0.75: 0.5, 1: 0.7}
    for target, threshold in picks.items():
        rate = hierarchy_metrics(toy, TOY_PROBS, TOY_LABELS, backoff_nodes(toy, TOY_PROBS, threshold))
        assert rate["correct_or_ancestor"] >= target
        if threshold > 0:
            below = hierarchy_metrics(toy, TOY_PROBS, TOY_LABELS, backoff_nodes(toy, TOY_PROBS, threshold - 1e-3))
            assert below["correct_or_ancestor"] < target


# -- metrics ----------------------------------------------------------------------------------------


def test_metrics_of_argmax_by_hand(toy):
    # truths a, a, c, b; argmax a, d, b, a: distances 0, 3, 2, 1
    m = hierarchy_metrics(toy, TOY_PROBS, TOY_LABELS, ks=(1, 2, 5, 20))
    assert m["accuracy"] == 0.25
    # level 1: truths A A A A, predictions A B A A; level 2: A1 A1 A2 A1 vs A1 B1 A1 A1
    assert m["accuracy_level_1"] == 0.75 and m["balanced_accuracy_level_1"] == 0.75
    assert m["accuracy_level_2"] == 0.5 and m["balanced_accuracy_level_2"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["accuracy_level_3"] == 0.25 and m["balanced_accuracy_level_3"] == pytest.approx((1 / 2 + 0 + 0) / 3)
    assert m["mean_distance"] == 1.5 and m["mistake_severity"] == 2.0
    # top-2 by probability: (a, b), (d, a), (b, c), (a, b) -> distances (0,1), (3,0), (2,0), (1,0)
    assert m["hierarchical_distance@1"] == 1.5
    assert m["hierarchical_distance@2"] == pytest.approx((0.5 + 1.5 + 1.0 + 0.5) / 4)
    # k = 5 and 20 are capped at the 4 classes: each image's mean distance to all classes
    assert m["hierarchical_distance@4"] == pytest.approx((1.5 + 1.5 + 1.75 + 1.5) / 4)
    assert "hierarchical_distance@5" not in m and "hierarchical_distance@20" not in m
    # LCA information: I(leaf) = 2 bits, I(A1) = 1, I(A) = log2(4/3), I(root) = 0
    info_a = math.log2(4 / 3)
    per_image = [1.0, 0.0, info_a / 2, 1 / 2]  # precision = recall = F1 for leaf predictions
    assert m["lca_precision"] == pytest.approx(np.mean(per_image))
    assert m["lca_recall"] == pytest.approx(np.mean(per_image)) and m["lca_f1"] == pytest.approx(np.mean(per_image))
    assert m["correct_or_ancestor"] == 0.25 and m["mean_predicted_level"] == 3.0
    assert all(isinstance(v, float) for v in m.values())


def test_metrics_of_backoff_predictions_by_hand(toy):
    # threshold 0.5 predicts A1, root, b, A1 for truths a, a, c, b
    nodes = backoff_nodes(toy, TOY_PROBS, 0.5)
    assert [toy.keys[n] for n in nodes] == ["A1", "<root>", "b", "A1"]
    m = hierarchy_metrics(toy, TOY_PROBS, TOY_LABELS, nodes)
    assert m["correct_or_ancestor"] == 0.75 and m["accuracy"] == 0.0
    # precision I(lca)/I(pred): 1/1, 0/0 -> 1, I(A)/2, 1/1; recall I(lca)/I(truth): 1/2, 0, I(A)/2, 1/2
    info_a = math.log2(4 / 3)
    assert m["lca_precision"] == pytest.approx((1 + 1 + info_a / 2 + 1) / 4)
    assert m["lca_recall"] == pytest.approx((0.5 + 0 + info_a / 2 + 0.5) / 4)
    assert m["lca_f1"] == pytest.approx((2 / 3 + 0 + info_a / 2 + 2 / 3) / 4)
    # an inner node shallower than a level is wrong there
    assert (m["accuracy_level_1"], m["accuracy_level_2"], m["accuracy_level_3"]) == (0.75, 0.5, 0.0)
    assert m["mean_distance"] == pytest.approx((1 + 3 + 2 + 1) / 4) and m["mean_predicted_level"] == 1.75


def test_crm_scores_rank_classes_by_risk(toy):
    m = hierarchy_metrics(toy, TOY_PROBS, TOY_LABELS, decide(toy, TOY_PROBS, "crm"),
                          decision_scores(toy, TOY_PROBS, "crm"))
    assert m["hierarchical_distance@1"] == m["mean_distance"]


def test_hicervix_protocol_by_hand(toy):
    # level 1: summed probabilities pick A for all four (truth A): accuracy 1, distance 0
    # level 2: A1, A1, A1, A1 against A1, A1, A2, A1: one mistake at ln(1 + 1)
    # level 3: argmax a, d, b, a against a, a, c, b: 0, ln(1 + 3), ln(1 + 2), ln(1 + 1)
    m = hicervix_protocol_metrics(toy, TOY_PROBS, TOY_LABELS)
    level_3 = (math.log(4) + math.log(3) + math.log(2)) / 4
    assert m["accuracy_level_1"] == 1.0 and m["hierarchical_distance_level_1"] == 0.0
    assert m["accuracy_level_2"] == 0.75 and m["hierarchical_distance_level_2"] == pytest.approx(math.log(2) / 4)
    assert m["accuracy_level_3"] == 0.25 and m["hierarchical_distance_level_3"] == pytest.approx(level_3)
    assert m["mean_accuracy"] == pytest.approx(2 / 3)
    assert m["mean_hierarchical_distance"] == pytest.approx((0 + math.log(2) / 4 + level_3) / 3)


def test_hicervix_protocol_on_its_level_map_uses_its_own_tree(hicervix):
    # a Normal cell taken for ECC at level 3 (same level-2 family) and an ASC-US cell taken for AGC-ECC-NOS
    probs = np.zeros((2, hicervix.num_classes))
    cls = {c: i for i, c in enumerate(HICERVIX_CLASSES)}
    probs[0, cls["ECC"]], probs[0, cls["Normal"]] = 0.6, 0.4
    probs[1, cls["AGC-ECC-NOS"]], probs[1, cls["ASC-US"]], probs[1, cls["LSIL"]] = 0.4, 0.3, 0.3
    m = hicervix_protocol_metrics(hicervix, probs, [cls["Normal"], cls["ASC-US"]])
    # level 1: negative right; ASC (0.6) beats AGC (0.4): right
    assert m["accuracy_level_1"] == 1.0
    # level 2: ECC for Normal (ln 2); ASC-US (0.3) ties LSIL, below AGC-NOS (0.4): AGC-NOS for ASC-US (ln 3)
    assert m["hierarchical_distance_level_2"] == pytest.approx((math.log(2) + math.log(3)) / 2)
    # level 3: ECC for Normal (ln 2); AGC-ECC-NOS (depth 3) for ASC-US (depth 2): 3 steps, not logged
    assert m["hierarchical_distance_level_3"] == pytest.approx((math.log(2) + 3) / 2)
