"""Where each dataset lives on disk and which classes it has (the paper's layouts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets.registry import dataset_names, get_dataset

SPLITS = ("train", "val", "test")
# Listing keeps files with these suffixes (case-insensitive) and ignores everything else.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
HICERVIX_LEVELS = ("level_1", "level_2", "level_3", "class_name")
DEFAULT_HICERVIX_LEVEL = "level_3"


@dataclass(frozen=True)
class PaperLayout:
    """A dataset stored as ``<root>/<folder>/images/<split>/<class>_<n>.<ext>``."""

    folder: str
    ext: str
    classes: tuple[str, ...]  # in the paper's label order

    def images_dir(self, root: Path) -> Path:
        """The folder that holds the three split folders."""
        return root / self.folder / "images"


PAPER_LAYOUTS = {
    "mlcc": PaperLayout("MLCC", ".jpg", ("HSIL", "LSIL", "NL", "SCC")),
    "bcfc": PaperLayout("BCFC", ".png", ("malignant", "benign")),
    "sipakmed": PaperLayout(
        "sipakmed",
        ".bmp",
        ("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate"),
    ),
}


def is_image_name(name: str) -> bool:
    """True for a visible file name with an image suffix."""
    if name.startswith("."):
        return False
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def paper_layout_text(lay: PaperLayout) -> str:
    """The layout phrase of a paper dataset."""
    return f"<root>/{lay.folder}/images/{{train,val,test}}/<class>_<n>{lay.ext}"


def expected_layout(dataset: str) -> str:
    """One phrase describing the on-disk layout a dataset needs (from the registry)."""
    return get_dataset(dataset).layout


def how_to_prepare(dataset: str) -> str:
    """What to do to build a dataset's layout (from the registry)."""
    return get_dataset(dataset).how_to_prepare


def __getattr__(name: str):
    # the old home of DATASET_NAMES; the registry now holds the names
    if name == "DATASET_NAMES":
        return dataset_names()
    raise AttributeError(f"module 'datasets.layouts' has no attribute '{name}'")
