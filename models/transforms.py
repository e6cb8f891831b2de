"""Eval preprocessing and the paper's train augmentation, built from a model's own size and statistics."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

# The paper's RandomResizedCrop keeps at least 70% of the image area.
TRAIN_CROP_SCALE = (0.7, 1.0)


class ToRGB:
    """Convert any PIL image (grayscale, palette, RGBA) to 3-channel RGB."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]):
    """Resize to (size, size) with bicubic interpolation, then ToTensor and Normalize."""
    from torchvision import transforms as T  # imported here: torchvision is slow to import

    return T.Compose([
        ToRGB(),
        T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ])


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]):
    """RandomResizedCrop(size, scale=(0.7, 1), bicubic), horizontal flip, ToTensor, Normalize."""
    from torchvision import transforms as T

    return T.Compose([
        ToRGB(),
        T.RandomResizedCrop(size, scale=TRAIN_CROP_SCALE, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ])
