"""BitFit: train the backbone's bias terms and a linear head on images (Ben Zaken et al. 2022)."""

from dataclasses import dataclass

from methods.heads import ImageClassifier, linear_head
from methods.registry import HEAD_TASKS, Method, Plan, Stage, register


@dataclass(frozen=True)
class BitFitSettings:
    pass


def is_bias(name: str) -> bool:
    """Bias tensors, including nn.MultiheadAttention's fused in_proj_bias."""
    return name.rsplit(".", 1)[-1].endswith("bias")


def build(ctx, s: BitFitSettings) -> Plan:
    for name, p in ctx.spec.model.named_parameters():
        p.requires_grad_(is_bias(name))
    model = ImageClassifier(ctx.spec, linear_head(ctx))
    return Plan(model, "images", [Stage("bitfit", model, "images", ctx.paper_steps(), ctx.config.lr)])


register(Method(
    tasks=HEAD_TASKS,
    name="bitfit", description="backbone biases + linear head, trained on images",
    settings=BitFitSettings, inputs="images", build=build,
    source="BitFit (Ben Zaken et al. 2022); PEFT comparisons on medical images",
))
