"""CLAP: a class-adaptive constrained linear probe. Cosine class prototypes start at the zero-shot text
embeddings and train on the labelled features with a penalty keeping each near its start,

    loss = CE(logit_scale * cos(f, w_c)) + mean_c lambda_c ||w_c - t_c||^2,

lambda_c being the zero-shot model's mean probability of the true class over class c's train images (the
original's "l2" constraint, multipliers fixed from the start). Nothing is tuned on validation data: the
method reads the train features only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.heads import class_means, class_text_embeddings
from methods.registry import Method, Plan, Stage, register
from methods.transductive import TransductiveSettings, add_transductive_stage, ti_suffix


@dataclass(frozen=True)
class ClapSettings(TransductiveSettings):
    pass


class ConstrainedProbe(nn.Module):
    """Cosine classifier with learnable prototypes, and the zero-shot anchors they are pulled towards."""

    def __init__(self, text: torch.Tensor, scale: torch.Tensor, multipliers: torch.Tensor):
        super().__init__()
        self.prototypes = nn.Parameter(text.clone())
        self.register_buffer("anchors", text.clone())
        self.register_buffer("scale", scale.reshape(()))
        self.register_buffer("multipliers", multipliers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x.float(), dim=-1) @ F.normalize(self.prototypes, dim=-1).t()

    def penalty(self) -> torch.Tensor:
        """mean_c lambda_c ||w_c - t_c||^2."""
        return (self.multipliers * (self.prototypes - self.anchors).pow(2).sum(-1)).mean()


def class_multipliers(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """lambda_c: the mean softmax probability of class c over the train images of class c."""
    probs = logits.softmax(dim=1)
    return class_means(probs, y, logits.shape[1]).diagonal().clone()


def build(ctx, s: ClapSettings) -> Plan:
    text = class_text_embeddings(ctx)
    x, y = ctx.features("train")  # train only: CLAP reads no validation data
    scale = ctx.spec.logit_scale
    model = ConstrainedProbe(text, scale, torch.zeros(text.shape[0]))
    with torch.no_grad():
        model.multipliers.copy_(class_multipliers(model(x), y))
    stage = Stage("clap", model, "features", ctx.epoch_steps(), ctx.config.lr,
                  extra_loss=lambda module: module.penalty())
    plan = Plan(model, "features", [stage], notes={"clap_multipliers": [round(float(v), 6)
                                                                         for v in model.multipliers]})
    return add_transductive_stage(ctx, plan, s)


register(Method(
    name="clap", description="linear probe from the zero-shot prototypes with a class-adaptive pull towards "
                             "them (no validation data)",
    settings=ClapSettings, inputs="features", build=build, lr=1e-3,
    source="CLAP (Silva-Rodriguez et al., CVPR 2024; jusiro/CLAP: SGD lr 0.1, 300 epochs); AdamW here",
    label=lambda s: "clap" + ti_suffix(s),
))
