"""Logistic regression on frozen features with L-BFGS: the linear-probe protocol of CLIP and of the pathology
foundation-model benchmarks, with the inverse regularisation C chosen on the validation images only."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from methods.heads import FixedLogits
from methods.registry import Method, MethodError, Plan, register

# CLIP's sweep (Radford et al. 2021, appendix A.3): C from 1e-6 to 1e6 in steps of two decades, then a
# bisection in log space around the best value
COARSE_GRID = tuple(10.0 ** e for e in range(-6, 7, 2))


@dataclass(frozen=True)
class LogRegSettings:
    logreg_c: float | None = field(default=None, metadata={"help": "inverse regularisation C; unset: searched "
                                                                    "on the validation images"})
    c_refine: int = field(default=4, metadata={"help": "halvings of the log-space step around the best C of "
                                                       "the coarse grid 1e-6..1e6"})
    max_iter: int = field(default=1000, metadata={"help": "L-BFGS iterations"})

    def __post_init__(self):
        if self.logreg_c is not None and not self.logreg_c > 0:
            raise MethodError(f"--logreg_c must be positive, got {self.logreg_c:g}")
        if self.c_refine < 0 or self.max_iter < 1:
            raise MethodError("--c_refine must be >= 0 and --max_iter >= 1")


def fit_logreg(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int):
    """scikit-learn's L-BFGS multinomial logistic regression (L2 penalty, intercept) at inverse strength c."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(x, y)


def search_c(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], refine: int, max_iter: int,
             seed: int) -> tuple[float, dict[float, float]]:
    """The C with the best validation accuracy (the smallest C on ties: the strongest regularisation) and
    every C tried with its accuracy."""
    tried: dict[float, float] = {}

    def score(c: float) -> float:
        if c not in tried:
            model = fit_logreg(*train, c, max_iter, seed)
            tried[c] = float((model.predict(val[0]) == val[1]).mean())
        return tried[c]

    for c in COARSE_GRID:
        score(c)
    best = min(tried, key=lambda c: (-tried[c], c))
    step = 1.0  # decades: half the coarse grid's spacing
    for _ in range(refine):
        for c in (best * 10 ** -step, best * 10 ** step):
            score(c)
        best = min(tried, key=lambda c: (-tried[c], c))
        step /= 2
    return best, tried


def _logits(module, x):
    return x.float() @ module.weight.t() + module.bias


def linear_of(model, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)) whose softmax equals the fitted model's predict_proba; with two classes
    scikit-learn keeps one row (the logit of class 1 against class 0), here row 0 is zero."""
    coef, intercept = torch.from_numpy(model.coef_).float(), torch.from_numpy(model.intercept_).float()
    if coef.shape[0] == 1 and num_classes == 2:
        coef = torch.cat([torch.zeros_like(coef), coef])
        intercept = torch.cat([torch.zeros_like(intercept), intercept])
    weight = torch.zeros(num_classes, coef.shape[1])
    bias = torch.full((num_classes,), -1e4)  # a class absent from train is (practically) never predicted
    weight[torch.as_tensor(model.classes_)] = coef
    bias[torch.as_tensor(model.classes_)] = intercept
    return weight, bias


def build(ctx, s: LogRegSettings) -> Plan:
    x, y = ctx.features("train")
    train = (x.float().numpy(), y.numpy())
    notes = {}
    c = s.logreg_c
    if c is None:
        if not ctx.split.val:
            raise MethodError("--method logreg searches C on the validation images, and this split has none: "
                              "give --logreg_c")
        vx, vy = ctx.features("val")  # validation only: test features are never read here
        c, tried = search_c(train, (vx.float().numpy(), vy.numpy()), s.c_refine, s.max_iter, ctx.config.seed)
        notes["c_val_accuracy"] = {f"{k:.6g}": round(v, 6) for k, v in sorted(tried.items())}
    model = fit_logreg(*train, c, s.max_iter, ctx.config.seed)
    weight, bias = linear_of(model, len(ctx.split.classes))
    notes["logreg_c"] = float(c)
    return Plan(FixedLogits(_logits, weight=weight, bias=bias), "features", notes=notes)


register(Method(
    name="logreg", description="L-BFGS logistic regression on frozen features, C chosen on validation",
    settings=LogRegSettings, inputs="features", build=build, trains=False,
    source="CLIP's linear probe (Radford et al. 2021) and the pathology foundation-model benchmarks "
           "(UNI, Chen et al. 2024); scikit-learn's LogisticRegression",
    label=lambda s: "logreg" if s.logreg_c is None else f"logreg-c{s.logreg_c:g}",
))
