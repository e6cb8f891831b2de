"""Building blocks shared by the methods: classifiers on images, heads on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError


class ImageClassifier(nn.Module):
    """Backbone image features followed by a head (images -> logits)."""

    def __init__(self, spec, head: nn.Module):
        super().__init__()
        self.backbone = spec.model
        self.head = head
        self._encode = spec.encode_image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._encode(x))


def linear_head(ctx) -> nn.Linear:
    """A fresh linear head from the model's feature size to the split's classes (seeded by the run)."""
    torch.manual_seed(ctx.config.seed)
    return nn.Linear(ctx.spec.feature_dim, len(ctx.split.classes))


def class_text_embeddings(ctx, templates: list[str] | None = None) -> torch.Tensor:
    """L2-normalised text embeddings of the class prompts (C, D), averaged over templates when several."""
    from datasets.registry import class_prompts

    spec = ctx.spec
    if not spec.has_text:
        raise UserError(
            f"this method needs a text tower, and {ctx.config.model_name} has none: use a CLIP-family model "
            "(clip, quilt, biomedclip, tiny_clip)"
        )
    spec.model.to(ctx.device).eval()
    per_template = []
    with torch.no_grad(), torch.autocast(ctx.device.type, enabled=False):
        for template in templates or [None]:
            if template is None:
                prompts = class_prompts(ctx.config.dataset, ctx.split.classes)
            else:
                prompts = [template.format(c.replace("_", " ")) for c in ctx.split.classes]
            per_template.append(F.normalize(spec.encode_text(prompts).float(), dim=-1))
    return F.normalize(torch.stack(per_template).mean(0), dim=-1).cpu()


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature of each class (C, D); a class without train images gets zeros."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).to(features.dtype)
    return sums / counts[:, None]


class CosineHead(nn.Module):
    """logits = exp(log_scale) * cos(x, w_c); prototypes w and the temperature are learnable."""

    def __init__(self, prototypes: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(prototypes.clone())
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).t()
        return self.log_scale.exp() * cos


class FixedLogits(nn.Module):
    """A non-trainable classifier on features: logits = fn(features), buffers moved with .to()."""

    def __init__(self, fn, **buffers: torch.Tensor):
        super().__init__()
        self._fn = fn
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(self, x)
