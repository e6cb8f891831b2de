"""FNAC 2019: breast fine-needle aspiration cytology images, benign or malignant.

212 images (99 benign, 113 malignant) from breast FNAC smears; 2 classes. The benchmark names the class
folders ``B`` and ``M``; ``benign`` and ``malignant`` are accepted too.

``python -m datasets prepare fnac2019 --src RAW --dst ROOT`` writes
``<ROOT>/FNAC2019/images/<split>/<class>_<n>.<ext>``, split per class (seeded, ``--ratios``), or keeps the
benchmark's ``splits/*.txt`` when given. The images do not name their patient, so the split cannot keep a
patient's images together.
"""

from __future__ import annotations

from pathlib import Path

from datasets.base import Listing, PrepareRequest, ReadRequest
from datasets.prepare import build_it, plan_download, prepare_folder_layout
from datasets.readers import FolderLayout
from datasets.registry import DatasetInfo, register

BENCHMARK_PROMPT = "a photo of a {}."  # the cytology benchmark's one template for these datasets
ALIASES = {"benign": ("B",), "malignant": ("M",)}
LAYOUT = FolderLayout("FNAC2019", ".<ext>", tuple(ALIASES))


def read_fnac2019(root: Path, request: ReadRequest) -> Listing:
    """``<root>/FNAC2019/images/<split>/<class>_<n>.<ext>``."""
    return LAYOUT.read(root, request.dataset)


def prepare_fnac2019(request: PrepareRequest) -> dict:
    """Class folders B and M (or the benchmark layout), split per class (seeded, --ratios)."""
    return prepare_folder_layout("fnac2019", LAYOUT, request,
                                 lambda src, ratios, seed: plan_download(src, ratios, seed, "fnac2019", ALIASES))


register(DatasetInfo(
    name="fnac2019",
    description="FNAC 2019 breast fine-needle aspiration cytology, 2 classes (benign, malignant)",
    reader=read_fnac2019,
    layout=LAYOUT.text(),
    prompt_template=BENCHMARK_PROMPT,
    prepare=prepare_fnac2019,
    how_to_prepare=build_it("fnac2019"),
    source="the authors' OneDrive folder linked from mdausort/Cytology_Benchmark's README",
    citation="Saikia A.R. et al., Comparative assessment of CNN architectures for classification of breast FNAC "
             "images, Tissue and Cell 57, 8-14 (2019), doi:10.1016/j.tice.2019.02.001",
    licence="not stated by the authors: research use; ask them before redistributing",
))
