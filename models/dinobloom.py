"""DinoBloom S/B/L/G: DINOv2 ViTs (patch 14, fused qkv) trained on blood and bone-marrow cells, through timm.

MarrLab publishes the weights on the hub as torch.hub DINOv2 state_dicts (``pytorch_model_<s|b|l|g>.bin``)
trained at 224 px (16 x 16 patches + the class token). timm's DINOv2 architectures take them through
timm's own checkpoint filter (mask token dropped; ViT-G's SwiGLU ``w12``/``w3`` renamed ``fc1``/``fc2``);
the image feature is the normalised class token, as DINOv2's own forward returns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models import hub, timm_models
from models.capabilities import IMAGENET_MEAN, IMAGENET_STD
from models.registry import Builder, Request
from models.spec import ModelSpec
from models.timm_models import Recipe
from models.weights import find_file, load_checked, read_state_dict

REPO = "MarrLab/DinoBloom"
INPUT_SIZE = 224  # the size DinoBloom was trained at; its checkpoints hold 257 position embeddings
OTHER_FILES = ("model.safetensors", "pytorch_model.bin")  # a timm-layout copy in a --weights folder


@dataclass(frozen=True)
class Variant:
    """One DinoBloom size: timm's DINOv2 architecture, the file in the hub repository, the feature size."""

    arch: str
    file: str
    feature_dim: int
    overrides: tuple[tuple[str, object], ...] = ()  # constructor arguments of a smaller stand-in (tests)

    @property
    def recipe(self) -> Recipe:
        kwargs = {"img_size": INPUT_SIZE, "num_classes": 0, **dict(self.overrides)}
        size = kwargs["img_size"]
        return Recipe(
            self.arch, kwargs, preprocess={"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (3, size, size)},
        )


VARIANTS = {
    "s": Variant("vit_small_patch14_dinov2", "pytorch_model_s.bin", 384),
    "b": Variant("vit_base_patch14_dinov2", "pytorch_model_b.bin", 768),
    "l": Variant("vit_large_patch14_dinov2", "pytorch_model_l.bin", 1024),
    "g": Variant("vit_giant_patch14_dinov2", "pytorch_model_g.bin", 1536),
}


def builder(size: str) -> Builder:
    """The registry builder of DinoBloom-<size>."""
    variant = VARIANTS[size]
    return lambda req: build(req, variant)


def build(req: Request, variant: Variant) -> ModelSpec:
    """DinoBloom with the weights `req` asks for: the hub file, a local file or folder, or random."""
    kind, path = req.weights.kind, req.weights.path
    if kind in ("random", "builtin"):
        return timm_models.build(req, variant.recipe)  # random init; "builtin" is refused there
    if kind == "default":
        path, label = hub.fetch(REPO, [variant.file], req.key)[0], f"hf-hub:{REPO}/{variant.file}"
    else:
        path = find_file(path, (variant.file, *OTHER_FILES), req.key) if kind == "folder" else path
        label = str(path)
    return timm_models.spec_of(req, load(req, variant, path), label, variant.arch)


def load(req: Request, variant: Variant, path: Path) -> nn.Module:
    """The architecture with a DINOv2 (torch.hub) or timm-layout checkpoint file loaded, every tensor checked."""
    model = timm_models.create(req, variant.recipe)
    fit(model, read_state_dict(path, req.key), req.key, str(path))
    return model


def fit(model: nn.Module, state: dict[str, torch.Tensor], key: str, source: str) -> None:
    """Load a DINOv2 (torch.hub) or timm-layout state_dict into timm's DINOv2; ModelError on any misfit."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    # timm's filter also resamples position embeddings saved at another size (e.g. DINOv2's own 518 px).
    load_checked(model, checkpoint_filter_fn(dict(state), model), key, source)
