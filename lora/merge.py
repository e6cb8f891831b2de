"""Fold LoRA updates into the base weights and give back a plain model."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from lora.layers import LoRAModule
from lora.svd import SingularValueDelta, merge_svd


def _merge_children(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        _merge_children(child)  # inner layers first (an attention's 'o' before the attention itself)
        if isinstance(child, LoRAModule):
            setattr(module, name, child.merged())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every ``s * B @ A`` into its base weight and restore the original modules, in place.

    The result has the original module types and state_dict keys and runs at the base model's cost.
    Merging a model without LoRA layers changes nothing.
    """
    if isinstance(model, LoRAModule):
        _merge_children(model)
        return model.merged()
    _merge_children(model)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every kind of adapter this package injects (LoRA and DoRA layers, singular-value updates) into
    plain weights, in place; the model that results."""
    return merge_svd(merge_lora(model))


def has_adapters(model: nn.Module) -> bool:
    """Whether any adapter of this package is injected in `model`."""
    return any(isinstance(m, LoRAModule) for m in model.modules()) or any(
        isinstance(p, SingularValueDelta) for m in model.modules() if parametrize.is_parametrized(m)
        for plist in m.parametrizations.values() for p in plist)
