"""CLIP-Adapter: a residual MLP on the image features, blended with the original features, classified by the
zero-shot text classifier (the text side stays fixed).

    f' = ratio * relu(W2 relu(W1 f)) + (1 - ratio) * f,   logits = logit_scale * cos(f', t_c)

W1: D -> D/4 and W2: D/4 -> D without biases, as in the original. On cached frozen features (the original
trains on augmented images through the frozen tower; the adapter itself sees only the features).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from methods.heads import class_text_embeddings
from methods.registry import Method, MethodError, Plan, Stage, register
from methods.transductive import TransductiveSettings, add_transductive_stage, ti_suffix


@dataclass(frozen=True)
class ClipAdapterSettings(TransductiveSettings):
    ratio: float = field(default=0.2, metadata={"help": "weight of the adapted features in the blend (the "
                                                        "original: 0.2)"})
    reduction: int = field(default=4, metadata={"help": "bottleneck width = feature size / reduction"})

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.ratio <= 1:
            raise MethodError(f"--ratio must be in [0, 1], got {self.ratio:g}")
        if self.reduction < 1:
            raise MethodError(f"--reduction must be at least 1, got {self.reduction}")


class ClipAdapter(nn.Module):
    """The residual MLP on image features and the fixed zero-shot classifier."""

    def __init__(self, text: torch.Tensor, scale: torch.Tensor, ratio: float, reduction: int):
        super().__init__()
        dim = text.shape[1]
        hidden = max(1, dim // reduction)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                 nn.Linear(hidden, dim, bias=False), nn.ReLU())
        self.register_buffer("text", text)
        self.register_buffer("scale", scale.reshape(()))
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        blended = self.ratio * self.mlp(x) + (1 - self.ratio) * x
        return self.scale * F.normalize(blended, dim=-1) @ self.text.t()


def build(ctx, s: ClipAdapterSettings) -> Plan:
    text = class_text_embeddings(ctx)
    torch.manual_seed(ctx.config.seed)
    model = ClipAdapter(text, ctx.spec.logit_scale, s.ratio, s.reduction)
    stage = Stage("clip_adapter", model, "features", ctx.epoch_steps(), ctx.config.lr)
    return add_transductive_stage(ctx, Plan(model, "features", [stage]), s)


register(Method(
    name="clip_adapter", description="residual MLP on image features blended with them, zero-shot text "
                                     "classifier (CLIP-Adapter)",
    settings=ClipAdapterSettings, inputs="features", build=build, lr=1e-3,
    source="CLIP-Adapter (Gao et al., IJCV 2024; gaopengcuhk/CLIP-Adapter: SGD lr 1e-2, ratio 0.2); AdamW here",
    label=lambda s: f"clip_adapter-r{s.ratio:g}" + ti_suffix(s),
))
