"""CoCoOp: CoOp whose context is conditioned on each image through a small meta-network.

    c_i(x) = c_i + pi(x),   pi = Linear(E, E/16) -> ReLU -> Linear(E/16, D),   x the normalised image feature

so every image gets its own class prompts (B x C prompts through the text tower per batch). Only the context
and the meta-network train; both towers stay frozen. Zhou et al., CVPR 2022 (KaiyangZhou/CoOp, trainers/cocoop.py,
configs vit_b16_c4_ep10_batch1_ctxv1): 4 tokens from "a photo of a", lr 0.002, 10 epochs at batch size 1
(here the run's --batch_size).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from methods.coop import TEMPLATE, ContextSettings, PromptedCLIP, class_prompts, context_label, prompt_plan
from methods.registry import Method, register

COCOOP_EPOCHS = 10


@dataclass(frozen=True)
class CoCoOpSettings(ContextSettings):
    n_ctx: int = field(default=4, metadata={"help": "learnable context tokens (at most the phrase's tokens)"})
    ctx_init: str = field(default=TEMPLATE, metadata={"help": 'initial context: "template" (the dataset\'s prompt '
                                                              'before the class name; CoCoOp\'s "a photo of a" on '
                                                              "the benchmark datasets), a phrase, or empty"})


class ConditionalPrompts(PromptedCLIP):
    """PromptedCLIP whose shared context is shifted, per image, by a meta-network of the image feature."""

    def __init__(self, spec, prompts):
        super().__init__(spec, prompts)
        feature, width = spec.feature_dim, prompts.ctx.shape[-1]
        hidden = max(feature // 16, 1)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(feature, hidden)), ("relu", nn.ReLU()), ("linear2", nn.Linear(hidden, width))]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image = self.image_features(images)
        ctx = self.prompts.ctx[None] + self.meta_net(image)[:, None]  # (B, n, D)
        text = F.normalize(self.prompts.per_sample(ctx).float(), dim=-1)  # (B, C, E)
        return self.scale * torch.einsum("be,bce->bc", image, text)


def build(ctx, s: CoCoOpSettings):
    prompts = class_prompts(ctx, s)
    torch.manual_seed(ctx.config.seed)
    return prompt_plan(ctx, "cocoop", ConditionalPrompts(ctx.spec, prompts), COCOOP_EPOCHS)


register(Method(
    name="cocoop", description="CoCoOp: CoOp's context shifted per image by a meta-network of its feature, on images",
    settings=CoCoOpSettings, inputs="images", build=build, lr=2e-3, budget="epochs",
    source="CoCoOp (Zhou et al., CVPR 2022; KaiyangZhou/CoOp): 4 tokens from 'a photo of a', lr 0.002, 10 epochs",
    label=lambda s: context_label("cocoop", s),
))
