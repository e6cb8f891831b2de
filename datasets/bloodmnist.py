"""BloodMNIST (MedMNIST v2): peripheral blood cells, 8 classes, with the official train/val/test split.

The download is one NumPy archive, ``bloodmnist.npz`` (28x28 pixels) or a larger MedMNIST+ size
(``bloodmnist_64.npz``, ``_128``, ``_224``), holding ``train_images``, ``train_labels``, ``val_images``,
``val_labels``, ``test_images`` and ``test_labels`` (11,959 / 1,712 / 3,421 images; labels 0-7 in the
order of :data:`CLASSES`). ``python -m datasets prepare bloodmnist --src FILE_OR_FOLDER --dst ROOT`` writes each
image as a PNG to ``<ROOT>/BloodMNIST/images/<split>/<class>_<n>.png``, keeping the official split (``--seed``
and ``--ratios`` do not apply). The archive is read without pickle. The source images do not name their
donor, so no grouping beyond the official split is possible.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from datasets.base import Listing, PrepareRequest, ReadRequest
from datasets.errors import DatasetError
from datasets.layouts import SOURCES_FILE, SPLITS
from datasets.prepare import Planned, build_it, check_target, refuse_options, report, write_plan
from datasets.readers import FolderLayout
from datasets.registry import DatasetInfo, register

BENCHMARK_PROMPT = "a photo of a {}."  # the cytology benchmark's one template for these datasets
CLASSES = ("basophil", "eosinophil", "erythroblast", "immature_granulocytes", "lymphocyte", "monocyte",
           "neutrophil", "platelet")  # MedMNIST's label order (0-7)
LAYOUT = FolderLayout("BloodMNIST", ".png", CLASSES)
ARCHIVE = "bloodmnist"  # bloodmnist.npz, bloodmnist_64.npz, ...
EXPECTED = (f"the MedMNIST archive {ARCHIVE}.npz (or {ARCHIVE}_64/_128/_224.npz) with train/val/test "
            "_images and _labels arrays")


def read_bloodmnist(root: Path, request: ReadRequest) -> Listing:
    """``<root>/BloodMNIST/images/<split>/<class>_<n>.png``."""
    return LAYOUT.read(root, request.dataset)


def find_archive(src: Path) -> Path:
    """The archive ``--src`` names, or the one ``bloodmnist*.npz`` in the folder it names."""
    src = Path(os.path.abspath(os.path.expanduser(str(src))))
    if src.is_file() and src.suffix == ".npz":
        return src
    found = sorted(src.glob(f"{ARCHIVE}*.npz")) if src.is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DatasetError(f"{src} holds {', '.join(f.name for f in found)}: give the one to use as --src")
    raise DatasetError(f"no {ARCHIVE}*.npz at {src}: --src must be {EXPECTED}")


def read_archive(path: Path) -> dict[str, tuple]:
    """split -> (images uint8 (N, H, W[, 3]), labels (N,)) from the archive, checked; never unpickles."""
    import numpy as np  # preparation only: `import datasets` stays free of numpy

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read {path} ({err}): --src must be {EXPECTED}") from err
    out = {}
    for split in SPLITS:
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None or labels is None:
            raise DatasetError(f"{path} has no {split}_images/{split}_labels arrays: --src must be {EXPECTED}")
        labels = labels.reshape(-1)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
            raise DatasetError(f"{path}: {split}_images must be uint8 (N, H, W[, 3]) with one label each")
        if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
            raise DatasetError(f"{path}: {split}_labels must lie in 0..{len(CLASSES) - 1} (BloodMNIST's 8 classes)")
        out[split] = (images, labels.astype(int))
    return out


def prepare_bloodmnist(request: PrepareRequest) -> dict:
    """The MedMNIST archive bloodmnist.npz (any size), written as PNGs with its official split."""
    from PIL import Image  # preparation only, as numpy above

    refuse_options("bloodmnist", request)
    archive = find_archive(request.src)
    target = Path(os.path.abspath(os.path.expanduser(str(request.dst)))) / LAYOUT.folder
    check_target(target, archive, request.overwrite, {"images", SOURCES_FILE})
    arrays = read_archive(archive)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{LAYOUT.folder}.decode-", dir=target.parent))
    try:
        plan = []
        for split, (images, labels) in arrays.items():
            (scratch / split).mkdir()
            width = len(str(len(images)))
            for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
                png = scratch / split / f"{i:0{width}d}.png"
                Image.fromarray(pixels).save(png)
                plan.append(Planned(png, CLASSES[label], split, "", origin=f"{archive.name}:{split}_images[{i}]",
                                    given=True))
        write_plan(plan, target, "images", scratch, request.overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report("bloodmnist", plan, list(CLASSES), LAYOUT.images_dir(target.parent), request.seed, request.ratios)


register(DatasetInfo(
    name="bloodmnist",
    description="BloodMNIST peripheral blood cells (MedMNIST v2), 8 classes, official split",
    reader=read_bloodmnist,
    layout=LAYOUT.text(),
    prompt_template=BENCHMARK_PROMPT,
    prepare=prepare_bloodmnist,
    how_to_prepare=build_it("bloodmnist", "bloodmnist.npz"),
    source="https://zenodo.org/records/10519652 (MedMNIST+; pip package medmnist)",
    citation="Yang J. et al., MedMNIST v2, Scientific Data 10, 41 (2023), doi:10.1038/s41597-022-01721-8; "
             "source images: Acevedo A. et al., Data in Brief 30, 105474 (2020)",
    licence="CC BY 4.0",
))
