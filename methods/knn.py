"""k-nearest neighbours on cosine similarity of frozen features, with a similarity-weighted vote."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from methods.heads import FixedLogits, fixed_logits_codec
from methods.registry import Method, MethodError, Plan, register


@dataclass(frozen=True)
class KNNSettings:
    k: int = field(default=20, metadata={"help": "neighbours (capped at the number of train images)"})
    knn_temperature: float = field(default=0.07, metadata={"help": "vote weight exp(cosine / T), as in DINO's "
                                                                   "weighted kNN"})

    def __post_init__(self):
        if self.k < 1:
            raise MethodError(f"--k {self.k} is invalid: give at least 1 neighbour")
        if not self.knn_temperature > 0:
            raise MethodError(f"--knn_temperature must be positive, got {self.knn_temperature:g}")


def _logits(module, x):
    sim = F.normalize(x.float(), dim=-1) @ module.bank.t()
    top, idx = sim.topk(int(module.k), dim=1)
    weights = ((top - 1) / module.temperature).exp()  # exp(cos/T) up to a constant factor, no overflow
    votes = torch.zeros(x.shape[0], module.num_classes, device=x.device)
    votes.scatter_add_(1, module.labels[idx], weights)
    # log of the normalised vote: softmax of these logits gives the vote shares
    return (votes / votes.sum(1, keepdim=True)).clamp_min(1e-12).log()


def build(ctx, s: KNNSettings) -> Plan:
    x, y = ctx.features("train")
    k = min(s.k, len(y))
    model = FixedLogits(_logits, bank=F.normalize(x.float(), dim=-1), labels=y.long(), k=torch.tensor(k),
                        temperature=torch.tensor(s.knn_temperature))
    model.num_classes = len(ctx.split.classes)
    return Plan(model, "features", notes={"k_used": k})


register(Method(
    name="knn", description="no training: cosine k-nearest neighbours, similarity-weighted vote",
    settings=KNNSettings, inputs="features", build=build, trains=False,
    source="kNN evaluation of frozen features (DINO, Caron et al. 2021)",
    label=lambda s: f"knn-k{s.k}",
    head_codec=fixed_logits_codec(_logits)
))
