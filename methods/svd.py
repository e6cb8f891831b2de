"""Singular-value tuning: only the singular values of the chosen backbone weights train (as deltas from
their pretrained values), with a linear head, on images (``lora.svd``)."""

from dataclasses import dataclass, field

from lora import LoRASettings, apply_svd, save_svd
from methods.heads import ImageClassifier, linear_head
from methods.registry import HEAD_TASKS, Method, Plan, Stage, register

_D = LoRASettings()


@dataclass(frozen=True)
class SVDSettings:
    params: tuple[str, ...] = field(default=("q", "k", "v", "o"), metadata={
        "help": 'q k v o and/or pw (the layers LoRA adapts); "q v", q v or qv'})
    position: str = field(default="all", metadata={"help": "blocks: bottom, mid, up, half-up, half-bottom, all, "
                                                           "top, top3"})
    encoder: str = field(default="vision", metadata={"help": "towers: vision (text: only image-text training "
                                                             "uses it)"})

    def __post_init__(self):
        checked = LoRASettings(params=self.params, position=self.position, encoder=self.encoder)  # one validation
        object.__setattr__(self, "params", checked.params)


def build(ctx, s: SVDSettings) -> Plan:
    apply_svd(ctx.spec.model, params=s.params, position=s.position, encoder=s.encoder)

    def export(folder):
        save_svd(ctx.spec.model, folder / "svd.safetensors", {"params": list(s.params), "position": s.position,
                                                              "encoder": s.encoder})

    model = ImageClassifier(ctx.spec, linear_head(ctx))
    model.head.requires_grad_(True)
    return Plan(model, "images", [Stage("svd", model, "images", ctx.paper_steps(), ctx.config.lr)], export=export)


register(Method(
    tasks=HEAD_TASKS,
    name="svd", description="singular values of the backbone's attention (or pointwise) weights + linear head, "
                            "trained on images",
    settings=SVDSettings, inputs="images", build=build, lr=5e-4,
    source="CLIP-SVD (Koleilat et al. 2025; HealthX-Lab/CLIP-SVD: AdamW lr 5e-4, q k v o and MLP of both towers)",
    label=lambda s: f"svd-{''.join(s.params)}-{s.position}-{s.encoder}",
))
