"""Zero-shot CLIP: class prompts through the text tower, cosine similarity with image features."""

from dataclasses import dataclass, field

import torch.nn.functional as F

from methods.heads import FixedLogits, class_text_embeddings, fixed_logits_codec
from methods.registry import Method, Plan, register

# CLIP-style templates for the optional ensemble; the dataset's own prompt is always the first.
ENSEMBLE = (
    "a photo of a {} cell.",
    "a microscopy image of a {} cell.",
    "a cytology image showing {} cells.",
    "a stained smear with {} cells.",
)


@dataclass(frozen=True)
class ZeroShotSettings:
    ensemble: bool = field(default=False, metadata={"help": "True: average the dataset prompt with "
                                                            f"{len(ENSEMBLE)} generic cytology templates"})


def _logits(module, x):
    return module.scale * F.normalize(x.float(), dim=-1) @ module.text.t()


def build(ctx, s: ZeroShotSettings) -> Plan:
    from datasets.registry import get_dataset

    templates = [get_dataset(ctx.config.dataset).prompt_template, *ENSEMBLE] if s.ensemble else None
    text = class_text_embeddings(ctx, templates)
    scale = ctx.spec.logit_scale
    return Plan(FixedLogits(_logits, text=text, scale=scale.reshape(())), "features",
                notes={"logit_scale": float(scale)})


register(Method(
    name="zeroshot", description="no training: logit_scale x cosine(image, class-prompt embedding)",
    settings=ZeroShotSettings, inputs="features", build=build, trains=False,
    source="CLIP (Radford et al. 2021); the zero-shot baseline of few-shot medical adaptation studies",
    label=lambda s: "zeroshot-ensemble" if s.ensemble else "zeroshot",
    head_codec=fixed_logits_codec(_logits)
))
