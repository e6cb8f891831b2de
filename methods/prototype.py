"""Cosine prototype head: prototypes start at the class means of normalised features, temperature 1/0.07."""

from dataclasses import dataclass, field

import torch.nn.functional as F

from methods.heads import CosineHead, class_means
from methods.registry import Method, MethodError, Plan, Stage, register


@dataclass(frozen=True)
class PrototypeSettings:
    init_scale: float = field(default=1 / 0.07, metadata={"help": "initial logit scale (inverse temperature)"})

    def __post_init__(self):
        if not self.init_scale > 0:
            raise MethodError(f"--init_scale must be positive, got {self.init_scale:g}")


def build(ctx, s: PrototypeSettings) -> Plan:
    x, y = ctx.features("train")
    head = CosineHead(class_means(F.normalize(x.float(), dim=-1), y, len(ctx.split.classes)), s.init_scale)
    return Plan(head, "features", [Stage("prototype", head, "features", ctx.epoch_steps(), ctx.config.lr)])


register(Method(
    name="prototype", description="cosine prototype head with a learnable temperature, on frozen features",
    settings=PrototypeSettings, inputs="features", build=build,
    source="cosine classifiers of few-shot learning (Chen et al. 2019, Baseline++)",
))
