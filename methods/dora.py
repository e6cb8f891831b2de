"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024), the variant of our LoRA layers with a
learnable magnitude per adapted output row; same settings and placement as --method lora."""

from methods import lora
from methods.registry import TASKS, Method, register


def build(ctx, s: lora.LoRAMethodSettings):
    return lora.build(ctx, s, dora=True)


register(Method(
    tasks=TASKS, task_defaults=lora.IMAGE_TEXT_DEFAULTS,
    name="dora", description="DoRA (magnitude + direction) in the backbone + linear head, trained on images",
    settings=lora.LoRAMethodSettings, inputs="images", build=build, packable=True,
    source="DoRA (Liu et al. 2024), the most used successor of LoRA",
    label=lambda s: "dora" + lora.label(s)[len("lora"):],
))
