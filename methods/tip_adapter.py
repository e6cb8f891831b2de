"""Tip-Adapter (training-free key-value cache of the few-shot features) and Tip-Adapter-F (the cache keys
fine-tuned), on frozen features with the zero-shot text classifier.

    logits = zero-shot logits + alpha * exp(-beta * (1 - f . K^T)) @ one_hot(labels)

f is the L2-normalised image feature, K the cache keys (the normalised train features). alpha (the residual
ratio) and beta (the affinity sharpness) are searched on the validation images only, over the original's
grids (200 values of beta in [0.1, beta_max], 20 of alpha in [0.1, alpha_max]); Tip-Adapter-F trains its
keys at the original's initial alpha = beta = 1 and searches after training, whenever the classifier is put
in evaluation mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from methods.heads import class_text_embeddings
from methods.registry import Method, MethodError, Plan, Stage, register
from methods.transductive import TransductiveSettings, add_transductive_stage, ti_suffix

BETA_STEPS, ALPHA_STEPS = 200, 20  # the original's search_step (every dataset's config)
INIT_ALPHA, INIT_BETA = 1.0, 1.0  # the original's training values (init_alpha, init_beta)


@dataclass(frozen=True)
class TipAdapterSettings(TransductiveSettings):
    tip_alpha: float | None = field(default=None, metadata={"help": "residual ratio (weight of the cache); "
                                                                     "unset: searched on validation"})
    tip_beta: float | None = field(default=None, metadata={"help": "affinity sharpness; unset: searched on "
                                                                    "validation"})
    tip_alpha_max: float = field(default=3.0, metadata={"help": "largest alpha of the search (the original's "
                                                                "ImageNet value)"})
    tip_beta_max: float = field(default=7.0, metadata={"help": "largest beta of the search (the original's "
                                                               "ImageNet value)"})

    def __post_init__(self):
        super().__post_init__()
        if (self.tip_alpha is not None and self.tip_alpha < 0) or (self.tip_beta is not None and self.tip_beta < 0):
            raise MethodError("--tip_alpha and --tip_beta must be >= 0")
        if not (self.tip_alpha_max > 0.1 and self.tip_beta_max > 0.1):
            raise MethodError("--tip_alpha_max and --tip_beta_max must be above 0.1 (the grids start there)")


def grid(top: float, steps: int) -> torch.Tensor:
    """The original's search values: steps values from 0.1 upwards, spaced (top - 0.1) / steps."""
    return torch.arange(steps, dtype=torch.float64) * (top - 0.1) / steps + 0.1


class CacheModel(nn.Module):
    """Zero-shot logits plus alpha times the cache's affinity-weighted votes; keys trainable or fixed."""

    def __init__(self, keys: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                 trainable: bool):
        super().__init__()
        self.keys = nn.Parameter(keys.clone(), requires_grad=trainable)
        self.register_buffer("values", F.one_hot(labels.long(), text.shape[0]).float())
        self.register_buffer("text", text)
        self.register_buffer("scale", scale.reshape(()))
        self.alpha, self.beta = INIT_ALPHA, INIT_BETA  # used in training
        self.eval_alpha, self.eval_beta = INIT_ALPHA, INIT_BETA  # used in evaluation (the searched ones)
        self.search_on: tuple[torch.Tensor, torch.Tensor] | None = None  # val features: search at eval()
        self.grids: tuple[torch.Tensor, torch.Tensor] | None = None
        self.searched: dict = {}

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(zero-shot logits, affinity f . K^T) of features x."""
        f = F.normalize(x.float(), dim=-1)
        return self.scale * f @ self.text.t(), f @ self.keys.t()

    @staticmethod
    def combine(zs, affinity, values, alpha: float, beta: float) -> torch.Tensor:
        if alpha == 0:  # exactly the zero-shot classifier (no 0 * inf when beta is large)
            return zs
        return zs + alpha * torch.exp(-beta * (1 - affinity)) @ values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zs, affinity = self.parts(x)
        alpha, beta = (self.alpha, self.beta) if self.training else (self.eval_alpha, self.eval_beta)
        return self.combine(zs, affinity, self.values, alpha, beta)

    @torch.no_grad()
    def search(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The (alpha, beta) of the grids with the best accuracy on (x, y); the first best wins ties, as in the
        original's strict '>' over beta then alpha."""
        x, y = x.to(self.keys.device), y.to(self.keys.device)
        zs, affinity = self.parts(x)
        betas, alphas = self.grids
        best = (-1.0, INIT_ALPHA, INIT_BETA)
        for beta in betas.tolist():
            cache = torch.exp(-beta * (1 - affinity)) @ self.values
            for alpha in alphas.tolist():
                acc = ((zs + alpha * cache).argmax(1) == y).float().mean().item()
                if acc > best[0]:
                    best = (acc, alpha, beta)
        _, self.eval_alpha, self.eval_beta = best
        self.searched.clear()  # in place: the plan's notes hold this dict
        self.searched.update(alpha=self.eval_alpha, beta=self.eval_beta, val_accuracy=best[0])

    def train(self, mode: bool = True):
        """Entering evaluation mode settles alpha and beta on the validation features (when searching)."""
        super().train(mode)
        if not mode and self.search_on is not None:
            self.search(*self.search_on)
        return self


def cache_model(ctx, s: TipAdapterSettings, trainable: bool) -> CacheModel:
    """The cache of the normalised train features with the zero-shot classifier; alpha and beta fixed or
    searched on the validation features (never the test ones)."""
    text = class_text_embeddings(ctx)  # refuses a model without a text tower
    x, y = ctx.features("train")
    model = CacheModel(F.normalize(x.float(), dim=-1), y, text, ctx.spec.logit_scale, trainable)
    alphas = torch.tensor([s.tip_alpha], dtype=torch.float64) if s.tip_alpha is not None \
        else grid(s.tip_alpha_max, ALPHA_STEPS)
    betas = torch.tensor([s.tip_beta], dtype=torch.float64) if s.tip_beta is not None \
        else grid(s.tip_beta_max, BETA_STEPS)
    model.grids = (betas, alphas)
    if len(alphas) == 1 and len(betas) == 1:
        model.eval_alpha, model.eval_beta = float(alphas[0]), float(betas[0])
        return model
    if not ctx.split.val:
        raise MethodError("--method tip_adapter searches alpha and beta on the validation images, and this split "
                          "has none: give --tip_alpha and --tip_beta")
    vx, vy = ctx.features("val")
    model.search_on = (vx.float(), vy)
    if not trainable:
        model.search(vx.float(), vy)
    return model


def build(ctx, s: TipAdapterSettings) -> Plan:
    model = cache_model(ctx, s, trainable=False)
    return add_transductive_stage(ctx, Plan(model, "features", notes={"tip_adapter": model.searched}), s)


def build_f(ctx, s: TipAdapterSettings) -> Plan:
    model = cache_model(ctx, s, trainable=True)
    stage = Stage("tip_adapter_f", model, "features", ctx.epoch_steps(), ctx.config.lr)
    # the search runs again whenever the trained keys are evaluated; notes report the final one
    plan = Plan(model, "features", [stage], notes={"tip_adapter": model.searched})
    return add_transductive_stage(ctx, plan, s)


def _label(name):
    def label(s: TipAdapterSettings) -> str:
        fixed = "" if s.tip_alpha is None or s.tip_beta is None else f"-a{s.tip_alpha:g}-b{s.tip_beta:g}"
        return name + fixed + ti_suffix(s)
    return label


SOURCE = "Tip-Adapter (Zhang et al., ECCV 2022; gaopengcuhk/Tip-Adapter)"
register(Method(
    name="tip_adapter", description="no training: zero-shot classifier plus a key-value cache of the train "
                                    "features (alpha, beta searched on validation)",
    settings=TipAdapterSettings, inputs="features", build=build, trains=False, source=SOURCE,
    label=_label("tip_adapter"),
))
register(Method(
    name="tip_adapter_f", description="Tip-Adapter with its cache keys fine-tuned on frozen features",
    settings=TipAdapterSettings, inputs="features", build=build_f, lr=1e-3, source=SOURCE + ", Tip-Adapter-F",
    label=_label("tip_adapter_f"),
))
