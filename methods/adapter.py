"""Residual bottleneck adapter on frozen features, followed by a linear head (CLIP-Adapter style)."""

from dataclasses import dataclass, field

import torch
from torch import nn

from methods.heads import LINEAR_HEAD, HeadCodec, describe_linear, linear_head
from methods.registry import HEAD_TASKS, Method, MethodError, Plan, Stage, register
from methods.transductive import TransductiveSettings, add_transductive_stage, ti_suffix


@dataclass(frozen=True)
class AdapterSettings(TransductiveSettings):
    reduction: int = field(default=4, metadata={"help": "bottleneck width = feature size / reduction"})

    def __post_init__(self):
        super().__post_init__()
        if self.reduction < 1:
            raise MethodError(f"--reduction must be at least 1, got {self.reduction}")


class ResidualAdapter(nn.Module):
    """x + up(relu(down(x))), then the head; `up` starts at zero, so at step 0 this is the head alone."""

    def __init__(self, dim: int, reduction: int, head: nn.Linear):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.up(torch.relu(self.down(x))))


def _describe(head: ResidualAdapter) -> dict:
    return {"dim": head.down.in_features, "hidden": head.down.out_features, "head": describe_linear(head.head)}


def _rebuild(facts: dict, state: dict) -> ResidualAdapter:
    hidden = facts.get("hidden") or max(1, facts["dim"] // facts["reduction"])  # exports before "hidden": reduction
    module = ResidualAdapter(facts["dim"], 1, LINEAR_HEAD.rebuild(facts["head"], {}))
    module.down, module.up = nn.Linear(facts["dim"], hidden), nn.Linear(hidden, facts["dim"])
    return module


def build(ctx, s: AdapterSettings) -> Plan:
    head = linear_head(ctx)
    model = ResidualAdapter(ctx.spec.feature_dim, s.reduction, head)
    stage = Stage("adapter", model, "features", ctx.epoch_steps(), ctx.config.lr)
    return add_transductive_stage(ctx, Plan(model, "features", [stage]), s)


register(Method(
    tasks=HEAD_TASKS,
    name="adapter", description="residual bottleneck MLP on frozen features + linear head",
    settings=AdapterSettings, inputs="features", build=build,
    source="CLIP-Adapter (Gao et al. 2021); feature adapters of few-shot medical studies",
    label=lambda s: f"adapter-red{s.reduction}" + ti_suffix(s),
    head_codec=HeadCodec("residual_adapter", _describe, _rebuild),
))
