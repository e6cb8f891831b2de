"""Class trees: the tree itself, tree distances, hierarchy-aware decisions and the metrics that judge them.

Numbers in, numbers out (numpy only). A :class:`ClassTree` has an implicit root (node 0), inner
nodes, and one leaf per class of the dataset, in the dataset's class order. It is built from a
``{node: parent}`` map, from HiCervix's ``{leaf: (level_1, level_2)}`` map, or from a ``tree.csv``
of ``class,parent`` rows.

Definitions (and where they come from):

* depth: edges from the root (root 0); a node's level is its depth.
* height: the longest way down from a node to a leaf below it (leaves 0).
* distance d(a, b): the height of the lowest common ancestor (LCA) of a and b, as in Bertinetto et
  al. (CVPR 2020, ``fiveai/making-better-mistakes``) and Karthik et al. (ICLR 2021); 0 when a == b.
  On HiCervix's padded level map (every leaf at depth 3) this is ``datasets.hicervix.hierarchical_distance``.
* HiCervix's own "hierarchical distance" (``Scu-sen/HiCervix``, ``HierSwin/scripts/metrics_eval.py``,
  ``lca_height``) differs: on the unpadded tree, log(1 + h) when both nodes lie at the same depth, and
  h (not logged) otherwise, with h the steps from the deeper node up to the LCA; its "mean hierarchical
  distance" is the mean over the three levels of the per-level mean. See :func:`hicervix_protocol_metrics`.
* decisions: ``argmax`` (most probable leaf), ``crm`` (argmin_k sum_c p(c|x) D[c, k], Karthik et al.),
  ``backoff`` (the deepest node on the argmax leaf's root path whose probability exceeds a threshold,
  in the spirit of Valmadre, NeurIPS 2022).
* LCA precision / recall / F1 and correct-or-ancestor: Valmadre's (``jvlmdr/hiercls``, ``metrics.py``):
  with I(n) = -log2(leaves under n / all leaves), recall = I(lca) / I(truth), precision = I(lca) / I(pred)
  (0/0 counts as 1), F1 their harmonic mean, each per image then averaged; a prediction is correct when
  it is the truth or one of its ancestors.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from common.errors import UserError

ROOT_KEY, ROOT_LABEL = "<root>", "root"
LEVEL_KEY = "level_{level}:{path}"  # keys of inner nodes built from a level map, apart from class names
PATH_SEP = " > "
TOPK = (1, 5, 20)

Decision = Literal["argmax", "crm", "backoff"]
DECISIONS: tuple[str, ...] = get_args(Decision)


class TreeError(UserError):
    """A class tree that cannot be used, with what to fix."""


class ClassTree:
    """A rooted tree whose leaves are the dataset's classes (node 0 is the root).

    Nodes are integers; ``keys`` names them uniquely, ``labels`` for display (two nodes may share a label,
    as a HiCervix level-2 label and the leaf that repeats it). ``leaves[k]`` is the node of class k.
    """

    def __init__(self, keys: Sequence[str], labels: Sequence[str], parents: Sequence[int], classes: Sequence[str]):
        """Arrays of a checked tree (node 0 the root, parents before children); use the ``from_*`` constructors."""
        self.keys = tuple(keys)
        self.labels = tuple(labels)
        self.parent = np.asarray(parents, dtype=np.int64)
        self.classes = tuple(classes)
        index = {key: i for i, key in enumerate(self.keys)}
        self.leaves = np.array([index[c] for c in self.classes], dtype=np.int64)
        n = len(self.keys)
        self.depth = np.zeros(n, dtype=np.int64)
        for i in range(1, n):  # parents come before their children
            self.depth[i] = self.depth[self.parent[i]] + 1
        self.max_depth = int(self.depth.max()) if n > 1 else 0
        # up[n, d]: the ancestor of n at depth d (n itself at its own depth), -1 below n
        self._up = np.full((n, self.max_depth + 1), -1, dtype=np.int64)
        for i in range(n):
            if i:
                self._up[i] = self._up[self.parent[i]]
            self._up[i, self.depth[i]] = i
        self.height = np.zeros(n, dtype=np.int64)
        for i in range(n - 1, 0, -1):
            p = self.parent[i]
            self.height[p] = max(self.height[p], self.height[i] + 1)
        # member[n, k]: class k lies under node n (or is n)
        self.member = self._up[self.leaves][:, self.depth].T == np.arange(n)[:, None]
        self.num_leaves = self.member.sum(axis=1)
        self.is_leaf = np.ones(n, dtype=bool)
        self.is_leaf[self.parent[1:]] = False
        self.class_of = np.full(n, -1, dtype=np.int64)
        self.class_of[self.leaves] = np.arange(len(self.leaves))
        # Valmadre's information of a node: -log2 of the share of leaves under it
        self.info = -np.log2(self.num_leaves / len(self.leaves))
        self._distances: np.ndarray | None = None

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_parents(cls, parents: Mapping[str, str | None], classes: Sequence[str],
                     source: str = "the class tree", labels: Mapping[str, str] | None = None) -> ClassTree:
        """The tree of a ``{node: parent}`` map; an empty or None parent means the (implicit) root.

        Nodes with no class of the dataset below them are dropped. TreeError for an unknown parent, a
        cycle, a class of the dataset missing from the map, or a class that has children.
        """
        parent_of = {str(k): (str(v) if v else "") for k, v in parents.items()}
        if ROOT_KEY in parent_of:
            raise TreeError(f"{source}: '{ROOT_KEY}' names the implicit root; rename that node")
        for node, parent in parent_of.items():
            if parent and parent not in parent_of:
                raise TreeError(f"{source}: the parent '{parent}' of '{node}' is not in the tree; add a row for it "
                                "(an empty parent puts a node under the root)")
        for node in parent_of:
            seen = [node]
            while parent_of[seen[-1]]:
                seen.append(parent_of[seen[-1]])
                if seen[-1] in seen[:-1]:
                    loop = PATH_SEP.join(seen[seen.index(seen[-1]):])
                    raise TreeError(f"{source}: the parents form a cycle ({loop}); each node needs a path to the root")
        missing = [c for c in classes if c not in parent_of]
        if missing:
            raise TreeError(f"{source}: class(es) {', '.join(repr(c) for c in missing)} of the dataset are not in the "
                            "tree; add a 'class,parent' row for each")
        inner = {p for p in parent_of.values() if p}
        internal = [c for c in classes if c in inner]
        if internal:
            raise TreeError(f"{source}: class(es) {', '.join(repr(c) for c in internal)} have children in the tree; "
                            "the dataset's classes must be leaves")
        if len(set(classes)) != len(classes):
            raise TreeError(f"{source}: the dataset lists a class twice")
        keep: dict[str, None] = {}  # ordered: the classes' paths, root side first
        for c in classes:
            chain = [c]
            while parent_of[chain[-1]]:
                chain.append(parent_of[chain[-1]])
            for node in reversed(chain):
                keep.setdefault(node, None)
        depth = {n: _depth(n, parent_of) for n in keep}
        order = sorted(keep, key=lambda n: depth[n])  # stable: parents before children
        index = {n: i + 1 for i, n in enumerate(order)}
        parent_index = [-1] + [index[parent_of[n]] if parent_of[n] else 0 for n in order]
        shown = [ROOT_LABEL] + [(labels or {}).get(n, n) for n in order]
        return cls([ROOT_KEY, *order], shown, parent_index, classes)

    @classmethod
    def from_levels(cls, levels: Mapping[str, Sequence[str]], classes: Sequence[str],
                    source: str = "the label levels") -> ClassTree:
        """The tree of a ``{leaf: (level_1, level_2, ...)}`` map (``datasets.hicervix.hicervix_tree``'s).

        Every leaf hangs at depth len(ancestors) + 1, under its ancestors in order, even where a label
        repeats the one above it (HiCervix's level-2 label used as a leaf), so that the LCA height equals
        ``datasets.hicervix.hierarchical_distance``. Inner nodes are keyed by their level and path.
        """
        parents: dict[str, str | None] = {}
        shown: dict[str, str] = {}
        for c in classes:
            if c not in levels:
                raise TreeError(f"{source}: class '{c}' of the dataset has no ancestors in the level map")
            chain = [str(a).strip() for a in levels[c]]
            if any(not a for a in chain):
                raise TreeError(f"{source}: class '{c}' has an empty ancestor ({PATH_SEP.join(chain)})")
            above = None
            for level, name in enumerate(chain, start=1):
                key = LEVEL_KEY.format(level=level, path=PATH_SEP.join(chain[:level]))
                if key in classes:
                    raise TreeError(f"{source}: class '{key}' clashes with the name of an inner node")
                parents[key], shown[key], above = above, name, key
            parents[c] = above
        return cls.from_parents(parents, classes, source=source, labels=shown)

    @classmethod
    def from_csv(cls, path: str | Path, classes: Sequence[str]) -> ClassTree:
        """The tree of a ``tree.csv`` of ``class,parent`` rows (an optional header; empty parent = root)."""
        path = Path(path)
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = [[cell.strip() for cell in row] for row in csv.reader(f) if any(c.strip() for c in row)]
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise TreeError(f"cannot read {path}: {err}") from err
        if rows and [c.lower() for c in rows[0][:2]] == ["class", "parent"]:
            rows = rows[1:]
        parents: dict[str, str | None] = {}
        for line, row in enumerate(rows, start=1):
            if len(row) > 2 or not row[0]:
                raise TreeError(f"{path}: row {line} ({','.join(row)}) is not 'class,parent'; fix the row")
            if row[0] in parents:
                raise TreeError(f"{path}: class '{row[0]}' is listed twice; keep one row per class")
            parents[row[0]] = row[1] if len(row) > 1 else ""
        return cls.from_parents(parents, classes, source=str(path))

    @classmethod
    def flat(cls, classes: Sequence[str]) -> ClassTree:
        """Every class directly under the root: all distances between distinct classes are 1."""
        return cls.from_parents({c: None for c in classes}, classes)

    # -- structure --------------------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        """Nodes, the root included."""
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        """Leaves (the dataset's classes)."""
        return len(self.leaves)

    def node(self, key: str) -> int:
        """The node of a key (a class name, or an inner node's key)."""
        try:
            return self.keys.index(key)
        except ValueError:
            raise TreeError(f"'{key}' is not a node of the class tree") from None

    def path(self, node: int) -> list[int]:
        """The nodes from the root down to ``node``, both included."""
        return [int(n) for n in self._up[node, : self.depth[node] + 1]]

    def ancestors(self, node: int) -> list[int]:
        """The ancestors of ``node``, root first, itself excluded."""
        return self.path(node)[:-1]

    def nodes_at_level(self, level: int) -> list[int]:
        """The nodes at depth ``level`` (level 0 is the root)."""
        return [int(n) for n in np.flatnonzero(self.depth == level)]

    def at_level(self, nodes, level: int) -> np.ndarray:
        """Each node's ancestor at depth ``level``; a shallower leaf stands for itself, a shallower inner node is -1.

        A leaf above ``level`` keeps its own label there, as HiCervix's level-3 label of a level-2 class.
        """
        nodes = np.asarray(nodes, dtype=np.int64)
        if not 0 <= level <= self.max_depth:
            raise ValueError(f"level {level} outside 0..{self.max_depth}")
        deep = self.depth[nodes] >= level
        return np.where(deep, self._up[nodes, level], np.where(self.is_leaf[nodes], nodes, -1))

    def lca(self, a, b) -> np.ndarray:
        """The lowest common ancestor of nodes ``a`` and ``b`` (broadcast arrays or ints)."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        ua, ub = self._up[a], self._up[b]
        deepest = ((ua == ub) & (ua >= 0)).sum(axis=-1) - 1  # agreement is a prefix of the two paths
        return np.take_along_axis(ua, deepest[..., None], axis=-1)[..., 0]

    def distance(self, a, b) -> np.ndarray:
        """The LCA distance between nodes: the height of their lowest common ancestor (0 when equal leaves)."""
        return self.height[self.lca(a, b)]

    def distance_matrix(self) -> np.ndarray:
        """The class x class LCA distance matrix (float64, in class order)."""
        if self._distances is None:
            self._distances = self.distance(self.leaves[:, None], self.leaves[None, :]).astype(np.float64)
            self._distances.setflags(write=False)  # shared by every caller
        return self._distances

    def node_probs(self, probs: np.ndarray) -> np.ndarray:
        """Each node's probability: the sum of its classes' (images x nodes; the root is 1), at most 1."""
        probs = np.asarray(probs, dtype=np.float64)
        return np.minimum(probs @ self.member.T, 1.0)

    def describe(self, nodes) -> list[tuple[str, int]]:
        """(label, level) of each node, for predictions.csv."""
        return [(self.labels[n], int(self.depth[n])) for n in np.asarray(nodes, dtype=np.int64).tolist()]

    def collapsed(self) -> np.ndarray:
        """Each node moved up while its parent bears the same label (a HiCervix leaf that repeats its level-2
        label is that level-2 node): the node as HiCervix's own tree has it."""
        out = np.arange(self.num_nodes)
        for i in range(1, self.num_nodes):  # parents first, so out[parent] is final
            p = self.parent[i]
            if p > 0 and self.labels[p] == self.labels[i]:
                out[i] = out[p]
        return out


def _depth(node: str, parent_of: Mapping[str, str]) -> int:
    d = 1
    while parent_of[node]:
        node, d = parent_of[node], d + 1
    return d


# -- decisions ------------------------------------------------------------------------------------


def argmax_nodes(tree: ClassTree, probs: np.ndarray) -> np.ndarray:
    """The most probable leaf of each image (as a node)."""
    return tree.leaves[np.asarray(probs).argmax(axis=1)]


def crm_risk(tree: ClassTree, probs: np.ndarray) -> np.ndarray:
    """Expected tree distance of predicting each class: risk[i, k] = sum_c p(c | x_i) D[c, k]."""
    return np.asarray(probs, dtype=np.float64) @ tree.distance_matrix()


def crm_nodes(tree: ClassTree, probs: np.ndarray) -> np.ndarray:
    """Conditional risk minimisation (Karthik et al., ICLR 2021): the leaf of least expected distance."""
    return tree.leaves[crm_risk(tree, probs).argmin(axis=1)]


def _argmax_path_probs(tree: ClassTree, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The argmax leaf's root path (images x depths, -1 past the leaf) and its nodes' probabilities
    (made non-increasing down the path, so that float sums cannot break the nesting; -inf past the leaf)."""
    leaf = argmax_nodes(tree, probs)
    path = tree._up[leaf]
    p = np.take_along_axis(tree.node_probs(probs), np.maximum(path, 0), axis=1)
    p[:, 0] = 1.0
    p = np.where(path >= 0, np.minimum.accumulate(p, axis=1), -np.inf)
    return path, p


def backoff_nodes(tree: ClassTree, probs: np.ndarray, threshold: float) -> np.ndarray:
    """The deepest node on the argmax leaf's root path whose probability exceeds ``threshold``.

    The root always qualifies: threshold 0 gives the argmax leaf (its probability is positive), threshold
    1 gives the root. Raising the threshold only ever moves a prediction up its path.
    """
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--backoff_threshold {threshold} is outside [0, 1]; choose a probability")
    path, p = _argmax_path_probs(tree, probs)
    ok = p > threshold
    ok[:, 0] = True
    deepest = ok.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
    return path[np.arange(len(path)), deepest]


def choose_backoff_threshold(tree: ClassTree, probs: np.ndarray, labels, target: float = 0.9) -> float:
    """The smallest threshold at which :func:`backoff_nodes` is correct-or-ancestor on at least ``target`` of
    the (validation) images: the most specific predictions that meet the target.

    The rate only grows with the threshold (predictions move up their paths), and at 1 every prediction is
    the root, which is always correct, so the target is always met. An image is right exactly when the
    threshold is at least the probability of the first node of its path below LCA(argmax leaf, truth).
    """
    if not 0.0 <= target <= 1.0:
        raise UserError(f"backoff target {target} is outside [0, 1]")
    labels = np.asarray(labels, dtype=np.int64)
    _, p = _argmax_path_probs(tree, probs)
    shared = tree.depth[tree.lca(argmax_nodes(tree, probs), tree.leaves[labels])]
    # the probability of the path's first node below the LCA; -inf when there is none (the argmax leaf is right)
    below = shared + 1
    has_below = below < p.shape[1]
    need = np.full(len(p), -np.inf)
    need[has_below] = p[np.flatnonzero(has_below), below[has_below]]
    m = math.ceil(target * len(need) - 1e-9)
    if m <= 0 or not len(need):
        return 0.0
    return float(np.clip(np.sort(need)[m - 1], 0.0, 1.0))


def decide(tree: ClassTree, probs: np.ndarray, rule: Decision = "argmax", threshold: float | None = None) -> np.ndarray:
    """The predicted node of each image under a decision rule (``threshold`` for backoff only)."""
    if rule == "argmax":
        return argmax_nodes(tree, probs)
    if rule == "crm":
        return crm_nodes(tree, probs)
    if rule == "backoff":
        if threshold is None:
            raise UserError("--decision backoff needs --backoff_threshold (a probability, or chosen on validation)")
        return backoff_nodes(tree, probs, threshold)
    raise UserError(f"unknown --decision '{rule}': choose one of {', '.join(DECISIONS)}")


def decision_scores(tree: ClassTree, probs: np.ndarray, rule: Decision = "argmax") -> np.ndarray:
    """Scores that rank the classes as the rule would (higher first): -risk for CRM, else the probabilities."""
    return -crm_risk(tree, probs) if rule == "crm" else np.asarray(probs, dtype=np.float64)


# -- metrics --------------------------------------------------------------------------------------


def level_metrics(tree: ClassTree, labels, nodes) -> dict[str, float]:
    """Accuracy and balanced accuracy at each level 1..max_depth, predictions and truths mapped up the tree.

    A prediction above a level (an inner node shallower than it) is wrong at that level.
    """
    truth_nodes = tree.leaves[np.asarray(labels, dtype=np.int64)]
    out: dict[str, float] = {}
    for level in range(1, tree.max_depth + 1):
        truth, pred = tree.at_level(truth_nodes, level), tree.at_level(nodes, level)
        right = pred == truth
        out[f"accuracy_level_{level}"] = float(right.mean())
        out[f"balanced_accuracy_level_{level}"] = float(np.mean([right[truth == t].mean() for t in np.unique(truth)]))
    return out


def topk_distance(tree: ClassTree, scores: np.ndarray, labels, ks: Sequence[int] = TOPK) -> dict[str, float]:
    """Bertinetto et al.'s hierarchical distance@k: the mean distance to the truth of the k best-scored classes
    (k capped at the number of classes; ties keep class order)."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")
    dist = tree.distance_matrix()[labels[:, None], order]
    return {f"hierarchical_distance@{k}": float(dist[:, :k].mean())
            for k in sorted({min(int(k), tree.num_classes) for k in ks})}


def lca_scores(tree: ClassTree, labels, nodes, value: Literal["info", "depth"] = "info") -> dict[str, float]:
    """Valmadre's correct-or-ancestor rate and LCA precision, recall and F1 (means over images)."""
    truth = tree.leaves[np.asarray(labels, dtype=np.int64)]
    nodes = np.asarray(nodes, dtype=np.int64)
    lca = tree.lca(truth, nodes)
    v = tree.info if value == "info" else tree.depth.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where((v[lca] == 0) & (v[truth] == 0), 1.0, v[lca] / v[truth])
        precision = np.where((v[lca] == 0) & (v[nodes] == 0), 1.0, v[lca] / v[nodes])
        f1 = np.where((precision > 0) & (recall > 0), 2 * precision * recall / (precision + recall), 0.0)
    return {"correct_or_ancestor": float((lca == nodes).mean()), "lca_precision": float(precision.mean()),
            "lca_recall": float(recall.mean()), "lca_f1": float(f1.mean())}


def hierarchy_metrics(tree: ClassTree, probs: np.ndarray, labels, nodes=None, scores=None,
                      ks: Sequence[int] = TOPK) -> dict[str, float]:
    """The tree metrics of one set of predictions, as a flat dict of floats.

    ``nodes``: the decided node of each image (default: the argmax leaf); ``scores``: how the classes rank
    for distance@k (default: the probabilities; :func:`decision_scores` for CRM). Keys: accuracy (the node
    is the true leaf), accuracy_level_L and balanced_accuracy_level_L, mean_distance (LCA distance of the
    decided node), mistake_severity (the same over the wrong ones only; 0 without mistakes),
    hierarchical_distance@k, correct_or_ancestor, lca_precision/recall/f1, mean_predicted_level.
    """
    labels = np.asarray(labels, dtype=np.int64)
    nodes = argmax_nodes(tree, probs) if nodes is None else np.asarray(nodes, dtype=np.int64)
    truth = tree.leaves[labels]
    dist = tree.distance(truth, nodes).astype(np.float64)
    wrong = nodes != truth
    out = {"accuracy": float((~wrong).mean())}
    out.update(level_metrics(tree, labels, nodes))
    out["mean_distance"] = float(dist.mean())
    out["mistake_severity"] = float(dist[wrong].mean()) if wrong.any() else 0.0
    out.update(topk_distance(tree, probs if scores is None else scores, labels, ks))
    out.update(lca_scores(tree, labels, nodes))
    out["mean_predicted_level"] = float(tree.depth[nodes].mean())
    return out


def hicervix_distance(tree: ClassTree, a, b) -> np.ndarray:
    """HiCervix's ``lca_height`` between nodes, on its own (unpadded) tree: log(1 + h) when both lie at the same
    depth, h otherwise, with h the steps from the deeper one up to their LCA."""
    c = tree.collapsed()
    a, b = c[np.asarray(a, dtype=np.int64)], c[np.asarray(b, dtype=np.int64)]
    da, db = tree.depth[a], tree.depth[b]
    up = np.maximum(da, db) - tree.depth[tree.lca(a, b)]
    return np.where(da == db, np.log1p(up), up.astype(np.float64))


def hicervix_protocol_metrics(tree: ClassTree, probs: np.ndarray, labels) -> dict[str, float]:
    """HiCervix's benchmark figures (``HierSwin/scripts/metrics_eval.py``), from leaf probabilities.

    At each level the prediction is the argmax of the summed probabilities of that level's nodes (not the
    argmax leaf mapped up); images whose label stops above the level (an inner node, as AGC at level 2)
    are left out there. Keys: accuracy_level_L, hierarchical_distance_level_L (mean :func:`hicervix_distance`),
    mean_accuracy and mean_hierarchical_distance (means over the levels: HiCervix's "mean hierarchical
    distance"). Put them under their own key in results.json: they are not :func:`hierarchy_metrics`'.
    """
    labels = np.asarray(labels, dtype=np.int64)
    node_p = tree.node_probs(probs)
    truth_leaf = tree.leaves[labels]
    collapsed = tree.collapsed()
    out: dict[str, float] = {}
    accs, dists = [], []
    for level in range(1, tree.max_depth + 1):
        candidates = np.unique(tree.at_level(tree.leaves, level))
        pred = candidates[node_p[:, candidates].argmax(axis=1)]
        truth = tree.at_level(truth_leaf, level)
        stops_above = (tree.num_leaves[collapsed[truth]] > 1) & (tree.depth[collapsed[truth]] < level)
        if stops_above.all():
            continue
        pred, truth = pred[~stops_above], truth[~stops_above]
        accs.append(float((collapsed[pred] == collapsed[truth]).mean()))
        dists.append(float(hicervix_distance(tree, truth, pred).mean()))
        out[f"accuracy_level_{level}"], out[f"hierarchical_distance_level_{level}"] = accs[-1], dists[-1]
    out["mean_accuracy"] = float(np.mean(accs))
    out["mean_hierarchical_distance"] = float(np.mean(dists))
    return out
