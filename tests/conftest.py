"""Test session setup: offline, private caches, and small on-disk image fixtures."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HERLEV = SHARED_DATA / "herlev"


def pytest_configure(config):
    # Everything runs offline and writes only below the pytest temporary folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # small models run fastest on one thread, and the suite stays quick on a busy machine
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cache = Path(config.rootpath) / ".pytest_cache" / "cytolora-cache"
    os.environ["CYTOLORA_CACHE"] = str(cache)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def run_datasets_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m datasets ...` from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "datasets", *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


COLOURS = {"blue": (40, 60, 200), "red": (200, 50, 40), "green-ish": (50, 180, 70)}


def feature_batches(x, y, batch_size: int = 8, kill_at: int | None = None):
    """Trainer.fit's `batches(start)` over rows of `x` and labels `y` (seed 1); with `kill_at`, this process
    sends itself a SIGTERM when that step's batch is drawn."""
    import os
    import signal

    import torch

    from engine.trainer import batch_indices

    def gen(start):
        for step, idx in enumerate(batch_indices(len(y), batch_size, 1, start), start=start):
            if kill_at is not None and step == kill_at:
                os.kill(os.getpid(), signal.SIGTERM)
            ids = torch.as_tensor(idx)
            yield x[ids], y[ids]
    return gen


def write_cell(path: Path, colour, rng: np.random.Generator, size: int = 16) -> None:
    """A small noisy image of one dominant colour."""
    base = np.array(colour, dtype=float)
    pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_folder_dataset(root: Path, per_split=None, ext: str = "png", seed: int = 0) -> Path:
    """`<root>/<split>/<class>_<n>.<ext>` with three colour-coded classes."""
    per_split = per_split or {"train": 6, "val": 3, "test": 4}
    rng = np.random.default_rng(seed)
    for split, n in per_split.items():
        for name, colour in COLOURS.items():
            for i in range(n):
                write_cell(root / split / f"{name}_{i}.{ext}", colour, rng)
    return root


def make_multilabel_dataset(root: Path, per_split=(("train", 16), ("val", 8), ("test", 8)), seed: int = 0) -> Path:
    """A csv multi-label dataset: colour channels as three 0/1 labels on small noisy images."""
    rng = np.random.default_rng(seed)
    for split, n in per_split:
        rows = ["path,red,green,blue"]
        for i in range(n):
            on = [(i >> k) & 1 for k in range(3)]
            write_cell(root / split / f"{i}.png", tuple(200 * v + 20 for v in on), rng)
            rows.append(f"{split}/{i}.png," + ",".join(map(str, on)))
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def make_hicervix(root: Path, seed: int = 0) -> Path:
    """HiCervix layout: `<root>/<split>/*.jpg` and `<root>/<split>.csv` with a three-level hierarchy."""
    rng = np.random.default_rng(seed)
    # (level_1, level_2, level_3) with gaps filled by the hierarchy fallback
    kinds = [("NILM", "", ""), ("ASC", "ASC-US", ""), ("ASC", "ASC-H", "ASC-H"), ("ASC", "HSIL", "HSIL")]
    colours = [(40, 60, 200), (200, 50, 40), (50, 180, 70), (200, 200, 40)]
    counts = {"train": 8, "val": 4, "test": 4}
    for split, n in counts.items():
        rows = ["image_name,class_name,level_1,level_2,level_3"]
        for k, (l1, l2, l3) in enumerate(kinds):
            for i in range(n):
                name = f"{split}_{k}_{i}.jpg"
                write_cell(root / split / name, colours[k], rng)
                rows.append(f"{name},{l3 or l2 or l1},{l1},{l2},{l3}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def float64():
    """Compute in float64 (inputs too): there rounding cannot hide a wrong formula, as deep nets amplify it."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("folder_data"))


@pytest.fixture(scope="session")
def hicervix_root(tmp_path_factory) -> Path:
    return make_hicervix(tmp_path_factory.mktemp("hicervix_data"))


@pytest.fixture(scope="session")
def herlev_prepared(tmp_path_factory) -> tuple[Path, str]:
    """The real Herlev cells prepared once per session as a folder dataset, split by source image (its
    manifest.csv, found by prepare itself) with seed 0: the root and what prepare said on stderr."""
    import contextlib
    import io

    from datasets.__main__ import main as datasets_main

    if not (HERLEV / "manifest.csv").is_file():
        pytest.skip(f"real data not present: {HERLEV} is absent (team data in ../shared/data)")
    dst = tmp_path_factory.mktemp("herlev") / "data"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = datasets_main(["prepare", "folder", "--src", str(HERLEV), "--dst", str(dst), "--seed", "0", "--json"])
    assert code == 0, err.getvalue()
    return dst, err.getvalue()


def run_entry(script: str, *args: str):
    """An entry point called in-process, as its command line would: exit code, stdout and stderr."""
    import contextlib
    import io
    from types import SimpleNamespace

    import main
    import main_lora
    from utils.cli import run_cli

    module = {"main.py": main, "main_lora.py": main_lora}[script]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(lambda: module.main(list(args)))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
