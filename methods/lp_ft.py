"""LP-FT: a linear probe on frozen features, then everything fine-tuned from it at lr / 10 (Kumar et al. 2022)."""

from dataclasses import dataclass, field

from methods.heads import ImageClassifier, linear_head
from methods.registry import HEAD_TASKS, Method, MethodError, Plan, Stage, register


@dataclass(frozen=True)
class LPFTSettings:
    ft_lr_factor: float = field(default=0.1, metadata={"help": "stage-2 learning rate = --lr x this factor"})

    def __post_init__(self):
        if not self.ft_lr_factor > 0:
            raise MethodError(f"--ft_lr_factor must be positive, got {self.ft_lr_factor:g}")


def build(ctx, s: LPFTSettings) -> Plan:
    head = linear_head(ctx)
    ctx.features("train")  # stage 1 needs the frozen features before the backbone changes
    ctx.spec.model.requires_grad_(True)
    model = ImageClassifier(ctx.spec, head)
    lr = ctx.config.lr
    stages = [Stage("lp", head, "features", ctx.epoch_steps(), lr),
              Stage("ft", model, "images", ctx.paper_steps(), lr * s.ft_lr_factor)]
    return Plan(model, "images", stages)


register(Method(
    tasks=HEAD_TASKS,
    name="lp_ft", description="stage 1: linear head on frozen features; stage 2: everything at lr x 0.1",
    settings=LPFTSettings, inputs="features", build=build, budget="shots",  # its fine-tuning stage: paper_steps
    source="LP-FT (Kumar et al. 2022); cross-domain transfer studies",
))
