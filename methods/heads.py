"""Building blocks shared by the methods: classifiers on images, heads on frozen features."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from tasks.text import class_text_embeddings  # noqa: F401  (methods import it from here)


class ImageClassifier(nn.Module):
    """Backbone image features followed by a head (images -> logits)."""

    def __init__(self, spec, head: nn.Module):
        super().__init__()
        self.backbone = spec.model
        self.head = head
        self._encode = spec.encode_image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._encode(x))


def linear_head(ctx) -> nn.Linear:
    """A fresh linear head from the model's feature size to the split's classes (seeded by the run)."""
    torch.manual_seed(ctx.config.seed)
    return nn.Linear(ctx.spec.feature_dim, len(ctx.split.classes))


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature of each class (C, D); a class without train images gets zeros."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).to(features.dtype)
    return sums / counts[:, None]


class CosineHead(nn.Module):
    """logits = exp(log_scale) * cos(x, w_c); prototypes w and the temperature are learnable."""

    def __init__(self, prototypes: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(prototypes.clone())
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).t()
        return self.log_scale.exp() * cos


class FixedLogits(nn.Module):
    """A non-trainable classifier on features: logits = fn(features), buffers moved with .to()."""

    def __init__(self, fn, **buffers: torch.Tensor):
        super().__init__()
        self._fn = fn
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(self, x)


# -- export: how a method's head is described in model.json and rebuilt from it ------------------------
@dataclass(frozen=True)
class HeadCodec:
    """How ``python -m utils.export`` writes a method's head and rebuilds it (before its tensors are loaded).

    describe(head) -> JSON facts; rebuild(facts, state) -> the head, where `state` holds the head's saved
    tensors (names relative to the head). A method declares its codec on its registry entry; the default is
    a plain linear head.
    """

    kind: str
    describe: Callable[[nn.Module], dict]
    rebuild: Callable[[dict, dict], nn.Module]


def describe_linear(head: nn.Module) -> dict:
    if type(head) is not nn.Linear:
        raise UserError(f"cannot export a {type(head).__name__} head as a linear one: its method does not say how "
                        "to rebuild it (give its registry entry a head codec)")
    return {"in_features": head.in_features, "out_features": head.out_features}


LINEAR_HEAD = HeadCodec("linear", describe_linear, lambda facts, state: nn.Linear(facts["in_features"],
                                                                                  facts["out_features"]))


def _describe_cosine(head: CosineHead) -> dict:
    return {"classes": head.weight.shape[0], "dim": head.weight.shape[1]}


COSINE_HEAD = HeadCodec("cosine", _describe_cosine,
                        lambda facts, state: CosineHead(torch.zeros(facts["classes"], facts["dim"]), 1.0))


def fixed_logits_codec(fn: Callable) -> HeadCodec:
    """The codec of a method whose classifier is ``FixedLogits(fn, ...)``: its buffers and plain attributes are
    saved; the function is the method's own (never named in the file)."""

    def describe(head: FixedLogits) -> dict:
        attributes = {k: v for k, v in vars(head).items()
                      if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))}
        return {"attributes": attributes}

    def rebuild(facts: dict, state: dict) -> FixedLogits:
        head = FixedLogits(fn, **{k: torch.empty_like(v) for k, v in state.items()})
        for name, value in facts.get("attributes", {}).items():
            setattr(head, name, value)
        return head

    return HeadCodec("fixed_logits", describe, rebuild)


class ImageTextModel(nn.Module):
    """Both towers of a CLIP-family model, for contrastive training on image-text pairs and for retrieval.

    ``forward(images, idx)`` gives the (B, B) logits of each image against the train captions
    ``idx`` (pair i is image i with caption idx[i]): scale x cosine, with the scale CLIP learns,
    exp(log_scale) clamped at 100 as in CLIP, starting from the model's own.
    """

    def __init__(self, spec, captions: list[str]):
        super().__init__()
        if not spec.has_text:
            raise UserError(f"image-text pairs need a model with a text tower, and {spec.key} has none: use a "
                            "CLIP-family model (clip, quilt, biomedclip, tiny_clip)")
        self.backbone = spec.model
        self._spec = spec
        self.register_buffer("tokens", spec.tokenizer(list(captions)), persistent=False)
        self.log_scale = nn.Parameter(spec.logit_scale.log().reshape(()))

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=100.0)

    def forward(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self._spec.encode_image(images), dim=-1)
        text = F.normalize(self._spec.text_fn(self.backbone, self.tokens[idx]), dim=-1)
        return self.scale * image @ text.t()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings."""
        return F.normalize(self._spec.encode_image(images).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings (float32, on the CPU), in chunks of `batch_size`."""
        self.eval()
        out = [F.normalize(self._spec.encode_text(texts[i:i + batch_size]).float(), dim=-1).cpu()
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, 0)


def contrastive_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: cross-entropy of images over texts and of texts over images, averaged.

    The pairs are on the diagonal of `logits` (`targets`, the caption indices, are not needed)."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
