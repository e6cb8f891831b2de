"""BMT: Brown Multicellular ThinPrep, multicellular liquid-based (ThinPrep) Pap images.

600 images from 180 slides of 180 patients, in three diagnostic classes: HSIL, LSIL and NIL (negative for
intraepithelial lesion or malignancy); 3 classes.

``python -m datasets prepare bmt --src RAW --dst ROOT`` reads the download as class folders (``HSIL/``,
``LSIL/``, ``NIL/``; ``NILM`` is accepted), the benchmark layout (``images/`` with ``splits/*.txt``, kept) or
``train/``/``test/`` folders, and writes ``<ROOT>/BMT/images/<split>/<class>_<n>.<ext>``. The download comes
without a split; file names do not name the patient, so the seeded split cannot keep a patient's images
together (the benchmark's split files, when given, are kept as they are).
"""

from __future__ import annotations

from pathlib import Path

from datasets.base import Listing, PrepareRequest, ReadRequest
from datasets.prepare import build_it, plan_download, prepare_folder_layout
from datasets.readers import FolderLayout
from datasets.registry import DatasetInfo, register

BENCHMARK_PROMPT = "a photo of a {}."  # the cytology benchmark's one template for these datasets
ALIASES = {"HSIL": ("high-grade squamous intraepithelial lesion",),
           "LSIL": ("low-grade squamous intraepithelial lesion",),
           "NIL": ("NILM", "negative for intraepithelial lesion or malignancy")}
PROMPT_NAMES = {"HSIL": "high-grade squamous intraepithelial lesion", "LSIL": "low-grade squamous intraepithelial "
                "lesion", "NIL": "negative for intraepithelial lesion or malignancy"}
LAYOUT = FolderLayout("BMT", ".<ext>", tuple(ALIASES))


def read_bmt(root: Path, request: ReadRequest) -> Listing:
    """``<root>/BMT/images/<split>/<class>_<n>.<ext>``."""
    return LAYOUT.read(root, request.dataset)


def prepare_bmt(request: PrepareRequest) -> dict:
    """Class folders HSIL, LSIL, NIL (or the benchmark layout), split per class (seeded, --ratios)."""
    return prepare_folder_layout("bmt", LAYOUT, request,
                                 lambda src, ratios, seed: plan_download(src, ratios, seed, "bmt", ALIASES))


register(DatasetInfo(
    name="bmt",
    description="BMT multicellular ThinPrep Pap images, 3 classes (HSIL, LSIL, NIL)",
    reader=read_bmt,
    layout=LAYOUT.text(),
    prompt_template=BENCHMARK_PROMPT,
    prompt_names=PROMPT_NAMES,
    prepare=prepare_bmt,
    how_to_prepare=build_it("bmt"),
    source="https://www.synapse.org/Synapse:syn55262661",
    citation="Welch E.C. et al., BMT: a cross-validated ThinPrep Pap cervical cytology dataset for machine learning "
             "model training and validation, Scientific Data 11 (2024), doi:10.1038/s41597-024-04328-3",
    licence="the Synapse project's conditions of use (registration required)",
))
