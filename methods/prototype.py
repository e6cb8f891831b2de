"""Cosine prototype head: prototypes start at the class means of normalised features, temperature 1/0.07."""

from dataclasses import dataclass, field

import torch.nn.functional as F

from methods.heads import COSINE_HEAD, CosineHead, class_means
from methods.registry import Method, MethodError, Plan, Stage, register
from methods.transductive import TransductiveSettings, add_transductive_stage, ti_suffix


@dataclass(frozen=True)
class PrototypeSettings(TransductiveSettings):
    init_scale: float = field(default=1 / 0.07, metadata={"help": "initial logit scale (inverse temperature)"})

    def __post_init__(self):
        super().__post_init__()
        if not self.init_scale > 0:
            raise MethodError(f"--init_scale must be positive, got {self.init_scale:g}")


def build(ctx, s: PrototypeSettings) -> Plan:
    x, y = ctx.features("train")
    head = CosineHead(class_means(F.normalize(x.float(), dim=-1), y, len(ctx.split.classes)), s.init_scale)
    stage = Stage("prototype", head, "features", ctx.epoch_steps(), ctx.config.lr)
    return add_transductive_stage(ctx, Plan(head, "features", [stage]), s)


register(Method(
    name="prototype", description="cosine prototype head with a learnable temperature, on frozen features",
    settings=PrototypeSettings, inputs="features", build=build,
    source="cosine classifiers of few-shot learning (Chen et al. 2019, Baseline++)",
    label=lambda s: "prototype" + ti_suffix(s),
    head_codec=COSINE_HEAD
))
