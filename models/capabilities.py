"""What a registered model offers, as data: readable without building (or downloading) the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The attention layouts LoRA finds in a tower (lora.inject recognises each one), and what they are.
AttentionLayout = Literal["mha", "fused_qkv", "separate_qkv", "pointwise_conv"]
ATTENTION_LAYOUTS: dict[str, str] = {
    "mha": "nn.MultiheadAttention, fused in-proj (open_clip)",
    "fused_qkv": "fused qkv Linear + proj (timm)",
    "separate_qkv": "separate q/k/v Linears (Hugging Face)",
    "pointwise_conv": "convolutional: 1x1 convolutions, no attention (--params pw)",
}

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# Where the default weights come from, besides "hf-hub:<repository>" and "pip:<package>".
BUILTIN_WEIGHTS = "builtin"  # fixed-seed initialisation of a tiny test model
USER_WEIGHTS = "--weights PATH"  # no default: the user passes a file or folder (or random)


@dataclass(frozen=True)
class Capabilities:
    """The facts of one model (one backbone of a key): what its default weights give once built.

    attention / text_attention: the layout LoRA sees in the image / text tower (ATTENTION_LAYOUTS);
    text_attention is None for a model without a text tower.
    """

    architecture: str  # library:name, e.g. "open_clip:ViT-B-16", "timm:vit_small_patch14_dinov2"
    feature_dim: int  # size of what encode_image returns
    input_size: int  # square input side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str  # "hf-hub:<repository>[/<file>]", "pip:<package>", BUILTIN_WEIGHTS or USER_WEIGHTS
    attention: AttentionLayout
    text_attention: AttentionLayout | None = None
    gated: bool = False  # the hub repository needs an accepted licence and a login

    def __post_init__(self) -> None:
        for layout in (self.attention, self.text_attention):
            if layout is not None and layout not in ATTENTION_LAYOUTS:
                raise ValueError(f"unknown attention layout '{layout}'; known: {', '.join(ATTENTION_LAYOUTS)}")

    @property
    def has_text(self) -> bool:
        """True when the model has a text tower (and a tokenizer)."""
        return self.text_attention is not None

    def to_dict(self) -> dict:
        """The facts as a plain dict (JSON-ready), has_text included."""
        return {
            "architecture": self.architecture, "feature_dim": self.feature_dim, "input_size": self.input_size,
            "mean": list(self.mean), "std": list(self.std), "has_text": self.has_text, "weights": self.weights,
            "gated": self.gated, "attention": self.attention, "text_attention": self.text_attention,
        }
