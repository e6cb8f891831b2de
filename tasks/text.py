"""Text classifiers from class prompts: what zero-shot methods and image-text evaluation share."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import UserError
from datasets.registry import class_prompts


def class_text_embeddings(ctx, templates: list[str] | None = None) -> torch.Tensor:
    """L2-normalised text embeddings of the class prompts (C, D), averaged over templates when several."""
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
