"""TaskRes: a learnable residual on the zero-shot text classifier, on frozen features.

    logits = logit_scale * cos(f, t_c + alpha * r_c),   r starts at zero,

so at step 0 this is exactly zero-shot CLIP (the same class prompts, the same scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from methods.heads import class_text_embeddings
from methods.registry import Method, MethodError, Plan, Stage, register
from methods.transductive import TransductiveSettings, add_transductive_stage, ti_suffix


@dataclass(frozen=True)
class TaskResSettings(TransductiveSettings):
    residual_scale: float = field(default=0.5, metadata={"help": "alpha, the residual's scale (the original: "
                                                                 "0.5 on most datasets, 1.0 on Flowers)"})

    def __post_init__(self):
        super().__post_init__()
        if not self.residual_scale > 0:
            raise MethodError(f"--residual_scale must be positive, got {self.residual_scale:g}")


class TaskResidual(nn.Module):
    """Cosine classifier on the text embeddings plus a learnable, scaled residual (the only parameter)."""

    def __init__(self, text: torch.Tensor, scale: torch.Tensor, alpha: float):
        super().__init__()
        self.register_buffer("text", text)
        self.register_buffer("scale", scale.reshape(()))
        self.alpha = alpha
        self.residual = nn.Parameter(torch.zeros_like(text))

    def classifier(self) -> torch.Tensor:
        """The class weights t + alpha * r, L2-normalised."""
        return F.normalize(self.text + self.alpha * self.residual, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x.float(), dim=-1) @ self.classifier().t()


def build(ctx, s: TaskResSettings) -> Plan:
    model = TaskResidual(class_text_embeddings(ctx), ctx.spec.logit_scale, s.residual_scale)
    stage = Stage("taskres", model, "features", ctx.epoch_steps(), ctx.config.lr)
    return add_transductive_stage(ctx, Plan(model, "features", [stage]), s)


register(Method(
    name="taskres", description="learnable residual on the zero-shot text classifier, on frozen features",
    settings=TaskResSettings, inputs="features", build=build, lr=2e-3,
    source="TaskRes (Yu et al., CVPR 2023; geekyutao/TaskRes): Adam, lr 2e-3 (2e-4 on ImageNet)",
    label=lambda s: f"taskres-a{s.residual_scale:g}" + ti_suffix(s),
))
