"""timm models: UNI, the tiny test ViT, and any timm architecture as "timm:<architecture>"."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models import hub
from models.capabilities import USER_WEIGHTS, Capabilities
from models.errors import ModelError, one_line
from models.registry import Request
from models.spec import ModelSpec
from models.weights import STATE_DICT_SUFFIXES, find_file, load_checked, read_state_dict, seeded

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNI_REPO = "MahmoodLab/UNI"
UNI_HINT = (
    "UNI is gated: accept its licence on https://huggingface.co/MahmoodLab/UNI, then log in with "
    "`huggingface-cli login`"
)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth")


def encode_image(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features of a timm model built with num_classes=0."""
    return model(x)


@dataclass(frozen=True)
class Recipe:
    """A timm architecture with its constructor arguments and the preprocessing of its weights."""

    arch: str
    kwargs: dict = field(default_factory=lambda: {"num_classes": 0})
    preprocess: dict | None = None  # pretrained_cfg overlay: mean, std, input_size
    repo: str | None = None  # hub repository holding config.json and the weights
    builtin: bool = False  # default weights = the fixed-seed initialisation
    hint: str = ""


UNI = Recipe(
    "vit_large_patch16_224",
    {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0},
    preprocess={"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (3, 224, 224)},
    repo=UNI_REPO, hint=UNI_HINT,
)
TINY_VIT = Recipe("test_vit", {"img_size": 64, "num_classes": 0}, preprocess={"input_size": (3, 64, 64)}, builtin=True)


def build_uni(req: Request) -> ModelSpec:
    """UNI (ViT-L/16 pathology foundation model) from its gated hub repository."""
    return build(req, UNI)


def build_tiny_vit(req: Request) -> ModelSpec:
    """timm's test_vit at 64 px with fixed-seed weights, for tests and the demo."""
    return build(req, TINY_VIT)


def build_any(req: Request) -> ModelSpec:
    """"timm:<architecture>": any timm architecture, with --weights FILE/FOLDER or random."""
    arch = req.name
    _check_arch(arch)
    if req.weights.kind in ("default", "builtin"):
        raise ModelError(
            f"model '{req.key}' needs weights: pass --weights FILE (a state_dict "
            f"{'/'.join(STATE_DICT_SUFFIXES)} or a folder holding one) or --weights random"
        )
    return build(req, Recipe(arch))


def describe_any(arch: str) -> Capabilities:
    """The facts of "timm:<arch>", from the architecture built on the meta device (no memory, no initialisation)."""
    import timm

    _check_arch(arch)
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    cfg = timm.data.resolve_model_data_config(model)
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return Capabilities(
        f"timm:{arch}", int(dim), int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]), USER_WEIGHTS,
        attention_layout(model),
    )


def attention_layout(model: nn.Module) -> str:
    """The layout LoRA meets in a timm model: a fused qkv Linear, nn.MultiheadAttention, else 1x1 convolutions."""
    modules = list(model.modules())
    if any(isinstance(getattr(m, "qkv", None), nn.Linear) for m in modules):
        return "fused_qkv"
    if any(isinstance(m, nn.MultiheadAttention) for m in modules):
        return "mha"
    return "pointwise_conv"


def build(req: Request, recipe: Recipe) -> ModelSpec:
    """Build `recipe` with the weights `req` asks for."""
    kind, path = req.weights.kind, req.weights.path
    if kind == "folder":
        return from_folder(req, recipe, path, str(path))
    if kind == "file":
        return from_file(req, recipe, path)
    if kind == "random" or recipe.builtin:
        return spec_of(req, create(req, recipe), kind if kind == "random" else "builtin", recipe.arch)
    if kind == "builtin" or recipe.repo is None:
        raise ModelError(
            f"model '{req.key}' has no built-in weights; omit --weights to download them, "
            "or pass --weights PATH or --weights random"
        )
    files = hub.fetch(recipe.repo, ["config.json", WEIGHT_FILES[:2]], req.key, recipe.hint)
    return from_folder(req, recipe, files[0].parent, f"hf-hub:{recipe.repo}")


def create(req: Request, recipe: Recipe) -> nn.Module:
    """The randomly initialised architecture, under the request's fixed seed."""
    import timm

    overlay = dict(recipe.preprocess or {})
    with seeded(req.weights.seed):
        return timm.create_model(recipe.arch, pretrained=False, pretrained_cfg_overlay=overlay, **recipe.kwargs)


def from_file(req: Request, recipe: Recipe, path: Path) -> ModelSpec:
    """The architecture with a state_dict file loaded into it (an unused classifier may be left out)."""
    model = create(req, recipe)
    load_checked(model, read_state_dict(path, req.key), req.key, str(path), ignore=classifier_prefixes(model))
    return spec_of(req, model, str(path), recipe.arch)


def from_folder(req: Request, recipe: Recipe, folder: Path, label: str) -> ModelSpec:
    """A timm hub-layout folder (config.json + weights) through timm's own loader, else its weights file."""
    import timm

    config = folder / "config.json"
    if not config.is_file():
        return from_file(req, recipe, find_file(folder, WEIGHT_FILES, req.key))
    try:
        arch = json.loads(config.read_text()).get("architecture")
    except ValueError as error:
        raise ModelError(f"cannot read {config} for model {req.key}: {one_line(error)}") from error
    if arch and arch != recipe.arch:
        raise ModelError(
            f"{folder} holds a timm '{arch}' model, not the '{recipe.arch}' of model {req.key}; "
            f"load it with --model_name timm:{arch}"
        )
    find_file(folder, WEIGHT_FILES, req.key)
    try:
        with seeded(req.weights.seed):
            model = timm.create_model(f"local-dir:{folder}", pretrained=True, **recipe.kwargs)
    except Exception as error:  # a foreign or damaged checkpoint fails in many ways; all are the user's to fix
        raise ModelError(
            f"cannot load model {req.key} from {label}: {one_line(error)}; "
            "pass weights of this architecture"
        ) from error
    return spec_of(req, model, label, arch or recipe.arch)


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the classifier that a num_classes=0 model has dropped."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))


def spec_of(req: Request, model: nn.Module, label: str, arch: str) -> ModelSpec:
    """A ModelSpec with the preprocessing timm resolves for this model."""
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    height, width = cfg["input_size"][-2:]
    if height != width:
        raise ModelError(f"model {req.key} expects non-square {height}x{width} images; pick a square-input model")
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return ModelSpec(
        key=req.key, weights=label, model=model, feature_dim=int(dim), input_size=int(height),
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), image_fn=encode_image, architecture=f"timm:{arch}",
    )


def _check_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        suggestion = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(
            f"unknown timm architecture '{arch}'{suggestion}; see timm.list_models() for the valid names"
        )
