"""Single-label classification: one class per image (the paper's tasks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch.nn.functional as F

from common.errors import UserError
from datasets import get_dataset
from evaluation.calibration import calibration_report, reliability_bins
from evaluation.hierarchy import (
    ClassTree,
    choose_backoff_threshold,
    decide,
    decision_scores,
    hicervix_protocol_metrics,
    hierarchy_metrics,
)
from evaluation.metrics import compute_metrics, hierarchical_metrics
from tasks.hierarchy_losses import build_loss
from tasks.registry import Evaluation, Task, probability_csv, register, settings_of

PARTS = ("val", "test")
TREE_FILE = "tree.csv"  # a folder or csv dataset's class tree: 'class,parent' rows beside its split folders


@dataclass(frozen=True)
class SingleLabelSettings:
    """Hierarchy-aware training and decisions, for datasets whose classes form a tree (HiCervix's levels, or a
    tree.csv of 'class,parent' rows in a folder or csv dataset's root). The defaults change nothing."""

    loss: Literal["ce", "hxe", "soft"] = field(default="ce", metadata={
        "help": "loss of a trained classifier head: ce (cross-entropy), hxe (hierarchical cross-entropy, "
                "Bertinetto et al. 2020) or soft (soft labels from the tree distance); hxe and soft need a tree"})
    hxe_alpha: float = field(default=0.1, metadata={
        "help": "--loss hxe: each conditional's weight is exp(-alpha x its depth); 0 is cross-entropy"})
    soft_beta: float = field(default=10.0, metadata={
        "help": "--loss soft: target mass exp(-beta x d(c, y) / d_max); large beta tends to one-hot"})
    decision: Literal["argmax", "crm", "backoff"] = field(default="argmax", metadata={
        "help": "how a prediction is made from the class probabilities on a tree: argmax, crm (the class of "
                "least expected tree distance, Karthik et al. 2021) or backoff (the deepest node on the argmax "
                "path whose probability exceeds --backoff_threshold)"})
    backoff_threshold: float | None = field(default=None, metadata={
        "help": "--decision backoff: the probability a node must exceed (default: chosen on validation as the "
                "smallest whose correct-or-ancestor rate reaches --backoff_target)"})
    backoff_target: float = field(default=0.9, metadata={
        "help": "--decision backoff without a threshold: the validation correct-or-ancestor rate to reach"})

    def __post_init__(self):
        if not self.hxe_alpha >= 0:
            raise UserError(f"--hxe_alpha must be a number >= 0, got {self.hxe_alpha}")
        if not self.soft_beta > 0:
            raise UserError(f"--soft_beta must be a number > 0, got {self.soft_beta}")
        if self.backoff_threshold is not None and not 0 <= self.backoff_threshold <= 1:
            raise UserError(f"--backoff_threshold must be in [0, 1], got {self.backoff_threshold}")
        if not 0 < self.backoff_target <= 1:
            raise UserError(f"--backoff_target must be in (0, 1], got {self.backoff_target}")

    @property
    def uses_tree(self) -> bool:
        return self.loss != "ce" or self.decision != "argmax"


def evaluate(ctx, plan, predict, parts=PARTS, extras: bool = True) -> Evaluation:
    """Softmax metrics, the label tree's upper levels where the dataset has one, and temperature scaling
    fitted on val (the reported metrics are the uncalibrated ones).

    On a class tree, ``tree`` holds the metrics of the run's decision rule (per-level accuracy, mean distance,
    mistake severity, distance@k, LCA precision/recall) and ``hicervix_protocol`` HiCervix's own figures;
    the flat metrics stay those of the argmax, and predictions.csv gains the decided node and its level.
    """
    logits = {part: predict(part) for part in parts if ctx.split.items(part)}
    metrics, rows = {}, []
    levels = label_tree(ctx)
    tree, s = class_tree(ctx), settings_of(ctx, TASK)
    probs = {part: out.softmax(dim=1) for part, (out, _) in logits.items()}
    decided, extra = {}, {}
    if tree is not None:
        threshold = _threshold(tree, s, probs, logits)
        decided = {part: decide(tree, p.numpy(), s.decision, threshold) for part, p in probs.items()}
        extra["decision"] = {"rule": s.decision, "threshold": threshold, "tree_depth": tree.max_depth}
    for part, (_, labels) in logits.items():
        metrics[part] = compute_metrics(probs[part].numpy(), labels.numpy(), ctx.split.classes)
        preds = probs[part].argmax(dim=1)
        if levels:
            metrics[part]["hierarchy"] = hierarchical_metrics(levels, list(ctx.split.classes), labels.numpy(),
                                                              preds.numpy())
        if tree is not None:
            p = probs[part].numpy()
            metrics[part]["tree"] = hierarchy_metrics(tree, p, labels.numpy(), decided[part],
                                                      decision_scores(tree, p, s.decision))
            metrics[part]["hicervix_protocol"] = hicervix_protocol_metrics(tree, p, labels.numpy())
        nodes = tree.describe(decided[part]) if tree is not None else None
        for i, ((path, label), pred, p) in enumerate(zip(ctx.split.items(part), preds.tolist(),
                                                         probs[part].tolist(), strict=True)):
            row = (part, ctx.split.relative(path), label, pred, p)
            rows.append(row + tuple(nodes[i]) if nodes else row)
    if extras:
        extra.update(_calibration(ctx, logits))
    return Evaluation(metrics, rows, list(ctx.split.classes), extra,
                      extra_columns=["pred_node", "pred_level"] if tree is not None else [])


def _threshold(tree: ClassTree, s: SingleLabelSettings, probs: dict, logits: dict) -> float | None:
    """The backoff threshold: the given one, or chosen on validation (never on test)."""
    if s.decision != "backoff" or s.backoff_threshold is not None:
        return s.backoff_threshold
    if "val" not in probs:
        raise UserError("--decision backoff without --backoff_threshold chooses it on validation, and this split "
                        "has no validation images: give --backoff_threshold")
    return choose_backoff_threshold(tree, probs["val"].numpy(), logits["val"][1].numpy(), s.backoff_target)


def class_tree(ctx) -> ClassTree | None:
    """The dataset's class tree: its label levels (HiCervix at its deepest level) or a tree.csv in its root;
    None for flat data. A hierarchy-aware setting on flat data is a one-line error."""
    tree = None
    levels = label_tree(ctx)
    classes = list(ctx.split.classes)
    if levels:
        tree = ClassTree.from_levels(levels, classes)
    elif ctx.config.root_path and (Path(ctx.config.root_path) / TREE_FILE).is_file():
        tree = ClassTree.from_csv(Path(ctx.config.root_path) / TREE_FILE, classes)
    s = settings_of(ctx, TASK)
    if tree is None and s.uses_tree:
        raise UserError(f"--loss {s.loss} / --decision {s.decision} need a class tree, and {ctx.config.dataset} "
                        f"has none: put a {TREE_FILE} of 'class,parent' rows in its root, or use the defaults "
                        "(--loss ce --decision argmax)")
    return tree


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
    """Cross-entropy, or the hierarchy-aware loss the run asks for (--loss hxe|soft, on a class tree)."""
    s = settings_of(ctx, TASK)
    tree = class_tree(ctx)  # also refuses tree settings on flat data before anything trains
    if s.loss == "ce":
        return F.cross_entropy
    return build_loss(s.loss, tree, alpha=s.hxe_alpha, beta=s.soft_beta).to(ctx.device)


def predictions_csv(ctx, names, probs, record: dict) -> str:
    """`path,pred,p_<class>...`: the prediction of the run's decision rule (the most probable class by default;
    a node of the class tree, as 'a > b', under --decision crm|backoff) and one softmax probability per class."""
    classes = list(ctx.split.classes)
    decision = record.get("decision")
    if decision and decision.get("rule", "argmax") != "argmax" and len(names):
        tree = class_tree(ctx)
        nodes = decide(tree, probs.numpy(), decision["rule"], decision.get("threshold"))
        preds = [label for label, _ in tree.describe(nodes)]
    else:
        preds = [classes[i] for i in probs.argmax(dim=1).tolist()] if len(names) else []
    return probability_csv(names, probs, classes, preds)


def export_info(record: dict) -> dict:
    info = {"task": "single_label", "activation": "softmax",
            "outputs": "logits (B, classes): softmax gives the class probabilities; argmax the class"}
    if record.get("decision"):  # a class tree's decision rule (crm, backoff) replaces the argmax
        info["decision"] = record["decision"]
    return info


TASK = register(Task(
    name="single_label", settings=SingleLabelSettings, description="one class per image (cross-entropy, softmax)",
    headline="balanced_accuracy", headline_name="balanced accuracy",
    summary=(("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1")),
    report_metrics=("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece"),
    evaluate=evaluate, activation="softmax", exclusive=True, chance=lambda n: 1.0 / n if n else None,
    loss=loss, predictions_csv=predictions_csv, export_info=export_info,
))
