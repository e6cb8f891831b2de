"""VPT: visual prompt tokens in a frozen vision transformer (models/prompts.py), shallow or deep, and a classifier.

    logits = head(f(image with n prompt tokens after the class token))

Shallow (--prompt_depth 1): the tokens enter at the first block's input; deep (--prompt_depth 0, every block,
or D, the first D): a new set replaces them at each of those blocks' inputs. The head: the zero-shot text
classifier of the class prompts (logit_scale x cosine, fixed) for a model with a text tower, a trained linear
head otherwise (--vpt_head chooses). Any ViT of open_clip, timm or transformers' CLIP works, CLIP or not
(UNI, DinoBloom, the tiny test ViT); a convolutional network is refused in one line.

Jia et al., ECCV 2022 (KMnP/vpt): 5 tokens (its config's default), U(-v, v) initialisation with
v = sqrt(6 / (3 * patch^2 + width)), 100 epochs with 10 of warmup; its SGD learning rates (searched per task,
0.1 to 50) do not carry over to the engine's AdamW, whose 1e-3 here is this toolkit's choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from methods.coop import paper_epochs_steps
from methods.heads import class_text_embeddings, linear_head
from methods.registry import Method, MethodError, Plan, Stage, register
from models.prompts import VisualPrompts, visual_tower

VPT_EPOCHS = 100  # KMnP/vpt configs/base-prompt.yaml TOTAL_EPOCH


@dataclass(frozen=True)
class VPTSettings:
    n_ctx_vision: int = field(default=5, metadata={"help": "visual prompt tokens"})
    prompt_depth: int = field(default=1, metadata={"help": "blocks whose input gets its own prompts: 1 = shallow "
                                                           "VPT, 0 = every block (deep VPT), D = the first D"})
    vpt_head: Literal["auto", "text", "linear"] = field(
        default="auto", metadata={"help": "text: the zero-shot classifier of the class prompts (fixed); linear: a "
                                          "trained linear head; auto: text when the model has a text tower"})

    def __post_init__(self):
        if self.n_ctx_vision < 1 or self.prompt_depth < 0:
            raise MethodError("--n_ctx_vision must be at least 1 and --prompt_depth at least 0")


def prompt_depth(depth: int, blocks: int) -> int:
    """--prompt_depth resolved against a tower of `blocks` blocks (0: all of them); MethodError beyond it."""
    if depth > blocks:
        raise MethodError(f"--prompt_depth {depth}: this model has {blocks} blocks; give at most {blocks} (0: all)")
    return depth or blocks


class TextClassifier(nn.Module):
    """The zero-shot classifier on (prompted) image features: logit_scale x cosine with fixed class embeddings."""

    def __init__(self, text: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("text", F.normalize(text.float(), dim=-1))
        self.register_buffer("scale", scale.reshape(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features.float(), dim=-1) @ self.text.t()


class PromptedViT(nn.Module):
    """A frozen vision transformer with visual prompt tokens, then a head."""

    def __init__(self, spec, prompts: VisualPrompts, head: nn.Module):
        super().__init__()
        self.backbone = spec.model  # frozen; registered so that .to() moves it with the prompts
        self.visual_prompts = prompts
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual_prompts(images))


def build(ctx, s: VPTSettings) -> Plan:
    tower = visual_tower(ctx.spec)
    use_text = s.vpt_head == "text" or (s.vpt_head == "auto" and ctx.spec.has_text)
    head = TextClassifier(class_text_embeddings(ctx), ctx.spec.logit_scale) if use_text else linear_head(ctx)
    torch.manual_seed(ctx.config.seed)
    prompts = VisualPrompts(tower, s.n_ctx_vision, prompt_depth(s.prompt_depth, tower.depth), "uniform")
    model = PromptedViT(ctx.spec, prompts, head)
    steps, notes = paper_epochs_steps(ctx, VPT_EPOCHS)
    notes.update(head="text" if use_text else "linear", prompt_depth=prompts.tokens.shape[0])
    return Plan(model, "images", [Stage("vpt", model, "images", steps, ctx.config.lr)], notes=notes)


def label(s: VPTSettings) -> str:
    depth = "deep" if s.prompt_depth == 0 else ("shallow" if s.prompt_depth == 1 else f"d{s.prompt_depth}")
    return f"vpt-{s.n_ctx_vision}-{depth}-{s.vpt_head}"


register(Method(
    name="vpt", description="VPT: visual prompt tokens (shallow or deep) in a frozen ViT + zero-shot text or linear "
                            "head, on images",
    settings=VPTSettings, inputs="images", build=build, lr=1e-3, budget="epochs",
    source="VPT (Jia et al., ECCV 2022; KMnP/vpt): 5 tokens, 100 epochs; lr 1e-3 for AdamW (its SGD lrs do not "
           "transfer)",
    label=label,
))
