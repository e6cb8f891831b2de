"""CLIP models published in Hugging Face transformers' format (CLIPModel: separate q/k/v projections in both
towers): PLIP (pathology) and PubMedCLIP (medical), both fine-tuned from OpenAI's ViT-B/32."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from models import hub
from models.capabilities import OPENAI_MEAN, OPENAI_STD
from models.errors import ModelError, one_line
from models.registry import Builder, Request
from models.spec import ModelSpec
from models.weights import find_file, load_checked, read_state_dict, seeded

PLIP_REPO = "vinid/plip"
PUBMEDCLIP_REPO = "flaviagiammarino/pubmed-clip-vit-base-patch32"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PROCESSOR_FILE = "preprocessor_config.json"
# Older checkpoints store the position-id buffers that transformers now rebuilds itself.
IGNORED_PREFIXES = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# Both models keep OpenAI CLIP's byte-pair vocabulary, which open_clip ships: the tokenizer needs no download.
CLIP_VOCAB_SIZE = 49408
TOKENIZER_ARCH = "ViT-B-32"


def encode_image(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Projected image embedding (the pooled class token through visual_projection), not L2-normalised."""
    return model.visual_projection(model.vision_model(pixel_values=x).pooler_output)


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Projected text embedding at the end-of-text token, not L2-normalised.

    No padding mask is needed: the causal mask keeps the padding after the end-of-text token out of it.
    """
    return model.text_projection(model.text_model(input_ids=tokens).pooler_output)


def builder(repo: str) -> Builder:
    """The registry builder of the CLIPModel published at hf-hub:`repo`."""
    return lambda req: build(req, repo)


def build(req: Request, repo: str) -> ModelSpec:
    """The model with the weights `req` asks for: the hub repository, a local file or folder, or random."""
    kind, path = req.weights.kind, req.weights.path
    if kind == "builtin":
        raise ModelError(
            f"model '{req.key}' has no built-in weights; omit --weights to download them, "
            "or pass --weights PATH or --weights random"
        )
    if kind in ("random", "file"):
        model = _create(req)
        if kind == "file":
            load_checked(model, read_state_dict(path, req.key), req.key, str(path), ignore=IGNORED_PREFIXES)
        return _spec(req, model, None, "random" if kind == "random" else str(path))
    if kind == "default":
        files = hub.fetch(repo, ["config.json", PROCESSOR_FILE, WEIGHT_FILES], req.key)
        return _from_folder(req, files[0].parent, f"hf-hub:{repo}")
    return _from_folder(req, path, str(path))


def _create(req: Request) -> nn.Module:
    """OpenAI CLIP ViT-B/32's architecture (transformers' CLIPConfig defaults), under the request's seed."""
    from transformers import CLIPConfig, CLIPModel

    with seeded(req.weights.seed):
        return CLIPModel(CLIPConfig())


def _from_folder(req: Request, folder: Path, label: str) -> ModelSpec:
    """A save_pretrained / hub folder: config.json, the weights and (optionally) the image processor config."""
    from transformers import CLIPModel

    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} is not a Hugging Face model folder (no config.json) for model {req.key}; pass the "
            "folder written by save_pretrained / the hub download, or a state_dict file"
        )
    find_file(folder, WEIGHT_FILES, req.key)
    try:
        with seeded(req.weights.seed):
            model, info = CLIPModel.from_pretrained(str(folder), output_loading_info=True, local_files_only=True)
    except Exception as error:  # a foreign or damaged checkpoint fails in many ways; all are the user's to fix
        raise ModelError(f"cannot load model {req.key} from {label}: {one_line(error)}") from error
    if info.get("missing_keys") or info.get("mismatched_keys"):
        missing = list(info.get("missing_keys") or info.get("mismatched_keys"))
        raise ModelError(
            f"weights in {folder} do not fit model {req.key}: {len(missing)} tensors missing or of another "
            f"shape (e.g. {missing[0]}); pass a CLIPModel checkpoint"
        )
    processor = folder / PROCESSOR_FILE
    return _spec(req, model, json.loads(processor.read_text()) if processor.is_file() else None, label)


def _crop(processor: dict) -> int:
    """The square side a CLIP image processor config ends at (its crop size, else its size)."""
    size = processor.get("crop_size") or processor.get("size")
    if isinstance(size, dict):
        sides = {v for k, v in size.items() if k in ("height", "width", "shortest_edge")}
        size = sides.pop() if len(sides) == 1 else None
    return int(size) if size else 0


def _spec(req: Request, model: nn.Module, processor: dict | None, label: str) -> ModelSpec:
    import open_clip

    image_size = int(model.config.vision_config.image_size)
    mean, std = OPENAI_MEAN, OPENAI_STD
    if processor is not None:
        if _crop(processor) != image_size:
            raise ModelError(
                f"model {req.key}: {PROCESSOR_FILE} crops to {_crop(processor)} px but the model takes "
                f"{image_size} px; fix {PROCESSOR_FILE}"
            )
        mean, std = tuple(processor.get("image_mean", mean)), tuple(processor.get("image_std", std))
    if model.config.text_config.vocab_size != CLIP_VOCAB_SIZE:
        raise ModelError(
            f"model {req.key}: its text tower has {model.config.text_config.vocab_size} tokens, not OpenAI CLIP's "
            f"{CLIP_VOCAB_SIZE}; pass a CLIP checkpoint with OpenAI's vocabulary"
        )
    context = model.config.text_config.max_position_embeddings
    return ModelSpec(
        key=req.key, weights=label, model=model, feature_dim=int(model.config.projection_dim), input_size=image_size,
        mean=mean, std=std, image_fn=encode_image, text_fn=encode_text,
        tokenizer=open_clip.get_tokenizer(TOKENIZER_ARCH, context_length=context),
        architecture="transformers:CLIPModel",
    )
