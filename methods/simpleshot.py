"""SimpleShot: centre on the train-feature mean, L2-normalise, nearest class mean (Wang et al. 2019)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.heads import FixedLogits, class_means, fixed_logits_codec
from methods.registry import Method, Plan, register


@dataclass(frozen=True)
class SimpleShotSettings:
    pass


def normalise(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """CL2N: subtract the train mean, then L2-normalise."""
    return F.normalize(x.float() - centre, dim=-1)


def _logits(module, x):
    # negative Euclidean distance to each class mean: the nearest mean has the largest logit
    return -torch.cdist(normalise(x, module.centre), module.means)


def build(ctx, s: SimpleShotSettings) -> Plan:
    x, y = ctx.features("train")
    centre = x.float().mean(0)
    means = class_means(normalise(x, centre), y, len(ctx.split.classes))
    return Plan(FixedLogits(_logits, centre=centre, means=means), "features")


register(Method(
    name="simpleshot", description="no training: centred L2-normalised nearest class mean",
    settings=SimpleShotSettings, inputs="features", build=build, trains=False,
    source="SimpleShot (Wang et al. 2019)",
    head_codec=fixed_logits_codec(_logits)
))
