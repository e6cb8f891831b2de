"""Transduction for the feature-space methods: a class-proportion prior, and TransCLIP.

``--transductive proportion``: after the usual training, ``--ti_steps`` steps whose loss is the labelled
cross-entropy (which keeps the head anchored) plus

    lambda * sum_c max(0, |p_hat_c - pi_c| / max(p_hat_c, pi_c) - margin),

where p_hat_c is the mean predicted probability of class c over the unlabelled test features and
pi the prior (``--ti_prior train``: class proportions of the labelled train set, or ``uniform``).

``--transductive transclip``: the trained classifier's test probabilities y_hat are refined by TransCLIP
(Zanella et al., NeurIPS 2024; MaxZanella/transduction-for-vlms): a Gaussian mixture over the L2-normalised
test features (one mean per class, one shared diagonal covariance), a term rewarding agreement between each
test image and its 3 nearest test neighbours, and a KL pull of the assignments z towards y_hat. Block
coordinate descent, as the original: 10 rounds of (5 z updates, mean update, covariance update), then a last
z update, with

    z_i  proportional to  y_hat_i ** lambda * exp((log N(f_i; mu, Sigma) / 50 + (W z + W^T z)_i / 6) / kl),

W the neighbour affinities (cosine of the 3 nearest neighbours). ``--transclip_kl`` (kl) weighs the KL term:
1 is the original (lambda = 1, its zero-shot and any-method setting); as it grows, z tends to y_hat. The test
probabilities become log z (the engine's softmax gives z back); validation images keep the classifier's own.
Only the test features are used, never their labels, in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from methods.registry import MethodError, Plan, Stage
from tasks import get_task

TRANSDUCTIVE = ("none", "proportion", "transclip")


@dataclass(frozen=True)
class TransductiveSettings:
    transductive: str = field(default="none", metadata={"help": "none; proportion: a class-proportion prior on the "
                                                                "unlabelled test features; transclip: TransCLIP "
                                                                "on the test predictions"})
    ti_steps: int = field(default=100, metadata={"help": "steps of the transductive stage"})
    ti_prior: str = field(default="train", metadata={"help": "train (class proportions of the labelled data) "
                                                             "or uniform"})
    ti_lambda: float = field(default=0.1, metadata={"help": "weight of the proportion penalty"})
    ti_margin: float = field(default=0.3, metadata={"help": "relative deviation tolerated without penalty"})
    transclip_kl: float = field(default=1.0, metadata={"help": "TransCLIP: weight of the KL pull towards the "
                                                               "classifier's predictions (1: the original)"})

    def __post_init__(self):
        if self.transductive not in TRANSDUCTIVE:
            raise MethodError(f"--transductive {self.transductive}: use {', '.join(TRANSDUCTIVE)}")
        if not self.transclip_kl > 0:
            raise MethodError(f"--transclip_kl must be positive, got {self.transclip_kl:g}")
        if self.ti_prior not in ("train", "uniform"):
            raise MethodError(f"--ti_prior {self.ti_prior}: use train or uniform")
        if self.ti_steps < 1 or self.ti_lambda < 0 or self.ti_margin < 0:
            raise MethodError("--ti_steps must be >= 1, --ti_lambda and --ti_margin >= 0")


def ti_suffix(s: TransductiveSettings) -> str:
    """The part of a run folder name that shows the transductive stage."""
    if s.transductive == "transclip":
        return "-transclip" if s.transclip_kl == 1 else f"-transclip-kl{s.transclip_kl:g}"
    return "" if s.transductive == "none" else f"-ti-{s.ti_prior}"


def proportion_penalty(probs: torch.Tensor, prior: torch.Tensor, margin: float) -> torch.Tensor:
    """sum_c max(0, |p_hat_c - pi_c| / max(p_hat_c, pi_c) - margin) with p_hat the mean of `probs` (N, C)."""
    p_hat = probs.mean(dim=0)
    relative = (p_hat - prior).abs() / torch.maximum(p_hat, prior).clamp_min(1e-12)
    return (relative - margin).clamp_min(0).sum()


def class_prior(labels: torch.Tensor, num_classes: int, kind: str) -> torch.Tensor:
    if kind == "uniform":
        return torch.full((num_classes,), 1.0 / num_classes)
    counts = torch.bincount(labels, minlength=num_classes).float()
    return counts / counts.sum()


def add_transductive_stage(ctx, plan: Plan, s: TransductiveSettings) -> Plan:
    """Append the transductive stage to a feature-space plan when asked for; record its prior."""
    if s.transductive == "none":
        return plan
    if not get_task(ctx.split.task).exclusive:
        raise MethodError(f"--transductive {s.transductive} is for data with one class per image")
    if s.transductive == "transclip":
        test_x, _ = ctx.features("test")  # the features only: test labels are never read here
        plan.model = TransCLIPClassifier(plan.model, test_x, s.transclip_kl)
        return plan
    if not any(p.requires_grad for p in plan.model.parameters()):
        raise MethodError("--transductive proportion trains the classifier further, and this method's has nothing "
                          "to train: use --transductive transclip")
    _, train_y = ctx.features("train")
    test_x, _ = ctx.features("test")  # the features only: test labels are never read here
    prior = class_prior(train_y, len(ctx.split.classes), s.ti_prior)
    model = plan.model

    on_device: dict = {}  # the test features and prior moved to the training device once, not every step

    def penalty(module) -> torch.Tensor:
        device = next(module.parameters()).device
        if device not in on_device:
            on_device[device] = (test_x.to(device), prior.to(device))
        x, p = on_device[device]
        return s.ti_lambda * proportion_penalty(module(x).float().softmax(dim=1), p, s.ti_margin)

    plan.stages.append(Stage("transductive", model, "features", s.ti_steps, ctx.config.lr, extra_loss=penalty))
    plan.notes["transductive_prior"] = [round(float(p), 6) for p in prior]
    return plan


# -- TransCLIP -------------------------------------------------------------------------------------------
NEIGHBOURS = 3  # n_neighbors
ROUNDS = 10  # max_iter: rounds of (z, mu, sigma) updates
Z_STEPS = 5  # z updates per round
TOP_CONFIDENT = 8  # test images per class that start its mean
TEMPERATURE = 50.0  # the original's scaling of the likelihood and graph terms
CHUNK = 4096  # rows per block when searching neighbours


def neighbour_graph(f: torch.Tensor, k: int = NEIGHBOURS) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (N, k), cosine affinities (N, k)) of each row's k nearest other rows; blocks of rows keep the
    memory at CHUNK x N."""
    n = f.shape[0]
    k = min(k, n - 1)
    idx, val = torch.empty(n, k, dtype=torch.long, device=f.device), torch.empty(n, k, device=f.device)
    for start in range(0, n, CHUNK):
        sim = f[start:start + CHUNK] @ f.t()
        rows = torch.arange(sim.shape[0], device=f.device)
        sim[rows, rows + start] = -float("inf")  # not its own neighbour
        v, i = sim.topk(k, dim=1)
        idx[start:start + CHUNK], val[start:start + CHUNK] = i, v
    return idx, val


def _graph_term(z: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """(W z + W^T z) for the sparse W with W[i, idx[i, j]] = val[i, j]."""
    wz = (val.unsqueeze(-1) * z[idx]).sum(1)
    sent = (val.unsqueeze(-1) * z.unsqueeze(1)).reshape(-1, z.shape[1])  # row i's share for each neighbour
    wtz = torch.zeros_like(z).index_add_(0, idx.reshape(-1), sent)
    return wz + wtz


def _log_likelihood(f: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """-1/2 sum_d (f_d - mu_cd)^2 / var_d for every row and class (N, C), without forming N x C x D."""
    inv = 1 / var
    return -0.5 * (((f * f) @ inv)[:, None] - 2 * f @ (mu * inv).t() + (mu * mu * inv).sum(1))


def _initial_means(f: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per class, the mean of the z-weighted features of its most confident test images, normalised."""
    top = min(TOP_CONFIDENT, f.shape[0])
    values, rows = z.topk(top, dim=0)  # (top, C)
    mu = (f[rows] * values.unsqueeze(-1)).mean(0)  # (C, D)
    return F.normalize(mu, dim=-1)


@torch.no_grad()
def transclip(features: torch.Tensor, probs: torch.Tensor, kl_weight: float = 1.0, lam: float = 1.0
              ) -> torch.Tensor:
    """TransCLIP's assignments z (N, C) of the test `features` (N, D) from the input probabilities (N, C).

    Reads no label. kl_weight -> infinity returns `probs` (with lam = 1).
    """
    f = F.normalize(features.float(), dim=-1)
    y_hat = probs.float().to(f.device)
    z = y_hat.clone()
    idx, val = neighbour_graph(f)
    graph_weight = TEMPERATURE / (2 * idx.shape[1])
    mu = _initial_means(f, z)
    var = torch.full((f.shape[1],), 1.0 / f.shape[1], device=f.device)
    prior = y_hat.clamp_min(1e-38).log() * lam  # log(y_hat ** lam); a zero probability stays zero
    for round_ in range(ROUNDS + 1):
        likelihood = _log_likelihood(f, mu, var)
        for _ in range(Z_STEPS):
            energy = likelihood + graph_weight * _graph_term(z, idx, val)
            energy = energy - energy.max(dim=1, keepdim=True).values  # stable, as the original
            z = (prior + energy / (TEMPERATURE * kl_weight)).softmax(dim=1)
        if round_ == ROUNDS:
            break
        weight = z / z.sum(0).clamp_min(1e-12)  # (N, C), columns sum to 1
        mu = F.normalize(weight.t() @ f, dim=-1)
        # shared diagonal covariance: sum_i sum_c z_ic (f_i - mu_c)^2 / sum z
        second = (z.sum(1) @ (f * f)) - 2 * ((z.t() @ f) * mu).sum(0) + z.sum(0) @ (mu * mu)
        var = (second / z.sum()).clamp_min(1e-12)
    return z


class TransCLIPClassifier(nn.Module):
    """A classifier whose predictions on the run's test features are TransCLIP's, other inputs unchanged.

    The engine evaluates a part in chunks of rows, in order; a chunk equal to the matching rows of the test
    features gets log z of those rows (softmax gives z back). z is computed once per evaluation, from the base
    classifier's probabilities on all test features (recomputed whenever the classifier enters eval mode).
    """

    def __init__(self, base: nn.Module, test_features: torch.Tensor, kl_weight: float):
        super().__init__()
        self.base = base
        self.register_buffer("test_features", test_features, persistent=False)
        self.kl_weight = kl_weight
        self._log_z: torch.Tensor | None = None
        self._cursor = 0

    def train(self, mode: bool = True):
        super().train(mode)
        self._log_z, self._cursor = None, 0  # the base may have changed: TransCLIP again at the next test chunk
        return self

    def _test_rows(self, x: torch.Tensor) -> slice | None:
        """The rows of the test features that x is, when it is the next chunk (or the first) of them."""
        n = x.shape[0]
        for start in (self._cursor, 0):
            end = start + n
            if end <= self.test_features.shape[0] and torch.equal(x, self.test_features[start:end].to(x)):
                return slice(start, end)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.base(x)
        rows = self._test_rows(x)
        if rows is None:
            return self.base(x)
        if self._log_z is None:
            test = self.test_features.to(x.device)
            probs = torch.cat([self.base(chunk).float().softmax(dim=1) for chunk in test.split(CHUNK)])
            self._log_z = transclip(test, probs, self.kl_weight).clamp_min(1e-38).log()
        self._cursor = rows.stop % self.test_features.shape[0]
        return self._log_z[rows]
