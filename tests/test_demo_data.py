"""The synthetic demo dataset: layout, determinism, atomic generation, learnable classes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import DatasetError, demo_root, load_split
from datasets.demo import CLASSES, MARKER, SPLIT_SIZES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """One generated demo dataset shared by the read-only tests of this module."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("CYTOLORA_CACHE")
    os.environ["CYTOLORA_CACHE"] = str(cache)
    try:
        root = demo_root()
    finally:
        if old is None:
            del os.environ["CYTOLORA_CACHE"]
        else:
            os.environ["CYTOLORA_CACHE"] = old
    assert root == cache / "demo"
    return root


def pixels(root: Path, split: str) -> tuple[np.ndarray, list[str]]:
    files = sorted((root / split).iterdir())
    return np.stack([np.asarray(Image.open(f)) for f in files]), [f.name.rpartition("_")[0] for f in files]


def test_layout_and_counts(demo: Path, monkeypatch) -> None:
    monkeypatch.setenv("CYTOLORA_CACHE", str(demo.parent))
    split = load_split(None, "demo", shots=-1)
    assert split.root == str(demo) and split.classes == sorted(CLASSES) and len(CLASSES) == 4
    for name, per_class in SPLIT_SIZES.items():
        assert split.counts()[name] == dict.fromkeys(sorted(CLASSES), per_class)
    assert sum(len(split.items(s)) for s in SPLIT_SIZES) == 400
    img = Image.open(split.train[0][0])
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)
    assert "not medical data" in (demo / MARKER).read_text()
    few = load_split("", "demo", shots=4, seed=1)
    assert few.counts()["train"] == dict.fromkeys(sorted(CLASSES), 4)


def test_generation_is_deterministic_and_reused(demo: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CYTOLORA_CACHE", str(tmp_path))
    again = demo_root()
    assert again != demo
    for split in SPLIT_SIZES:
        a, names_a = pixels(demo, split)
        b, names_b = pixels(again, split)
        assert names_a == names_b and np.array_equal(a, b)
    stamp = (again / MARKER).stat().st_mtime_ns
    assert demo_root() == again and (again / MARKER).stat().st_mtime_ns == stamp  # not regenerated
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folder left behind


def features(images: np.ndarray) -> np.ndarray:
    """Per image: mean colour, fraction of dark (nucleus-like) and of near-white pixels."""
    x = images.astype(np.float32)
    brightness = x.mean(axis=3)
    return np.column_stack(
        [
            x.mean(axis=(1, 2)) / 255,
            (brightness < 110).mean(axis=(1, 2)) * 4,
            (brightness > 238).mean(axis=(1, 2)) * 4,
        ]
    )


def test_classes_differ_like_cytology_classes(demo: Path) -> None:
    train, y_train = pixels(demo, "train")
    test, y_test = pixels(demo, "test")
    f_train, f_test = features(train), features(test)
    by = {c: f_train[[y == c for y in y_train]] for c in CLASSES}
    red_minus_blue = {c: (by[c][:, 0] - by[c][:, 2]).mean() for c in CLASSES}
    dark = {c: by[c][:, 3].mean() for c in CLASSES}
    assert red_minus_blue["superficial"] > 0 > red_minus_blue["intermediate"]  # pink vs blue-green staining
    assert dark["high_grade"] > dark["koilocyte"] > dark["intermediate"] > dark["superficial"]  # nucleus size
    # A nearest-centroid rule on these six numbers, fitted on train, separates the test images.
    centroids = np.stack([by[c].mean(axis=0) for c in CLASSES])
    predicted = np.argmin(((f_test[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = np.mean([CLASSES[p] == y for p, y in zip(predicted, y_test, strict=True)])
    assert accuracy >= 0.9
    # ...while images of one class still vary (position, size, colour, noise).
    assert all(train[[y == c for y in y_train]].std(axis=0).mean() > 10 for c in CLASSES)


def test_concurrent_first_use_is_safe(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CYTOLORA_CACHE": str(tmp_path)}
    code = "from datasets import demo_root; print(demo_root())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert {o.strip() for o, _ in outs} == {str(tmp_path / "demo")}
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert sum(1 for _ in (tmp_path / "demo").rglob("*.png")) == 400


def test_a_foreign_folder_in_the_cache_is_not_overwritten(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CYTOLORA_CACHE", str(tmp_path))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "thesis.txt").write_text("precious")
    with pytest.raises(DatasetError, match="not a complete demo dataset"):
        demo_root()
    assert (tmp_path / "demo" / "thesis.txt").read_text() == "precious"
