"""Building registry models without their weights, and reading the attention layout LoRA sees (holds no tests)."""

from __future__ import annotations

import torch
from torch import nn

from lora.inject import find_attention_sites, find_pointwise_units, find_towers
from models import ModelSpec, load_model

# lora.inject's kinds of attention site under the names the registry declares them with
LAYOUT_OF_KIND = {"mha": "mha", "fused": "fused_qkv", "separate": "separate_qkv"}


def build_on_meta(key: str, monkeypatch, backbone: str | None = None, weights: str = "random") -> ModelSpec:
    """The ModelSpec of `key` built on the meta device (no memory, no initialisation), its weights as asked.

    open_clip moves a new model to a device, which a meta model cannot do: that step is skipped.
    """
    import open_clip.factory

    with monkeypatch.context() as patch:
        if hasattr(open_clip.factory, "_set_model_device_and_precision"):
            patch.setattr(open_clip.factory, "_set_model_device_and_precision", lambda *args, **kwargs: None)
        with torch.device("meta"):
            return load_model(key, backbone=backbone, weights=weights)


def tower_layouts(model: nn.Module) -> dict[str, set[str]]:
    """Tower name -> the attention layouts found in its block list ('pointwise_conv' when it has none)."""
    layouts = {}
    for name, tower in find_towers(model).items():
        kinds = {LAYOUT_OF_KIND[site.kind] for site in find_attention_sites(tower.module)}
        if not kinds and find_pointwise_units(tower.module):
            kinds = {"pointwise_conv"}
        layouts[name] = kinds
    return layouts
