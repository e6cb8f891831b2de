"""Hugging Face transformers ViTs (separate q/k/v projections): Google's ViT-B/16 and a tiny test ViT."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models import hub
from models.errors import ModelError, one_line
from models.registry import Request
from models.spec import ModelSpec
from models.weights import find_file, load_checked, read_state_dict, seeded

VIT_GOOGLE_REPO = "google/vit-base-patch16-224"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PROCESSOR_FILE = "preprocessor_config.json"
# A checkpoint of ViTForImageClassification nests the encoder under "vit." and adds a classifier.
BASE_PREFIX = "vit."
IGNORED_PREFIXES = ("classifier.", "pooler.")
TINY_CONFIG = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "image_size": 32, "patch_size": 8,
}


def encode_image(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CLS token of the last hidden state (after the final layernorm); no pooler."""
    return model(pixel_values=x).last_hidden_state[:, 0]


@dataclass(frozen=True)
class Recipe:
    """A ViT configuration (defaults = ViT-B/16 at 224 px) and where its weights live."""

    config: dict = field(default_factory=dict)
    repo: str | None = None
    builtin: bool = False


def build_vit_google(req: Request) -> ModelSpec:
    """google/vit-base-patch16-224 as a transformers ViTModel without its pooling layer."""
    return _build(req, Recipe(repo=VIT_GOOGLE_REPO))


def build_tiny_hf_vit(req: Request) -> ModelSpec:
    """A tiny transformers ViT (32 px, 2 layers) with fixed-seed weights, for tests."""
    return _build(req, Recipe(config=TINY_CONFIG, builtin=True))


def _build(req: Request, recipe: Recipe) -> ModelSpec:
    kind, path = req.weights.kind, req.weights.path
    if kind == "folder":
        return _from_folder(req, path, str(path))
    if kind == "file":
        model = _create(req, recipe)
        state = read_state_dict(path, req.key)
        if all(k.startswith(BASE_PREFIX) or k.startswith(IGNORED_PREFIXES) for k in state):
            state = {k.removeprefix(BASE_PREFIX): v for k, v in state.items()}
        load_checked(model, state, req.key, str(path), ignore=IGNORED_PREFIXES)
        return _spec(req, model, _default_processor(model), str(path))
    if kind == "random" or recipe.builtin:
        model = _create(req, recipe)
        return _spec(req, model, _default_processor(model), "random" if kind == "random" else "builtin")
    if kind == "builtin":
        raise ModelError(
            f"model '{req.key}' has no built-in weights; omit --weights to download them, "
            "or pass --weights PATH or --weights random"
        )
    files = hub.fetch(recipe.repo, ["config.json", PROCESSOR_FILE, WEIGHT_FILES], req.key)
    return _from_folder(req, files[0].parent, f"hf-hub:{recipe.repo}")


def _create(req: Request, recipe: Recipe) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    with seeded(req.weights.seed):
        return ViTModel(ViTConfig(**recipe.config), add_pooling_layer=False)


def _from_folder(req: Request, folder: Path, label: str) -> ModelSpec:
    """A save_pretrained / hub folder: config.json, weights and (optionally) the image processor config."""
    from transformers import ViTImageProcessor, ViTModel

    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} is not a Hugging Face model folder (no config.json) for model {req.key}; pass the "
            "folder written by save_pretrained / the hub download, or a state_dict file"
        )
    find_file(folder, WEIGHT_FILES, req.key)
    try:
        with seeded(req.weights.seed):
            model, info = ViTModel.from_pretrained(
                str(folder), add_pooling_layer=False, output_loading_info=True, local_files_only=True,
            )
    except Exception as error:  # a foreign or damaged checkpoint fails in many ways; all are the user's to fix
        raise ModelError(
            f"cannot load model {req.key} from {label}: {one_line(error)}"
        ) from error
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(IGNORED_PREFIXES)]
    if missing or info.get("mismatched_keys"):
        problem = f"{len(missing)} missing tensors (e.g. {missing[0]})" if missing else "tensors of another shape"
        raise ModelError(f"weights in {folder} do not fit model {req.key}: {problem}; pass a ViT checkpoint")
    if (folder / PROCESSOR_FILE).is_file():
        processor = ViTImageProcessor.from_pretrained(str(folder), local_files_only=True)
    else:
        processor = _default_processor(model)
    return _spec(req, model, processor, label)


def _default_processor(model: nn.Module):
    """ViT's standard preprocessing (mean = std = 0.5) at the model's image size."""
    from transformers import ViTImageProcessor

    size = model.config.image_size
    return ViTImageProcessor(size={"height": size, "width": size})


def _spec(req: Request, model: nn.Module, processor, label: str) -> ModelSpec:
    size = processor.size
    height = size["height"] if isinstance(size, dict) else size.height
    width = size["width"] if isinstance(size, dict) else size.width
    if height != width or height != model.config.image_size:
        raise ModelError(
            f"model {req.key}: the image processor resizes to {height}x{width} but the model takes "
            f"{model.config.image_size} px; fix {PROCESSOR_FILE}"
        )
    return ModelSpec(
        key=req.key, weights=label, model=model, feature_dim=int(model.config.hidden_size),
        input_size=int(height), mean=tuple(processor.image_mean), std=tuple(processor.image_std),
        image_fn=encode_image, architecture="transformers:ViTModel",
    )
