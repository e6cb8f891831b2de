"""IVLP: independent deep prompts in both towers of a frozen CLIP model.

Text: the class prompts' first n context tokens learn (as CoOp's), and at the input of each later block up to
the depth a new set of n tokens replaces them. Image: n visual prompt tokens at the first block's input and a
new set at each later block up to the depth (deep VPT, models/prompts.py). The two towers' prompts are
independent (no coupling function, unlike MaPLe).

Khattak et al., CVPR 2023 (muzairkhattak/multimodal-prompt-learning, configs/trainers/IVLP/
vit_b16_c2_ep5_batch4_2+2ctx.yaml): 2 text and 2 visual tokens, depth 12 in both towers (every block of ViT-B),
text context from "a photo of a", deep prompts from N(0, 0.02^2), lr 0.0035, 5 epochs at batch size 4.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from methods.coop import TEMPLATE, ContextSettings, PromptedCLIP, class_prompts, context_label, prompt_plan
from methods.registry import Method, MethodError, register
from methods.vpt import prompt_depth
from models.prompts import ClassPrompts, VisualPrompts, visual_tower

IVLP_EPOCHS = 5


@dataclass(frozen=True)
class IVLPSettings(ContextSettings):
    n_ctx: int = field(default=2, metadata={"help": "learnable text context tokens (at most the phrase's tokens)"})
    ctx_init: str = field(default=TEMPLATE, metadata={"help": 'initial text context: "template" (the dataset\'s '
                                                              "prompt before the class name; IVLP's \"a photo of "
                                                              'a" on the benchmark datasets), a phrase, or empty'})
    n_ctx_vision: int = field(default=2, metadata={"help": "visual prompt tokens"})
    prompt_depth: int = field(default=0, metadata={"help": "blocks whose input gets its own prompts: 0 = every "
                                                           "block, 1 = the first only (shallow), D = the first D"})

    def __post_init__(self):
        super().__post_init__()
        if self.n_ctx_vision < 1 or self.prompt_depth < 0:
            raise MethodError("--n_ctx_vision must be at least 1 and --prompt_depth at least 0")


class DeepPromptedCLIP(PromptedCLIP):
    """Both towers prompted: deep text prompts after the class prompts' context, deep visual prompt tokens."""

    def __init__(self, spec, prompts: ClassPrompts, visual: VisualPrompts, text_depth: int):
        super().__init__(spec, prompts)
        self.visual_prompts = visual
        width = prompts.ctx.shape[-1]
        self.text_deep = nn.Parameter(torch.randn(text_depth - 1, prompts.n_ctx, width) * 0.02)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual_prompts(images).float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        return F.normalize(self.prompts(deep=list(self.text_deep)).float(), dim=-1)


def build(ctx, s: IVLPSettings):
    prompts = class_prompts(ctx, s)
    tower = visual_tower(ctx.spec)
    text_blocks = prompts.tower.depth
    depths = (prompt_depth(s.prompt_depth, tower.depth), prompt_depth(s.prompt_depth, text_blocks))
    torch.manual_seed(ctx.config.seed)
    visual = VisualPrompts(tower, s.n_ctx_vision, depths[0], "normal")
    plan = prompt_plan(ctx, "ivlp", DeepPromptedCLIP(ctx.spec, prompts, visual, depths[1]), IVLP_EPOCHS)
    plan.notes.update(vision_depth=depths[0], text_depth=depths[1])
    return plan


register(Method(
    name="ivlp", description="IVLP: independent deep prompts in both towers of a frozen CLIP model, on images",
    settings=IVLPSettings, inputs="images", build=build, lr=3.5e-3, budget="epochs",
    source="IVLP (Khattak et al., CVPR 2023; muzairkhattak/multimodal-prompt-learning): 2+2 tokens, every block, "
           "lr 0.0035, 5 epochs",
    label=lambda s: context_label("ivlp", s) + f"-v{s.n_ctx_vision}-d{s.prompt_depth or 'all'}",
))
