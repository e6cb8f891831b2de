"""Fold LoRA updates into the base weights and give back a plain model."""

from __future__ import annotations

from torch import nn

from lora.layers import LoRAModule


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
