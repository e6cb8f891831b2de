"""Facts about file names and folders shared by every dataset kind (no dataset's own layout lives here)."""

from __future__ import annotations

SPLITS = ("train", "val", "test")
# Listing keeps files with these suffixes (case-insensitive) and ignores everything else.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
# Written by `prepare` beside the images: each written file, its source in the download, its label and group.
SOURCES_FILE = "sources.csv"
CLASS_FOLDERS = "<root>/{train,val,test}/<class>_<n>.<ext>"


def is_image_name(name: str) -> bool:
    """True for a visible file name with an image suffix."""
    if name.startswith("."):
        return False
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS
