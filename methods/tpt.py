"""TPT: test-time prompt tuning. Nothing trains before evaluation; each test image tunes its own prompt context.

For every image (val and test alike), from the untrained context:
  1. V views: the image itself and V - 1 random resized crops with random flips, through the frozen image tower;
  2. the views whose predictions have the lowest entropy (the fraction --tpt_select) are kept;
  3. --tpt_steps AdamW steps on the context minimise the entropy of their averaged prediction;
  4. the image is classified with the tuned context; the context goes back to its start for the next image.
No label is read: the classifier's forward sees images only. The engine has no per-image optimisation at
evaluation, so the plan's model does it in its own forward (gradients switched on inside it); the views of an
image are drawn from a generator seeded by the run's seed and the image's content, so an image gets the same
prediction whatever else is in its batch.

Shu et al., NeurIPS 2022 (azshue/TPT, tpt_classification.py): 4 tokens from "a photo of a", 64 views (63
augmented), the 10% most confident kept, 1 step of AdamW at lr 5e-3, prediction on the image itself. Its
fine-grained sets augment with AugMix; here, as for its ImageNet sets, random resized crops and flips.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.coop import TEMPLATE, ContextSettings, class_prompts, context_label
from methods.registry import Method, MethodError, Plan, register
from models.prompts import ClassPrompts

CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's defaults, as TPT uses


@dataclass(frozen=True)
class TPTSettings(ContextSettings):
    n_ctx: int = field(default=4, metadata={"help": "tuned context tokens (at most the phrase's tokens)"})
    ctx_init: str = field(default=TEMPLATE, metadata={"help": 'initial context: "template" (the dataset\'s prompt '
                                                              'before the class name; TPT\'s "a photo of a" on the '
                                                              "benchmark datasets), a phrase, or empty"})
    tpt_steps: int = field(default=1, metadata={"help": "optimisation steps per test image"})
    tpt_lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate of the per-image steps"})
    tpt_views: int = field(default=64, metadata={"help": "views per image: the image and tpt_views - 1 augmented"})
    tpt_select: float = field(default=0.1, metadata={"help": "fraction of the views, the most confident, whose "
                                                             "averaged prediction's entropy is minimised"})

    def __post_init__(self):
        super().__post_init__()
        if self.tpt_steps < 0 or self.tpt_views < 1 or not 0 < self.tpt_select <= 1 or self.tpt_lr <= 0:
            raise MethodError("tpt needs --tpt_steps >= 0, --tpt_views >= 1, 0 < --tpt_select <= 1 and --tpt_lr > 0")


def image_seed(seed: int, image: torch.Tensor) -> int:
    """A generator seed from the run's seed and an image's content (its views do not depend on its batch)."""
    digest = hashlib.blake2b(image.detach().float().cpu().numpy().tobytes(), digest_size=8, key=str(seed).encode())
    return int.from_bytes(digest.digest(), "little") >> 1


def random_views(image: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`image` (3, S, S) followed by n random resized crops (scale 0.08-1, ratio 3/4-4/3) with random flips."""
    side_h, side_w = image.shape[-2:]
    out = [image]
    for _ in range(n):
        u = torch.rand(4, generator=generator).tolist()
        area = side_h * side_w * (CROP_SCALE[0] + u[0] * (CROP_SCALE[1] - CROP_SCALE[0]))
        ratio = math.exp(math.log(CROP_RATIO[0]) + u[1] * (math.log(CROP_RATIO[1]) - math.log(CROP_RATIO[0])))
        w = min(max(round(math.sqrt(area * ratio)), 1), side_w)
        h = min(max(round(math.sqrt(area / ratio)), 1), side_h)
        top, left = int(u[2] * (side_h - h + 1)), int(u[3] * (side_w - w + 1))
        crop = image[None, :, top:top + h, left:left + w]
        view = F.interpolate(crop, size=(side_h, side_w), mode="bilinear", align_corners=False, antialias=True)[0]
        out.append(view.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else view)
    return torch.stack(out)


def confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the `fraction` of rows whose softmax has the lowest entropy (at least one)."""
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    return entropy.argsort()[:max(int(len(logits) * fraction), 1)]


def average_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of the rows' softmax (computed in log space, as TPT does)."""
    logp = logits.log_softmax(-1)
    mean = (logp.logsumexp(0) - np.log(len(logits))).clamp(min=torch.finfo(logp.dtype).min)
    return -(mean * mean.exp()).sum()


class TestTimePrompts(nn.Module):
    """A frozen CLIP model whose class prompts' context is tuned for each image in the forward, then reset."""

    def __init__(self, spec, prompts: ClassPrompts, s: TPTSettings, seed: int):
        super().__init__()
        self.backbone = spec.model  # frozen; registered so that .to() moves it
        self.prompts = prompts.requires_grad_(False)  # the starting context: a constant, never trained
        self._encode = spec.encode_image
        self.register_buffer("scale", spec.logit_scale.reshape(()))
        self.s, self.seed = s, seed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.classify(image) for image in images])

    def classify(self, image: torch.Tensor) -> torch.Tensor:
        """Logits (C,) of one normalised image after its own test-time tuning."""
        s = self.s
        generator = torch.Generator().manual_seed(image_seed(self.seed, image))
        with torch.no_grad():
            views = random_views(image.float(), s.tpt_views - 1, generator).to(image.dtype)
            features = F.normalize(self._encode(views).float(), dim=-1)
        ctx = self.prompts.ctx.detach().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([ctx], lr=s.tpt_lr)
        keep = None
        with torch.enable_grad():  # evaluation runs under no_grad; these steps need gradients
            for _ in range(s.tpt_steps):
                logits = self.scale * features @ F.normalize(self.prompts(ctx).float(), dim=-1).t()
                keep = confident(logits.detach(), s.tpt_select) if keep is None else keep  # chosen once, as TPT
                loss = average_entropy(logits[keep])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            return self.scale * features[0] @ F.normalize(self.prompts(ctx).float(), dim=-1).t()


def build(ctx, s: TPTSettings) -> Plan:
    model = TestTimePrompts(ctx.spec, class_prompts(ctx, s), s, ctx.config.seed)
    return Plan(model, "images", notes={"test_time_steps": s.tpt_steps, "views": s.tpt_views})


register(Method(
    name="tpt", description="TPT: per test image, a few steps on the prompt context minimising the entropy of its "
                            "most confident augmented views; no training, no labels",
    settings=TPTSettings, inputs="images", build=build, trains=False,
    source="TPT (Shu et al., NeurIPS 2022; azshue/TPT): 4 tokens, 64 views, top 10%, 1 AdamW step at 5e-3 "
           "(--tpt_lr)",
    label=lambda s: context_label("tpt", s) + f"-s{s.tpt_steps}-v{s.tpt_views}",
))
