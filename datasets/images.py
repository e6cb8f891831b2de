"""Decode one image file into an RGB PIL image with 8 bits per channel."""

from __future__ import annotations

import os

from datasets.errors import DatasetError

# 16-bit greyscale modes; "I" (32-bit integer) and "F" (32-bit float) are scaled by the range their values use
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
FULL_SCALES = (1.0, 255.0, 65535.0, 2.0**32 - 1)  # float in [0, 1], 8, 16 and 32 bits


def load_image(path: str | os.PathLike):
    """The image at ``path`` as an RGB ``PIL.Image.Image``; DatasetError naming the file otherwise.

    High-bit-depth greyscale (16-bit PNG or TIFF, 32-bit integer or float) is scaled to 8 bits, not clipped.
    """
    from PIL import Image  # imported here so that listing a dataset never loads PIL

    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except FileNotFoundError as err:
        raise DatasetError(f"image {path} not found; restore it or rebuild the dataset") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(
            f"cannot decode image {path} ({type(err).__name__}); replace or remove the file"
        ) from err


def to_rgb(img):
    """``img`` as 8-bit RGB: PIL's conversion, except for high-bit-depth greyscale, which PIL clips at 255."""
    if img.mode not in SIXTEEN_BIT_MODES and img.mode not in ("I", "F"):
        return img.convert("RGB")
    import numpy as np  # only high-bit-depth images need it; `import datasets` stays free of numpy
    from PIL import Image  # as in load_image

    values = np.asarray(img, dtype=np.float64)
    grey = np.floor(np.clip(values, 0, None) / full_scale(img.mode, values) * 255 + 0.5)
    return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")


def full_scale(mode: str, values) -> float:
    """The value that means white: 65535 for 16-bit modes; for "I" and "F" the smallest of 1 (float only), 255,
    65535 and 2**32 - 1 that holds the image's largest value (8-bit data stored wide stays as it is)."""
    if mode in SIXTEEN_BIT_MODES:
        return 65535.0
    top = float(values.max()) if values.size else 0.0
    scales = FULL_SCALES if mode == "F" else FULL_SCALES[1:]
    return next((s for s in scales if top <= s), top)
