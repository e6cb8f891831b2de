"""APACC: Annotated PAp cell images and smear slices for Cell Classification (conventional Pap smears).

103,675 cell images from 107 smears, labelled by three cytopathologists as healthy, unhealthy, rubbish
(debris, artefacts) or bothcells (a healthy and an unhealthy cell in one crop); 4 classes.

``python -m datasets prepare apacc --src RAW --dst ROOT`` reads the download in the first form it finds:
the benchmark layout (``images/<class>/...`` with ``splits/{train,val,test}.txt``, kept as it is), the
authors' train/test folders (``train/<class>/``, ``test/<class>/``; val drawn from train, seeded) or bare
class folders (split per class, seeded, ``--ratios``), and writes ``<ROOT>/APACC/images/<split>/<class>_<n>.<ext>``.
The crops do not name their smear, so only the authors' own division can keep a smear's cells together.
"""

from __future__ import annotations

from pathlib import Path

from datasets.base import Listing, PrepareRequest, ReadRequest
from datasets.prepare import build_it, plan_download, prepare_folder_layout
from datasets.readers import FolderLayout
from datasets.registry import DatasetInfo, register

BENCHMARK_PROMPT = "a photo of a {}."  # the cytology benchmark's one template for these datasets
# class -> other names its folder may have in a download
ALIASES = {"bothcells": ("both cells", "both"), "healthy": (), "rubbish": (), "unhealthy": ()}
LAYOUT = FolderLayout("APACC", ".<ext>", tuple(ALIASES))


def read_apacc(root: Path, request: ReadRequest) -> Listing:
    """``<root>/APACC/images/<split>/<class>_<n>.<ext>``."""
    return LAYOUT.read(root, request.dataset)


def prepare_apacc(request: PrepareRequest) -> dict:
    """The benchmark layout, the authors' train/test folders or bare class folders (see datasets/apacc.py)."""
    return prepare_folder_layout("apacc", LAYOUT, request,
                                 lambda src, ratios, seed: plan_download(src, ratios, seed, "apacc", ALIASES))


register(DatasetInfo(
    name="apacc",
    description="APACC conventional Pap smear cells, 4 classes (bothcells, healthy, rubbish, unhealthy)",
    reader=read_apacc,
    layout=LAYOUT.text(),
    prompt_template=BENCHMARK_PROMPT,
    prompt_names={"bothcells": "both cells"},
    prepare=prepare_apacc,
    how_to_prepare=build_it("apacc"),
    source="https://osf.io/fp2xe/",
    citation="Kupas D. et al., Annotated Pap cell images and smear slices for cell classification, "
             "Scientific Data 11, 743 (2024), doi:10.1038/s41597-024-03596-3",
    licence="CC BY 4.0 (as stated on the OSF project)",
))
