"""What a loaded model offers the rest of the toolkit: the module, its preprocessing and its encoders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from models import transforms as tf
from models.errors import ModelError

ImageFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
TextFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class ModelSpec:
    """A loaded model with its preprocessing, feature size and (where present) text encoder.

    ``model`` is the whole module as its library builds it (open_clip CLIP, timm model, Hugging Face
    ViTModel), so LoRA can find the towers inside it. The encoders look ``model`` up at call time, so
    they keep working after adapters are injected into it.
    """

    key: str
    weights: str
    model: nn.Module
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_fn: ImageFn = field(repr=False)
    text_fn: TextFn | None = field(default=None, repr=False)
    tokenizer: Callable[[list[str]], torch.Tensor] | None = field(default=None, repr=False)
    backbone: str | None = None
    architecture: str = ""
    eval_transform: Callable = field(init=False, repr=False)
    train_transform: Callable = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.mean = _triple(self.mean)
        self.std = _triple(self.std)
        self.eval_transform = tf.eval_transform(self.input_size, self.mean, self.std)
        self.train_transform = tf.train_transform(self.input_size, self.mean, self.std)

    @property
    def has_text(self) -> bool:
        """True when the model has a text tower and a tokenizer."""
        return self.text_fn is not None and self.tokenizer is not None

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learned logit scale exp(t), clamped at 100 as in CLIP; 100 for a model that has none."""
        scale = getattr(self.model, "logit_scale", None)
        if isinstance(scale, torch.Tensor):
            return scale.detach().float().exp().clamp(max=100.0).cpu()
        return torch.tensor(100.0)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> image features (B, feature_dim), not L2-normalised."""
        return self.image_fn(self.model, x)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Texts -> text features (N, D_text), not L2-normalised; ModelError without a text tower."""
        if not self.has_text:
            raise ModelError(
                f"model '{self.key}' has no text tower; text features (--textual True) need a CLIP-style "
                "model (the column 'text' of `python -m models list` shows which)"
            )
        tokens = self.tokenizer(list(texts)).to(_device_of(self.model))
        return self.text_fn(self.model, tokens)


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    """Normalisation statistics as a 3-tuple of floats (a single value applies to every channel)."""
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"expected 3 channel statistics, got {values}")
    return (values[0], values[1], values[2])


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe(spec: ModelSpec) -> dict:
    """The facts about a loaded model that a results file records."""
    return {
        "key": spec.key,
        "backbone": spec.backbone,
        "architecture": spec.architecture,
        "weights": spec.weights,
        "feature_dim": spec.feature_dim,
        "input_size": spec.input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "has_text": spec.has_text,
    }
