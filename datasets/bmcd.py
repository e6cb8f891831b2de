"""BMCD: bone marrow cell cytomorphology (Munich Leukemia Laboratory, Helmholtz Munich and Fraunhofer IIS).

171,374 single-cell crops of May-Gruenwald-Giemsa-stained bone marrow smears from 945 patients, in 21
classes named by three-letter codes (ABE abnormal eosinophil ... PMO promyelocyte).

The download (TCIA, or its Kaggle mirror ``bone-marrow-cell-classification``) holds one folder per code,
often with numbered sub-folders (``ABE/0001-1000/ABE_00001.jpg``). ``python -m datasets prepare bmcd --src RAW
--dst ROOT`` writes ``<ROOT>/BMCD/images/<split>/<class>_<n>.jpg``, split per class (seeded, ``--ratios``), or
keeps the benchmark's ``splits/*.txt`` when given. File names do not name the patient, so the split cannot keep
a patient's cells together.
"""

from __future__ import annotations

from pathlib import Path

from datasets.base import Listing, PrepareRequest, ReadRequest
from datasets.prepare import build_it, plan_download, prepare_folder_layout
from datasets.readers import FolderLayout
from datasets.registry import DatasetInfo, register

BENCHMARK_PROMPT = "a photo of a {}."  # the cytology benchmark's one template for these datasets
PROMPT_NAMES = {
    "ABE": "abnormal eosinophil", "ART": "artefact", "BAS": "basophil", "BLA": "blast", "EBO": "erythroblast",
    "EOS": "eosinophil", "FGC": "faggot cell", "HAC": "hairy cell", "KSC": "smudge cell",
    "LYI": "immature lymphocyte", "LYT": "lymphocyte", "MMZ": "metamyelocyte", "MON": "monocyte",
    "MYB": "myelocyte", "NGB": "band neutrophil", "NGS": "segmented neutrophil", "NIF": "not identifiable",
    "OTH": "other cell", "PEB": "proerythroblast", "PLM": "plasma cell", "PMO": "promyelocyte",
}
ALIASES = {code: () for code in PROMPT_NAMES}  # the download's folders are the codes themselves
LAYOUT = FolderLayout("BMCD", ".jpg", tuple(ALIASES))


def read_bmcd(root: Path, request: ReadRequest) -> Listing:
    """``<root>/BMCD/images/<split>/<class>_<n>.jpg``."""
    return LAYOUT.read(root, request.dataset)


def prepare_bmcd(request: PrepareRequest) -> dict:
    """One folder per cell code, sub-folders allowed (or the benchmark layout), split per class (seeded)."""
    return prepare_folder_layout("bmcd", LAYOUT, request,
                                 lambda src, ratios, seed: plan_download(src, ratios, seed, "bmcd", ALIASES))


register(DatasetInfo(
    name="bmcd",
    description="BMCD bone marrow cell cytomorphology, 21 classes (ABE ... PMO)",
    reader=read_bmcd,
    layout=LAYOUT.text(),
    prompt_template=BENCHMARK_PROMPT,
    prompt_names=PROMPT_NAMES,
    prepare=prepare_bmcd,
    how_to_prepare=build_it("bmcd"),
    source="https://www.cancerimagingarchive.net/collection/bone-marrow-cytomorphology_mll_helmholtz_fraunhofer/ "
           "(mirror: https://www.kaggle.com/datasets/andrewmvd/bone-marrow-cell-classification)",
    citation="Matek C. et al., Highly accurate differentiation of bone marrow cell morphologies using deep neural "
             "networks on a large image data set, Blood 138(20), 1917-1927 (2021), doi:10.1182/blood.2020010568",
    licence="CC BY 4.0 (TCIA)",
))
