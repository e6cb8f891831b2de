"""MLCC, BCFC and SIPaKMeD: the paper's folder-layout datasets.

Layout: ``<root>/<NAME>/images/{train,val,test}/<class>_<n>.<ext>``.

``python -m datasets prepare mlcc|bcfc|sipakmed --src RAW --dst ROOT`` builds it from a class-per-folder
tree as distributed on Kaggle (folder names are matched to the paper's class names whatever their case,
with or without an ``im_`` prefix; MLCC's long names such as "High squamous intra-epithelial lesion" are
known; for SIPaKMeD only the single-cell crops under ``.../CROPPED/`` are used). Every class is split,
stratified and seeded, into train/val/test with the default ratios 70/10/20 percent (``--ratios``).
The downloads say nothing of patients or slides, so the split cannot keep them together.
"""

from __future__ import annotations

from pathlib import Path

from datasets.base import Listing, PrepareRequest, ReadRequest
from datasets.prepare import (
    Planned,
    build_it,
    class_resolver,
    plan_stratified,
    prepare_folder_layout,
    scan_class_folders,
    warn_stray,
)
from datasets.readers import FolderLayout
from datasets.registry import CELL_PROMPT, CELLS_PROMPT, DatasetInfo, register

PAPER_LAYOUTS = {
    "mlcc": FolderLayout("MLCC", ".jpg", ("HSIL", "LSIL", "NL", "SCC")),
    "bcfc": FolderLayout("BCFC", ".png", ("malignant", "benign")),
    "sipakmed": FolderLayout(
        "sipakmed",
        ".bmp",
        ("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate"),
    ),
}
DESCRIPTIONS = {
    "mlcc": "MLCC liquid-based cervical cytology, 4 classes (HSIL, LSIL, NL, SCC)",
    "bcfc": "BCFC body-cavity fluid cytology, 2 classes (malignant, benign)",
    "sipakmed": "SIPaKMeD single cervical cells, 5 classes",
}
PROMPTS = {"mlcc": CELLS_PROMPT, "bcfc": CELLS_PROMPT, "sipakmed": CELL_PROMPT}

# Raw folder names seen in the public downloads, compared after _normalise(), per paper class.
ALIASES = {
    "mlcc": {
        "HSIL": (
            "high squamous intra-epithelial lesion",
            "high-grade squamous intraepithelial lesion",
            "high grade squamous intraepithelial lesion",
        ),
        "LSIL": (
            "low squamous intra-epithelial lesion",
            "low-grade squamous intraepithelial lesion",
            "low grade squamous intraepithelial lesion",
        ),
        "NL": (
            "NILM",
            "normal",
            "negative for intraepithelial malignancy",
            "negative for intraepithelial lesion or malignancy",
        ),
        "SCC": ("squamous cell carcinoma",),
    },
    "bcfc": {"malignant": (), "benign": ()},
    "sipakmed": {name: () for name in PAPER_LAYOUTS["sipakmed"].classes},
}
CROPPED = "cropped"  # SIPaKMeD keeps single-cell crops in .../CROPPED/; the rest are whole slides


def read_paper(root: Path, request: ReadRequest) -> Listing:
    """MLCC, BCFC or SIPaKMeD, by the request's dataset name."""
    return read_paper_layout(root, request.dataset)


def read_paper_layout(root: Path, dataset: str) -> Listing:
    """Read MLCC, BCFC or SIPaKMeD in the paper's ``<root>/<NAME>/images/<split>/`` layout."""
    return PAPER_LAYOUTS[dataset].read(root, dataset)


def _only_cropped(files: list[Path], folder: Path) -> list[Path]:
    """SIPaKMeD: keep the cell crops when the class folder has a CROPPED sub-folder."""
    cropped = [f for f in files if CROPPED in (p.lower() for p in f.relative_to(folder).parts[:-1])]
    return cropped or files


def scan_paper_raw(src: Path, dataset: str) -> tuple[dict[str, list[Path]], int]:
    """Images per paper class under ``src`` and the number of images outside any class folder (SIPaKMeD: only
    its single-cell crops)."""
    keep = _only_cropped if dataset == "sipakmed" else None
    return scan_class_folders(src, class_resolver(ALIASES[dataset]), PAPER_LAYOUTS[dataset].classes, dataset, keep)


def paper_preparer(dataset: str):
    """The ``prepare`` function of a paper dataset (mlcc, bcfc, sipakmed)."""

    def plan(src: Path, ratios, seed: int) -> list[Planned]:
        by_class, stray = scan_paper_raw(src, dataset)
        warn_stray(stray, src, "outside the class folders")
        return plan_stratified(by_class, ratios, seed)

    def run(request: PrepareRequest) -> dict:
        """A class-per-folder download, split per class (seeded, --ratios)."""
        return prepare_folder_layout(dataset, PAPER_LAYOUTS[dataset], request, plan)

    return run


for _name, _layout in PAPER_LAYOUTS.items():
    register(DatasetInfo(
        name=_name,
        description=DESCRIPTIONS[_name],
        reader=read_paper,
        layout=_layout.text(),
        prompt_template=PROMPTS[_name],
        prepare=paper_preparer(_name),
        how_to_prepare=build_it(_name),
    ))
