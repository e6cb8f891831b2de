"""The ``demo`` dataset: synthetic cell images so that everything runs with no download.

SYNTHETIC DATA, NOT MEDICAL DATA. These pictures are drawn by this module from a few
numbers; results obtained on them say that the software works, nothing about cytology.

What is drawn: 400 single-cell images, 64x64 RGB PNG, in four classes of 100 images that
differ the way squamous cytology classes do (nucleus size and shape, nucleus-to-cytoplasm
ratio, staining, a clear halo around the nucleus):

* ``superficial``: large pink/orange cytoplasm, small dark pyknotic nucleus;
* ``intermediate``: large blue-green cytoplasm, small round vesicular nucleus;
* ``koilocyte``: green-yellow cytoplasm, enlarged irregular nucleus inside a clear halo;
* ``high_grade``: small dark-blue cytoplasm, large dark irregular nucleus (high N:C ratio).

Within a class the cell moves, turns, changes size, shape and colour a little, and the
background is noisy, so that a model has to learn the classes rather than memorise pixels;
the differences are strong enough for a randomly initialised network with a linear head.
Each class is split 60/15/25 into train/val/test, in the ``folder`` layout
``<root>/<split>/<class>_<n>.png``. Generation is deterministic (fixed seed, one generator
per image) and takes about a second.

The folder is ``$CYTOLORA_CACHE/demo``, else ``~/.cache/cytology-lora/demo``. It is built
on first use in a temporary folder beside it and renamed into place, so that concurrent
runs never see a half-written dataset.

``demo_captions`` (folder ``demo_captions`` beside it) draws the same four cell types as
image-text pairs: each cell also has a size (small, medium, large), a stain (pale, mid-toned,
dark) and a position (centre or a corner), and its caption names all four, e.g. "a large
dark koilocyte in the upper left". The 45 attribute combinations of a class are shuffled
once; test takes 25 of them and val 15 others, so that within val and within test every
caption is different and the pair of an image is well defined; train cycles through all
45. The data is the ``csv`` layout (``{train,val,test}.csv`` with path, label and caption).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from datasets.base import Listing, ReadRequest
from datasets.errors import DatasetError
from datasets.layouts import CLASS_FOLDERS
from datasets.readers import read_class_folders
from datasets.registry import CELL_PROMPT, DatasetInfo, register
from datasets.tables import read_tables, write_tables

CLASSES = ("superficial", "intermediate", "koilocyte", "high_grade")
SPLIT_SIZES = {"train": 60, "val": 15, "test": 25}  # per class
IMAGE_SIZE = 64
SEED = 20240611
VERSION = 1
MARKER = "DEMO_DATASET.txt"
MARKER_TEXT = (
    f"cytology-lora demo dataset v{VERSION}: SYNTHETIC images drawn by datasets/demo.py, not medical data.\n"
)
BACKGROUND = (236, 232, 226)
HALO = (246, 244, 238)


@dataclass(frozen=True)
class CellStyle:
    """The ranges one class's cells are drawn from (radii in pixels, colours in RGB)."""

    cyto_radius: tuple[float, float]
    cyto_rgb: tuple[int, int, int]
    nucleus_radius: tuple[float, float]
    nucleus_rgb: tuple[int, int, int]
    irregularity: float  # amplitude of the nuclear outline's wobble, as a fraction of its radius
    halo: float  # halo radius / nucleus radius; 0 for none


STYLES = {
    "superficial": CellStyle((21, 26), (238, 146, 158), (2.2, 3.2), (40, 18, 52), 0.04, 0.0),
    "intermediate": CellStyle((20, 25), (118, 192, 200), (4.2, 5.4), (88, 78, 156), 0.04, 0.0),
    "koilocyte": CellStyle((18, 23), (196, 204, 128), (6.0, 7.8), (66, 36, 96), 0.20, 1.9),
    "high_grade": CellStyle((12, 15.5), (92, 118, 196), (8.0, 10.0), (48, 22, 82), 0.24, 0.0),
}


# demo_captions: attributes a caption names, and how each is drawn
CAPTION_NAMES = {"superficial": "superficial cell", "intermediate": "intermediate cell", "koilocyte": "koilocyte",
                 "high_grade": "high-grade cell"}
SIZES = {"small": 0.7, "medium": 0.85, "large": 1.0}  # scale of both radii
STAINS = {"pale": 40.0, "mid-toned": 0.0, "dark": -45.0}  # added to the cytoplasm colour
POSITIONS = {"centre": (0, 0), "upper left": (-8, -8), "upper right": (8, -8), "lower left": (-8, 8),
             "lower right": (8, 8)}  # offset of the cell centre in pixels (x, y)
CAPTIONS_MARKER_TEXT = (
    f"cytology-lora demo_captions dataset v{VERSION}: SYNTHETIC images and captions drawn by datasets/demo.py, "
    "not medical data.\n"
)


def cache_root(name: str = "demo") -> Path:
    """Where a synthetic dataset lives: ``$CYTOLORA_CACHE/<name>`` or ``~/.cache/cytology-lora/<name>``."""
    base = os.environ.get("CYTOLORA_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "cytology-lora") / name


def demo_root() -> Path:
    """The demo dataset's folder, generated there first if it is not there yet."""
    return _generated(cache_root("demo"), write_demo)


def demo_captions_root() -> Path:
    """The demo_captions dataset's folder, generated there first if it is not there yet."""
    return _generated(cache_root("demo_captions"), write_demo_captions)


def read_demo(root: Path | None, request: ReadRequest) -> Listing:
    """The synthetic demo dataset, generated in its cache folder on first use (``root`` is ignored)."""
    return read_class_folders(demo_root(), request.dataset, None)


def read_demo_captions(root: Path | None, request: ReadRequest) -> Listing:
    """The synthetic image-caption dataset, generated in its cache folder on first use (``root`` is ignored)."""
    return read_tables(demo_captions_root(), request.dataset)


def _generated(root: Path, write) -> Path:
    """``root``, drawn by ``write(folder)`` in a temporary folder and renamed into place if it is not complete."""
    if (root / MARKER).is_file():
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(
            f"{root} exists but is not a complete demo dataset; delete it so that it is generated again"
        )
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-tmp-", dir=root.parent))
    except OSError as err:
        raise DatasetError(
            f"cannot create the demo dataset beside {root} ({err}); set CYTOLORA_CACHE to a writable folder"
        ) from err
    try:
        write(tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished first: its copy is identical, use it.
            if not (root / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_demo(folder: Path) -> None:
    """Draw the whole demo dataset into ``folder`` (which must exist)."""
    from PIL import Image  # drawing only: `import datasets` loads neither PIL nor numpy

    for split in SPLIT_SIZES:
        (folder / split).mkdir()
    for c, cls, split, _, n in _numbered_cells():
        pixels = draw_cell(STYLES[cls], seed=(SEED, c, n))
        Image.fromarray(pixels).save(folder / split / f"{cls}_{n}.png", compress_level=1)
    (folder / MARKER).write_text(MARKER_TEXT)


def _numbered_cells():
    """(class index, class, split, index in the split, number in the class from 1) of every cell, in drawing
    order: each class's train, then val, then test cells."""
    for c, cls in enumerate(CLASSES):
        n = 0
        for split, count in SPLIT_SIZES.items():
            for i in range(count):
                n += 1
                yield c, cls, split, i, n


def caption_attributes() -> list[tuple[str, str, str]]:
    """Every (size, stain, position) combination, in a fixed shuffled order."""
    import numpy as np  # drawing only, as above

    combos = [(a, b, c) for a in SIZES for b in STAINS for c in POSITIONS]
    order = np.random.default_rng(SEED + 1).permutation(len(combos))
    return [combos[i] for i in order]


def caption(cls: str, size: str, stain: str, position: str) -> str:
    """The caption of one demo_captions cell."""
    return f"a {size} {stain} {CAPTION_NAMES[cls]} in the {position}"


def write_demo_captions(folder: Path) -> None:
    """Draw the demo_captions dataset into ``folder`` (which must exist): images and the three CSVs."""
    from PIL import Image  # drawing only: `import datasets` loads neither PIL nor numpy

    combos = caption_attributes()
    first = {"test": 0, "val": SPLIT_SIZES["test"], "train": 0}
    rows: dict[str, list[tuple[int, list[str]]]] = {split: [] for split in SPLIT_SIZES}
    for split in SPLIT_SIZES:
        (folder / split).mkdir()
    for c, cls, split, i, n in _numbered_cells():
        size, stain, position = combos[(first[split] + i) % len(combos)]
        pixels = draw_cell(STYLES[cls], seed=(SEED, 7, c, n), offset=POSITIONS[position], scale=SIZES[size],
                           stain=STAINS[stain])
        name = f"{split}/{cls}_{n}.png"
        Image.fromarray(pixels).save(folder / name, compress_level=1)
        rows[split].append((len(rows[split]) + 2, [name, cls, caption(cls, size, stain, position)]))
    write_tables(folder, ["path", "label", "caption"], rows, overwrite=False)
    (folder / MARKER).write_text(CAPTIONS_MARKER_TEXT)


def draw_cell(style: CellStyle, seed: tuple[int, ...], size: int = IMAGE_SIZE, offset: tuple[int, int] | None = None,
              scale: float = 1.0, stain: float = 0.0):
    """One synthetic cell as a (size, size, 3) uint8 array, fully determined by ``seed``.

    ``offset`` places the cell centre (with a 1.5-pixel jitter; default: anywhere within 5 pixels of
    the middle), ``scale`` multiplies its radii and ``stain`` is added to its cytoplasm colour.
    """
    import numpy as np  # drawing only, as above

    rng = np.random.default_rng(list(seed))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if offset is None:
        centre = size / 2 + rng.uniform(-5, 5, size=2)
    else:
        centre = size / 2 + np.asarray(offset, np.float64) + rng.uniform(-1.5, 1.5, size=2)
    tint = rng.uniform(-14, 14, size=3)
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.asarray(BACKGROUND, np.float32) + rng.uniform(-6, 6, size=3)

    # Cytoplasm: a turned ellipse with a slightly polygonal outline (squamous cells are flat polygons).
    radius = rng.uniform(*style.cyto_radius) * scale
    angle = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.72, 1.0)
    rho, phi = _polar(xx - centre[0], yy - centre[1], angle, aspect)
    outline = radius * _wobble(rng, phi, 0.06)
    cyto = np.clip(outline - rho + 0.5, 0, 1)
    _paint(img, cyto, np.asarray(style.cyto_rgb, np.float32) + tint + stain)

    # Nucleus (and halo), near the middle of the cell.
    n_centre = centre + rng.uniform(-2, 2, size=2)
    n_radius = rng.uniform(*style.nucleus_radius) * scale
    n_rho, n_phi = _polar(xx - n_centre[0], yy - n_centre[1], rng.uniform(0, np.pi), rng.uniform(0.8, 1.0))
    n_outline = n_radius * _wobble(rng, n_phi, style.irregularity)
    if style.halo:
        halo = np.clip(n_outline * style.halo - n_rho + 0.5, 0, 1) * cyto
        _paint(img, halo * 0.9, np.asarray(HALO, np.float32))
    nucleus = np.clip(n_outline - n_rho + 0.5, 0, 1)
    chromatin = rng.normal(0, 14, size=(size, size, 1)).astype(np.float32)
    _paint(img, nucleus, np.asarray(style.nucleus_rgb, np.float32) + tint * 0.5 + chromatin)

    img += rng.normal(0, 5, size=img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _polar(dx, dy, angle: float, aspect: float):
    """Radius and angle in a frame turned by ``angle`` and squeezed by ``aspect`` along one axis."""
    import numpy as np  # drawing only, as above

    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    return np.hypot(u, v), np.arctan2(v, u)


def _wobble(rng, phi, amplitude: float):
    """A random smooth outline factor around 1 (harmonics 2 to 5 of the angle)."""
    import numpy as np  # drawing only, as above

    out = np.ones_like(phi)
    weights = rng.uniform(0.3, 1.0, size=4)
    weights *= amplitude / weights.sum()
    for k, w in zip(range(2, 6), weights, strict=True):
        out += w * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return out


def _paint(img, alpha, colour) -> None:
    """Blend ``colour`` into ``img`` with per-pixel opacity ``alpha`` (in place)."""
    a = alpha[..., None]
    img *= 1 - a
    img += a * colour


register(DatasetInfo(
    name="demo",
    synthetic=True,
    description="synthetic cells drawn on first use (software check only, not medical data)",
    reader=read_demo,
    layout=CLASS_FOLDERS,
    how_to_prepare="delete the folder so that the demo is generated again",
    needs_root=False,
))
register(DatasetInfo(
    name="demo_captions",
    synthetic=True,
    task="captions",
    description="synthetic cells with captions naming type, size, stain and position (image-text pairs; "
                "software check only, not medical data)",
    reader=read_demo_captions,
    layout="<cache>/demo_captions/{train,val,test}.csv with path, label and caption",
    prompt_template=CELL_PROMPT,
    how_to_prepare="delete the folder so that it is generated again",
    needs_root=False,
))
