"""A transductive class-proportion prior for the feature-space methods (linear, prototype, adapter).

After the usual training, ``--transductive proportion`` adds ``--ti_steps`` steps whose loss is the
labelled cross-entropy (which keeps the head anchored) plus

    lambda * sum_c max(0, |p_hat_c - pi_c| / max(p_hat_c, pi_c) - margin),

where p_hat_c is the mean predicted probability of class c over the unlabelled test features and
pi the prior (``--ti_prior train``: class proportions of the labelled train set, or ``uniform``).
Only the test features are used, never their labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from methods.registry import MethodError, Plan, Stage


@dataclass(frozen=True)
class TransductiveSettings:
    transductive: str = field(default="none", metadata={"help": "none, or proportion: a class-proportion prior "
                                                                "on the unlabelled test features"})
    ti_steps: int = field(default=100, metadata={"help": "steps of the transductive stage"})
    ti_prior: str = field(default="train", metadata={"help": "train (class proportions of the labelled data) "
                                                             "or uniform"})
    ti_lambda: float = field(default=0.1, metadata={"help": "weight of the proportion penalty"})
    ti_margin: float = field(default=0.3, metadata={"help": "relative deviation tolerated without penalty"})

    def __post_init__(self):
        if self.transductive not in ("none", "proportion"):
            raise MethodError(f"--transductive {self.transductive}: use none or proportion")
        if self.ti_prior not in ("train", "uniform"):
            raise MethodError(f"--ti_prior {self.ti_prior}: use train or uniform")
        if self.ti_steps < 1 or self.ti_lambda < 0 or self.ti_margin < 0:
            raise MethodError("--ti_steps must be >= 1, --ti_lambda and --ti_margin >= 0")


def ti_suffix(s: TransductiveSettings) -> str:
    """The part of a run folder name that shows the transductive stage."""
    return "" if s.transductive == "none" else f"-ti-{s.ti_prior}"


def proportion_penalty(probs: torch.Tensor, prior: torch.Tensor, margin: float) -> torch.Tensor:
    """sum_c max(0, |p_hat_c - pi_c| / max(p_hat_c, pi_c) - margin) with p_hat the mean of `probs` (N, C)."""
    p_hat = probs.mean(dim=0)
    relative = (p_hat - prior).abs() / torch.maximum(p_hat, prior).clamp_min(1e-12)
    return (relative - margin).clamp_min(0).sum()


def class_prior(labels: torch.Tensor, num_classes: int, kind: str) -> torch.Tensor:
    if kind == "uniform":
        return torch.full((num_classes,), 1.0 / num_classes)
    counts = torch.bincount(labels, minlength=num_classes).float()
    return counts / counts.sum()


def add_transductive_stage(ctx, plan: Plan, s: TransductiveSettings) -> Plan:
    """Append the transductive stage to a feature-space plan when asked for; record its prior."""
    if s.transductive == "none":
        return plan
    if ctx.split.task != "single_label":
        raise MethodError("--transductive proportion is for single-label data (one class per image)")
    _, train_y = ctx.features("train")
    test_x, _ = ctx.features("test")  # the features only: test labels are never read here
    prior = class_prior(train_y, len(ctx.split.classes), s.ti_prior)
    model = plan.model

    def penalty(module) -> torch.Tensor:
        device = next(module.parameters()).device
        probs = module(test_x.to(device)).float().softmax(dim=1)
        return s.ti_lambda * proportion_penalty(probs, prior.to(device), s.ti_margin)

    plan.stages.append(Stage("transductive", model, "features", s.ti_steps, ctx.config.lr, extra_loss=penalty))
    plan.notes["transductive_prior"] = [round(float(p), 6) for p in prior]
    return plan
