"""Decode one image file into an RGB PIL image."""

from __future__ import annotations

import os

from datasets.errors import DatasetError


def load_image(path: str | os.PathLike):
    """The image at ``path`` as an RGB ``PIL.Image.Image``; DatasetError naming the file otherwise."""
    from PIL import Image  # imported here so that listing a dataset never loads PIL

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise DatasetError(f"image {path} not found; restore it or rebuild the dataset") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(
            f"cannot decode image {path} ({type(err).__name__}); replace or remove the file"
        ) from err
