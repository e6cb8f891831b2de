"""LP++: a linear probe whose class scores blend visual weights with the text classifier,

    logits = f W^T + b + alpha_c * (f . t_c),

W starting at the class sums of the normalised train features, alpha (one per class) at 250 times the mean
text score of the train images, trained full batch with the closed-form step sizes of the paper's
block-coordinate descent: SGD with momentum 0.9 on (W, b) at lr_w = 4N / lambda_max(F^T F), and every 10th
step a gradient step on alpha at lr_alpha = N / (4 max_c sum_i (f_i . t_c)^2).

These step sizes and the optimiser are LP++'s own, so the fit runs here, when the run builds its classifier,
not through the engine's AdamW trainer (which has one optimiser for all methods).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from methods.heads import class_means, class_text_embeddings
from methods.registry import Method, MethodError, Plan, register
from methods.transductive import TransductiveSettings, add_transductive_stage, ti_suffix

ALPHA_EVERY = 10  # alpha's update period in steps (the original's `(epoch + 1) % 10`)
ALPHA_INIT_FACTOR = 250.0  # alpha_init = 250 / shots * class-summed text scores


@dataclass(frozen=True)
class LPPPSettings(TransductiveSettings):
    lpp_steps: int = field(default=300, metadata={"help": "full-batch steps (the original: 300 epochs)"})

    def __post_init__(self):
        super().__post_init__()
        if self.lpp_steps < 0:
            raise MethodError(f"--lpp_steps must be >= 0, got {self.lpp_steps}")


class BlendedProbe(nn.Module):
    """Linear scores of the normalised features plus a per-class multiple of their text scores."""

    def __init__(self, weight: torch.Tensor, alpha: torch.Tensor, text: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(torch.zeros(weight.shape[0]))
        self.alpha = nn.Parameter(alpha.clone())
        self.register_buffer("text", text)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.normalize(x.float(), dim=-1)
        return f @ self.weight.t() + self.bias + self.alpha * (f @ self.text.t())


def step_sizes(f: torch.Tensor, text: torch.Tensor) -> tuple[float, float]:
    """(lr_w, lr_alpha) of LP++ for normalised features f (N, D) and text embeddings (C, D)."""
    n = f.shape[0]
    largest = torch.linalg.eigvalsh((f.t() @ f).double()).max().item()
    lr_w = 4 * n / largest
    lr_alpha = n / (4 * (f @ text.t()).pow(2).sum(0).max().item())
    return lr_w, lr_alpha


def initial_probe(f: torch.Tensor, y: torch.Tensor, text: torch.Tensor) -> BlendedProbe:
    """W = class sums of f; alpha = 250 x the mean over class pairs of the class-mean text scores."""
    num_classes = text.shape[0]
    counts = torch.bincount(y, minlength=num_classes).float()
    sums = class_means(f, y, num_classes) * counts[:, None]
    text_scores = class_means(f @ text.t(), y, num_classes)  # (C, C): mean text score of class c's images
    alpha = torch.full((num_classes,), ALPHA_INIT_FACTOR * text_scores.mean().item())
    return BlendedProbe(sums, alpha, text)


def fit_lp_pp(f: torch.Tensor, y: torch.Tensor, text: torch.Tensor, steps: int) -> tuple[BlendedProbe, dict]:
    """The LP++ probe after `steps` full-batch steps (0: its initialisation)."""
    f = F.normalize(f.float(), dim=-1)
    probe = initial_probe(f, y, text)
    lr_w, lr_alpha = step_sizes(f, text)
    optimiser = torch.optim.SGD([probe.weight, probe.bias], lr=lr_w, momentum=0.9)
    for step in range(steps):
        optimiser.zero_grad()
        probe.alpha.grad = None
        loss = F.cross_entropy(probe(f), y)
        loss.backward()
        optimiser.step()
        if (step + 1) % ALPHA_EVERY == 0:
            with torch.no_grad():
                probe.alpha -= lr_alpha * probe.alpha.grad
    probe.requires_grad_(False)
    return probe, {"lr_w": lr_w, "lr_alpha": lr_alpha}


def build(ctx, s: LPPPSettings) -> Plan:
    text = class_text_embeddings(ctx)
    x, y = ctx.features("train")
    probe, notes = fit_lp_pp(x, y, text, s.lpp_steps)
    notes["alpha_mean"] = probe.alpha.mean().item()
    return add_transductive_stage(ctx, Plan(probe, "features", notes={"lp_pp": notes}), s)


register(Method(
    name="lp_pp", description="LP++: visual class weights blended with text scores, full-batch fit with "
                              "closed-form step sizes (no training stage)",
    settings=LPPPSettings, inputs="features", build=build, trains=False,
    source="LP++ (Huang et al., CVPR 2024; FereshteShakeri/FewShot-CLIP-Strong-Baseline)",
    label=lambda s: f"lp_pp-s{s.lpp_steps}" + ti_suffix(s),
))
