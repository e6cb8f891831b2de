"""Full fine-tuning: every backbone parameter and a linear head, at a small learning rate."""

from dataclasses import dataclass

from methods.heads import ImageClassifier, linear_head
from methods.registry import HEAD_TASKS, Method, Plan, Stage, register


@dataclass(frozen=True)
class FullSettings:
    pass


def build(ctx, s: FullSettings) -> Plan:
    ctx.spec.model.requires_grad_(True)
    model = ImageClassifier(ctx.spec, linear_head(ctx))
    return Plan(model, "images", [Stage("full", model, "images", ctx.paper_steps(), ctx.config.lr)])


register(Method(
    tasks=HEAD_TASKS,
    name="full", description="every backbone parameter + linear head, trained on images",
    settings=FullSettings, inputs="images", build=build, lr=1e-5,
    source="the standard transfer-learning baseline of cross-domain studies",
))
