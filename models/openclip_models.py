"""open_clip models: OpenAI CLIP, QuiltNet B/32 and B/16, BiomedCLIP and the tiny test CLIP."""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models import hub
from models.errors import ModelError, one_line
from models.registry import Request
from models.spec import ModelSpec
from models.weights import seeded

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_ARCH = "cytolora_tiny_clip"
BIOMEDCLIP_ARCH = "cytolora_biomedclip"
CLIP_BACKBONES = {"ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-B/32": "ViT-B-32"}
QUILT_REPO = "wisdomik/QuiltNet-B-32"
QUILT_ARCH = "ViT-B-32"  # QuiltNet-B-32 is a fine-tuned ViT-B/32 CLIP
QUILT_B16_REPO = "wisdomik/QuiltNet-B-16"
QUILT_B16_ARCH = "ViT-B-16"  # and QuiltNet-B-16 a fine-tuned ViT-B/16
BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
CONFIG_FILE = "open_clip_config.json"
# Checkpoint names of an open_clip hub repository or folder, in open_clip's order of preference.
CHECKPOINT_FILES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def encode_image(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image embedding, not L2-normalised."""
    return model.encode_image(x)


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Projected CLIP text embedding, not L2-normalised."""
    return model.encode_text(tokens)


@dataclass(frozen=True)
class Recipe:
    """How one key builds: the architecture for random init and bare files, and where its weights live."""

    arch: str
    repo: str | None = None  # hub repository with open_clip_config.json and a checkpoint
    openai: bool = False  # weights = open_clip's "openai" tag for `arch` (OpenAI CLIP, QuickGELU)
    builtin: bool = False  # the default weights are the fixed-seed initialisation (tiny test models)
    hint: str = ""


def build_clip(req: Request) -> ModelSpec:
    """OpenAI CLIP through open_clip (QuickGELU, as OpenAI trained it)."""
    return _build(req, Recipe(arch=CLIP_BACKBONES[req.backbone], openai=True))


def build_quilt(req: Request) -> ModelSpec:
    """QuiltNet-B-32 (histopathology CLIP) from the hub."""
    return _build(req, Recipe(arch=QUILT_ARCH, repo=QUILT_REPO))


def build_quilt_b16(req: Request) -> ModelSpec:
    """QuiltNet-B-16 (histopathology CLIP) from the hub."""
    return _build(req, Recipe(arch=QUILT_B16_ARCH, repo=QUILT_B16_REPO))


def build_biomedclip(req: Request) -> ModelSpec:
    """BiomedCLIP: timm ViT-B/16 image tower (fused qkv) and PubMedBERT text tower."""
    return _build(req, Recipe(arch=BIOMEDCLIP_ARCH, repo=BIOMEDCLIP_REPO))


def build_tiny_clip(req: Request) -> ModelSpec:
    """A tiny CLIP (64 px, 2+2 layers) with fixed-seed weights, for tests and the demo."""
    return _build(req, Recipe(arch=TINY_ARCH, builtin=True))


def _build(req: Request, recipe: Recipe) -> ModelSpec:
    _register_configs()
    kind, path = req.weights.kind, req.weights.path
    if kind == "folder":
        return _from_folder(req, path, str(path))
    if kind == "file":
        return _from_arch(req, recipe.arch, str(path), checkpoint=path, quick_gelu=recipe.openai)
    if kind == "random":
        return _from_arch(req, recipe.arch, "random", quick_gelu=recipe.openai)
    if recipe.builtin:
        return _from_arch(req, recipe.arch, "builtin")
    if kind == "builtin":
        raise ModelError(
            f"model '{req.key}' has no built-in weights; omit --weights to download them, "
            "or pass --weights PATH or --weights random"
        )
    if recipe.openai:
        repo, checkpoint = _fetch_openai(req, recipe.arch)
        return _from_arch(req, recipe.arch, f"hf-hub:{repo}", checkpoint=checkpoint, quick_gelu=True)
    files = hub.fetch(recipe.repo, [CONFIG_FILE, CHECKPOINT_FILES[:3]], req.key, recipe.hint)
    return _from_folder(req, files[0].parent, f"hf-hub:{recipe.repo}")


def _register_configs() -> None:
    """Make the architectures in models/configs/ known to open_clip (once)."""
    import open_clip

    if TINY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def _fetch_openai(req: Request, arch: str) -> tuple[str, Path]:
    """Download the OpenAI weights of `arch` from the hub repository open_clip names for them."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, "openai")
    # open_clip's convention: "org/repo/" means the default checkpoint name, "org/repo/file" that file.
    repo, name = posixpath.split(cfg["hf_hub"])
    files = (name,) if name else CHECKPOINT_FILES[:3]
    return repo, hub.fetch(repo, [files], req.key)[0]


def _from_arch(
    req: Request, arch: str, label: str, checkpoint: Path | None = None, quick_gelu: bool = False,
) -> ModelSpec:
    """A named open_clip architecture, randomly initialised or loaded from a checkpoint file."""
    import open_clip

    text_cfg = open_clip.get_model_config(arch)["text_cfg"]
    _check_text_tower(req, text_cfg)
    model = _create(
        req, arch, label, req.weights.seed, pretrained=str(checkpoint) if checkpoint else None,
        force_quick_gelu=quick_gelu, pretrained_text=False, quiet=checkpoint is None,
    )
    tokenizer = _guard_tokenizer(req, text_cfg, lambda: open_clip.get_tokenizer(arch))
    return _spec(req, model, label, open_clip.get_model_config(arch)["embed_dim"], tokenizer, arch)


def _from_folder(req: Request, folder: Path, label: str) -> ModelSpec:
    """An open_clip hub-layout folder: open_clip_config.json plus a checkpoint."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelError(
            f"{folder} is not an open_clip folder (no {CONFIG_FILE}) for model {req.key}; pass the "
            "downloaded hub folder, or the checkpoint file itself"
        )
    if not any((folder / name).is_file() for name in CHECKPOINT_FILES):
        expected = ", ".join(CHECKPOINT_FILES)
        raise ModelError(f"no checkpoint in {folder} for model {req.key}: expected one of {expected}")
    try:
        model_cfg = json.loads(config_path.read_text()).get("model_cfg", {})
    except (ValueError, AttributeError) as error:
        raise ModelError(f"cannot read {config_path} for model {req.key}: {one_line(error)}") from error
    text_cfg = model_cfg.get("text_cfg", {})
    _check_text_tower(req, text_cfg)
    model = _create(req, f"local-dir:{folder}", label, req.weights.seed)
    tokenizer = _guard_tokenizer(req, text_cfg, lambda: _folder_tokenizer(folder, text_cfg))
    return _spec(req, model, label, model_cfg["embed_dim"], tokenizer, label)


def _folder_tokenizer(folder: Path, text_cfg: dict):
    """The folder's tokenizer; a Hugging Face one comes from its hub id when the folder lacks its files."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    name = text_cfg.get("hf_tokenizer_name")
    if not name or any((folder / f).is_file() for f in TOKENIZER_FILES):
        return open_clip.get_tokenizer(f"local-dir:{folder}")
    return HFTokenizer(
        name, context_length=text_cfg.get("context_length", 77), tokenizer_mode=text_cfg.get("tokenizer_mode"),
        **text_cfg.get("tokenizer_kwargs", {}),
    )


def _check_text_tower(req: Request, text_cfg: dict) -> None:
    """A Hugging Face text tower needs its config from the hub: fetch it first, for a clear error."""
    name = text_cfg.get("hf_model_name")
    if name and not Path(name).is_dir():
        hub.fetch(name, ["config.json"], req.key, what="the text-tower config", local_option=False)


def _guard_tokenizer(req: Request, text_cfg: dict, make):
    name = text_cfg.get("hf_tokenizer_name") or "open_clip"
    try:
        return make()
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot load the tokenizer {name} of model {req.key}: {one_line(error)}; "
            "connect to the internet once so it is cached, or put its files in the --weights folder"
        ) from error


def _create(req: Request, name: str, label: str, seed: int, quiet: bool = False, **kwargs) -> nn.Module:
    """open_clip.create_model_and_transforms under a fixed seed, its failures as ModelError."""
    import open_clip

    try:
        with seeded(seed), _silenced(quiet):
            model, _, _ = open_clip.create_model_and_transforms(name, **kwargs)
    except ModelError:
        raise
    except Exception as error:  # a foreign or damaged checkpoint fails in many ways; all are the user's to fix
        raise ModelError(
            f"cannot build model {req.key} from {label}: {one_line(error)}; "
            "pass weights of this architecture"
        ) from error
    return model


@contextlib.contextmanager
def _silenced(quiet: bool) -> Iterator[None]:
    """Hide open_clip's 'initialized randomly' warning when random weights are what was asked for."""
    if not quiet:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _spec(req: Request, model: nn.Module, label: str, embed_dim: int, tokenizer, arch: str) -> ModelSpec:
    import open_clip

    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"]
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ModelError(
                f"model {req.key} expects non-square {tuple(size)} images; only square inputs are supported"
            )
        size = size[0]
    return ModelSpec(
        key=req.key, weights=label, model=model, feature_dim=int(embed_dim), input_size=int(size),
        mean=tuple(pp["mean"]), std=tuple(pp["std"]), image_fn=encode_image, text_fn=encode_text,
        tokenizer=tokenizer, backbone=req.backbone, architecture=f"open_clip:{arch}",
    )
