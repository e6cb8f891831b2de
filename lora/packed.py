"""Packed LoRA: several runs' adapters on one frozen model, one forward over their concatenated batches.

Runs that share a frozen backbone keep their own LoRA layers (their own ``lora_A``/``lora_B``/magnitude
parameters) in models whose frozen tensors are the same storage. During a packed forward one of those
models, the host, runs on the concatenation of every run's batch (run 0's samples first, then run 1's...):
its frozen layers compute once for all samples, and each LoRA layer computes its frozen projection once
for all rows and adds each run's low-rank update to that run's rows, with that run's dropout drawn from
that run's own random stream exactly as the run draws it when it trains alone. Modules that hold only
trainable parameters (a classification head) run per run on their rows.

The math is the LoRA layers' own (``lora.lowrank``, ``lora.dora`` and the layers' helpers); what differs
from a run alone is only that the frozen matrix products see more rows, so results agree up to the
floating-point rounding of those products.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora import dora as dora_math
from lora.layers import FusedLoRAMixin, LoRAConv2d, LoRALinear, LoRAModule, LoRAMultiheadAttention
from lora.lowrank import _compute_dtype, dropped

__all__ = ["Pack", "RandomStream", "pack_problem", "packed_forward", "per_run_modules"]


def _default_generator(device: torch.device) -> torch.Generator:
    """The global generator torch's in-place random draws on `device` use."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    raise ValueError(f"packed runs draw dropout on cpu or cuda, not {device.type}")


class RandomStream:
    """One run's random numbers: the global generator's state while that run draws.

    A run alone seeds the global generator at every step and its layers draw from it in order; in a pack
    each run's stream is swapped into the global generator for exactly its own draws, so every run sees
    the sequence it sees alone.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)

    def seed(self, seed: int) -> None:
        """Restart the stream as ``torch.manual_seed(seed)`` restarts the global generator."""
        self.generator.manual_seed(seed)

    @contextlib.contextmanager
    def drawing(self) -> Iterator[None]:
        """Inside: the global generator of the stream's device continues this stream."""
        shared = _default_generator(self.device)
        saved = shared.get_state()
        shared.set_state(self.generator.get_state())
        try:
            yield
        finally:
            self.generator.set_state(shared.get_state())
            shared.set_state(saved)


@dataclass
class Pack:
    """The runs of one packed batch: how many samples each has (in batch order) and their random streams."""

    streams: list[RandomStream]
    counts: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def rows(self, tensor: Tensor) -> list[Tensor]:
        """`tensor`'s leading dimension (samples, or samples x tokens when flattened) cut into each run's part."""
        per = tensor.shape[0] // max(self.total, 1)
        if per * self.total != tensor.shape[0]:
            raise RuntimeError(f"a packed layer got {tensor.shape[0]} rows for {self.total} samples: this model "
                               "does not keep samples on its leading dimension, so its runs cannot be packed")
        return list(tensor.split([n * per for n in self.counts]))


# -- the packed computations ---------------------------------------------------------------------


@dataclass
class _Update:
    """One run's low-rank update of one projection: ``scale * dropout(x) @ a.T @ bt``, then DoRA's factor."""

    a: Tensor
    bt: Tensor
    scale: float
    rate: float
    dora: Tensor | None = None


def _packed_low_rank(x: Tensor, weight: Tensor, bias: Tensor | None, updates: Sequence[_Update | None],
                     pack: Pack) -> Tensor:
    """``lora.lowrank.low_rank_linear`` for every run at once: the dense product once over all rows, each
    run's update (None: none) on its rows, with its dropout from its stream; DoRA's rescaling per run."""
    flat = x.reshape(-1, x.shape[-1]).to(_compute_dtype(x))
    out = F.linear(flat, weight, bias)
    pieces = []
    for update, rows, base, stream in zip(updates, pack.rows(flat), pack.rows(out), pack.streams, strict=True):
        if update is None:
            pieces.append(base)
            continue
        factor = 1.0
        if update.rate > 0:
            with stream.drawing():
                rows, keep = dropped(rows, update.rate)
            factor = 1.0 / keep
        h = F.linear(rows, update.a)
        piece = torch.addmm(base, h.to(base.dtype), update.bt.to(base.dtype), alpha=update.scale * factor)
        pieces.append(piece if update.dora is None else dora_math.rescale(piece, update.dora, bias))
    out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return out.view(*x.shape[:-1], out.shape[-1])


def _linear_update(layer: LoRALinear) -> _Update | None:
    """What LoRALinear.forward adds to its frozen projection."""
    if not layer.enabled:
        return None
    letter = layer.letters[0]
    return _Update(layer.lora_A, layer.lora_B.t().contiguous(), layer.scale, layer.active_dropout,
                   layer.dora_factor(letter) if layer.dora else None)


def _fused_update(layer: FusedLoRAMixin, groups: tuple[str, ...]) -> _Update | None:
    """What FusedLoRAMixin.project adds to the row blocks `groups` of its fused projection."""
    chosen = [g for g in groups if g in layer.letters] if layer.enabled else []
    if not chosen:
        return None
    a = torch.cat([layer.lora_pair(g)[0] for g in chosen]) if len(chosen) > 1 else layer.lora_pair(chosen[0])[0]
    return _Update(a, layer._stacked_bt(groups, chosen), layer.scale, layer.active_dropout,
                   layer._dora_factors(groups, chosen) if layer.dora else None)


def _sliced(modules: Sequence[nn.Module], pack: Pack, call: Callable[[nn.Module, Tensor], Tensor]
            ) -> Callable[[Tensor], Tensor]:
    """A forward that runs ``call(module_i, rows_i)`` for every run i (in its random stream) and concatenates."""

    def forward(x: Tensor) -> Tensor:
        outs = []
        for module, rows, stream in zip(modules, pack.rows(x), pack.streams, strict=True):
            with stream.drawing():
                outs.append(call(module, rows))
        return torch.cat(outs)

    return forward


def _class_forward(module: nn.Module, x: Tensor) -> Tensor:
    """The module's own class forward (not an override installed on the host)."""
    return type(module).forward(module, x)


# -- which modules are per run -------------------------------------------------------------------


def per_run_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """(LoRA layer paths, paths of modules whose parameters are all trainable and which are not LoRA layers),
    the modules whose computation differs between runs; ValueError when a trainable parameter lives
    elsewhere (beside frozen ones in a module that is not a LoRA layer)."""
    lora_paths, own_paths, covered = [], [], []
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in covered):
            continue
        if isinstance(module, LoRAModule):
            lora_paths.append(name)
            continue
        params = list(module.parameters())
        if params and all(p.requires_grad for p in params) and name:
            own_paths.append(name)
            covered.append(name)
            continue
        loose = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if loose:
            raise ValueError(f"trainable parameter {name + '.' if name else ''}{loose[0]} sits beside frozen ones")
    return lora_paths, own_paths


def pack_problem(model: nn.Module) -> str | None:
    """Why the runs of this (LoRA-adapted, partly trainable) model cannot share a packed forward, or None."""
    try:
        lora_paths, _ = per_run_modules(model)
    except ValueError as exc:
        return str(exc)
    modules = dict(model.named_modules())
    for path in lora_paths:
        layer = modules[path]
        if not isinstance(layer, (LoRALinear, FusedLoRAMixin, LoRAConv2d)):
            return f"{path} is a {type(layer).__name__}, which has no packed form"
        if isinstance(layer, LoRAMultiheadAttention) and (not layer.batch_first or layer.dropout > 0):
            return f"{path}: attention that is not batch-first or drops attention weights"
    for name, module in model.named_modules():
        # randomness outside the LoRA layers would be drawn once over the whole packed batch
        rate = getattr(module, "p", None) if isinstance(module, nn.modules.dropout._DropoutNd) else None
        rate = rate or getattr(module, "drop_prob", None)
        if rate:
            return f"{name} draws random numbers in training ({type(module).__name__} {rate})"
    return None


@contextlib.contextmanager
def packed_forward(models: Sequence[nn.Module], pack: Pack) -> Iterator[nn.Module]:
    """Inside: ``models[0]`` (the host) computes all runs' outputs on their concatenated batch.

    `models` are the runs' models in pack order, the same architecture with the same frozen tensors (checked
    by the caller) and each its own LoRA layers and trainable modules; ``pack.counts`` says how many samples
    of the batch each run has. The host's LoRA layers and per-run modules are switched to packed forwards
    for the duration (instance overrides, removed on exit), so keep the block to the forward pass: backward
    needs no module.
    """
    host = models[0]
    lora_paths, own_paths = per_run_modules(host)
    by_run = [dict(m.named_modules()) for m in models]
    installed: list[tuple[nn.Module, str]] = []

    def install(module: nn.Module, name: str, fn: Callable) -> None:
        object.__setattr__(module, name, fn)  # an instance attribute shadows the class method
        installed.append((module, name))

    try:
        for path in lora_paths:
            layers = [modules[path] for modules in by_run]
            layer = layers[0]
            if isinstance(layer, FusedLoRAMixin):
                install(layer, "project", lambda x, weight, bias, groups, layers=layers: _packed_low_rank(
                    x, weight, bias, [_fused_update(lay, groups) for lay in layers], pack))
            elif isinstance(layer, LoRALinear):
                install(layer, "forward", lambda x, layers=layers: _packed_low_rank(
                    x, layers[0].weight, layers[0].bias, [_linear_update(lay) for lay in layers], pack))
            else:  # pointwise convolutions: each run's whole layer on its samples (its own fused CPU kernel)
                install(layer, "forward", _sliced(layers, pack, _class_forward))
        for path in own_paths:
            install(by_run[0][path], "forward", _sliced([modules[path] for modules in by_run], pack, _class_forward))
        yield host
    finally:
        for module, name in installed:
            object.__delattr__(module, name)
