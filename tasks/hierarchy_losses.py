"""Hierarchy-aware losses for a flat classifier head over the leaves of a class tree (Bertinetto et al., CVPR 2020).

* HXE, hierarchical cross-entropy: the probability of the true leaf is factorised along its root path,
  p(leaf) = prod_j p(C_j | C_{j-1}), with p(C) the summed probability of the classes under node C, and
  the loss is sum_j lambda(C_j) * -log p(C_j | C_{j-1}), lambda(C) = exp(-alpha * depth(C)).
  ``fiveai/making-better-mistakes`` (``better_mistakes/trees.py``, ``get_exponential_weighting``) weights the
  edge into C by exp(-alpha * len(treeposition(C))), the depth of C below the root: the coarse decisions
  near the root weigh most and the fine ones are discounted (the paper's "height" counts from the root).
  That code also divides the weights by their sum over all nodes, a constant factor left out here so that
  alpha = 0 is exactly cross-entropy.
* Soft labels: the target puts mass proportional to exp(-beta * d(c, y) / d_max) on class c (d the LCA
  distance, d_max its largest value over the classes, ``better_mistakes/model/labels.py``), and the loss is
  the cross-entropy against it (the reference's KL divergence differs by the target's entropy, a constant).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.errors import UserError
from evaluation.hierarchy import ClassTree

Loss = Literal["ce", "hxe", "soft"]
LOSSES: tuple[str, ...] = get_args(Loss)


def hxe_coefficients(tree: ClassTree, alpha: float) -> np.ndarray:
    """classes x nodes: HXE of class y is sum_n coef[y, n] * log p(n) (the path's log-conditionals, weighted)."""
    weight = np.exp(-alpha * tree.depth.astype(np.float64))
    coef = np.zeros((tree.num_classes, tree.num_nodes))
    for k, leaf in enumerate(tree.leaves):
        path = tree.path(int(leaf))
        for parent, node in zip(path[:-1], path[1:], strict=True):
            # -w(C) log p(C | parent) = -w(C) log p(C) + w(C) log p(parent)
            coef[k, node] -= weight[node]
            coef[k, parent] += weight[node]
    return coef


def soft_label_targets(tree: ClassTree, beta: float) -> np.ndarray:
    """classes x classes: row y is the soft target of true class y, proportional to exp(-beta * d(c, y) / d_max)."""
    dist = tree.distance_matrix()
    scale = dist.max() or 1.0  # a one-class tree has no distance to scale by
    logits = -beta * dist / scale
    logits -= logits.max(axis=1, keepdims=True)
    target = np.exp(logits)
    return target / target.sum(axis=1, keepdims=True)


class HierarchicalCrossEntropy(nn.Module):
    """HXE on class logits (images x classes, in the tree's class order); the mean over the batch."""

    def __init__(self, tree: ClassTree, alpha: float):
        super().__init__()
        if alpha < 0:
            raise UserError(f"--hxe_alpha {alpha} is negative; use alpha >= 0 (0 is cross-entropy)")
        self.alpha = float(alpha)
        self.register_buffer("coef", torch.from_numpy(hxe_coefficients(tree, alpha)).float())
        # log of the class-to-node membership: 0 where the class lies under the node, -inf elsewhere
        member = torch.from_numpy(tree.member).float()
        self.register_buffer("log_member", torch.log(member))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The batch mean of HXE."""
        log_p = F.log_softmax(logits.float(), dim=1)
        node_log_p = torch.logsumexp(log_p[:, None, :] + self.log_member[None], dim=2)  # log p(node), stable
        return (self.coef[target] * node_log_p).sum(dim=1).mean()


class SoftLabelCrossEntropy(nn.Module):
    """Cross-entropy against Bertinetto et al.'s soft labels; the mean over the batch."""

    def __init__(self, tree: ClassTree, beta: float):
        super().__init__()
        if beta < 0:
            raise UserError(f"--soft_beta {beta} is negative; use beta >= 0 (larger is closer to one-hot)")
        self.beta = float(beta)
        self.register_buffer("targets", torch.from_numpy(soft_label_targets(tree, beta)).float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The batch mean of -sum_c q_y(c) log p(c)."""
        return -(self.targets[target] * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def build_loss(kind: Loss, tree: ClassTree | None, *, alpha: float, beta: float) -> nn.Module:
    """The training loss of a single-label head: ``ce``, ``hxe`` (``alpha``) or ``soft`` (``beta``)."""
    if kind == "ce":
        return nn.CrossEntropyLoss()
    if kind not in LOSSES:
        raise UserError(f"unknown --loss '{kind}': choose one of {', '.join(LOSSES)}")
    if tree is None:
        raise UserError(f"--loss {kind} needs a class tree, and this dataset has none: give it a tree.csv of "
                        "'class,parent' rows, or use --loss ce")
    return HierarchicalCrossEntropy(tree, alpha) if kind == "hxe" else SoftLabelCrossEntropy(tree, beta)
