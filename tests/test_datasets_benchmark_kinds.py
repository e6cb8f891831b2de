"""The cytology benchmark's other five datasets (APACC, BloodMNIST, BMCD, BMT, FNAC2019): tiny fixtures in each
download's layout, prepared and read end to end; a wrong folder is refused in one line naming what was expected."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import DatasetError, class_prompts, get_dataset, load_split
from datasets.__main__ import main as datasets_main
from datasets.base import PrepareRequest

RNG = np.random.default_rng(0)
COUNTS = {"apacc": 4, "bloodmnist": 8, "bmcd": 21, "bmt": 3, "fnac2019": 2}  # classes, as the benchmark's run.py


def image(path: Path) -> Path:
    """A distinct 8x8 RGB image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return path


def class_folders(root: Path, folders: list[str], per_class: int, nest: str = "") -> Path:
    for folder in folders:
        for i in range(per_class):
            image(root / folder / nest / f"{folder}_{i:03d}.png")
    return root


def prepare(name: str, src: Path, dst: Path, *extra: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = datasets_main(["prepare", name, "--src", str(src), "--dst", str(dst), "--json", *extra])
    assert code == 0
    return json.loads(out.getvalue())


def sizes(root: Path, name: str) -> tuple[dict, dict]:
    split = load_split(str(root), name, shots=-1)
    assert len(split.classes) == COUNTS[name]
    return split.sizes(), split.counts()


def test_every_kind_is_registered_with_its_facts() -> None:
    for name, n in COUNTS.items():
        info = get_dataset(name)
        assert info.prepare is not None and info.citation and info.licence and info.source
        assert info.prompt_template == "a photo of a {}."
        assert f"{n} classes" in info.description
    assert class_prompts("bmcd", ["ABE", "PMO"]) == ["a photo of a abnormal eosinophil.", "a photo of a promyelocyte."]
    assert class_prompts("bloodmnist", ["immature_granulocytes"]) == ["a photo of a immature granulocytes."]


def test_apacc_benchmark_layout_keeps_its_split_lists(tmp_path: Path) -> None:
    src = tmp_path / "apacc"
    wanted = {"train": 3, "val": 2, "test": 1}  # per class
    for split, n in wanted.items():
        lines = []
        for label, folder in enumerate(["bothcells", "healthy", "rubbish", "unhealthy"]):
            for i in range(n):
                rel = f"{folder}/{split} cell {i}.png"  # spaces in a path: the label is the last token
                image(src / "images" / rel)
                lines.append(f"{rel} {label}")
        (src / "splits").mkdir(exist_ok=True)
        (src / "splits" / f"{split}.txt").write_text("\n".join(lines) + "\n\n")
    report = prepare("apacc", src, tmp_path / "data")
    assert report["split"] == "official" and report["images"] == 24
    got, counts = sizes(tmp_path / "data", "apacc")
    assert got == {"train": 12, "val": 8, "test": 4}
    assert counts["val"] == {"bothcells": 2, "healthy": 2, "rubbish": 2, "unhealthy": 2}
    with open(tmp_path / "data" / "APACC" / "sources.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["source"] for r in rows if r["file"].startswith("images/test/")} == {
        f"images/{c}/test cell 0.png" for c in ("bothcells", "healthy", "rubbish", "unhealthy")}


def test_apacc_train_test_folders_keep_test_and_draw_val_from_train(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    class_folders(src / "train", ["bothcells", "healthy", "rubbish", "unhealthy"], 9)
    class_folders(src / "test", ["Both cells", "healthy", "rubbish", "unhealthy"], 2)  # an alias folder name
    report = prepare("apacc", src, tmp_path / "data")
    assert report["split"] == "official test"
    got, counts = sizes(tmp_path / "data", "apacc")
    # val takes 10 / (70 + 10) of each class's 9 train images: round(1.125) = 1
    assert got == {"train": 32, "val": 4, "test": 8} and counts["test"]["bothcells"] == 2


@pytest.mark.parametrize(("name", "folders", "nest", "per_class", "expected"), [
    ("bmt", ["HSIL", "LSIL", "NILM"], "", 10, {"train": 21, "val": 3, "test": 6}),
    ("fnac2019", ["B", "M"], "", 10, {"train": 14, "val": 2, "test": 4}),
    ("bmcd", list(get_dataset("bmcd").prompt_names), "0001-1000", 5, {"train": 63, "val": 21, "test": 21}),
])
def test_class_folder_downloads_are_split_per_class(tmp_path: Path, name, folders, nest, per_class, expected) -> None:
    src = class_folders(tmp_path / "raw" / "nested", folders, per_class, nest)
    report = prepare(name, src.parent, tmp_path / "data", "--seed", "3")
    assert report["split"] == "seeded" and report["images"] == per_class * len(folders)
    got, counts = sizes(tmp_path / "data", name)
    assert got == expected
    for split, n in expected.items():  # every class split alike
        assert set(counts[split].values()) == {n // len(folders)}
    again = prepare(name, src.parent, tmp_path / "again", "--seed", "3")
    assert again["counts"] == report["counts"]


def write_archive(path: Path, per_class: dict[str, int], side: int = 8) -> Path:
    arrays = {}
    for split, n in per_class.items():
        labels = np.repeat(np.arange(8), n)
        arrays[f"{split}_images"] = RNG.integers(0, 256, (len(labels), side, side, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def test_bloodmnist_archive_is_written_as_pngs_with_its_official_split(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "raw" / "bloodmnist_64.npz", {"train": 3, "val": 1, "test": 2})
    report = prepare("bloodmnist", archive.parent, tmp_path / "data")
    assert report["split"] == "official" and report["images"] == 48
    got, counts = sizes(tmp_path / "data", "bloodmnist")
    assert got == {"train": 24, "val": 8, "test": 16}
    assert counts["train"]["immature_granulocytes"] == 3 and counts["test"]["platelet"] == 2
    split = load_split(str(tmp_path / "data"), "bloodmnist", shots=-1)
    path, label = split.test[0]
    with np.load(archive) as arrays:
        first = {i: arrays["test_images"][i] for i in range(16) if arrays["test_labels"][i, 0] == label}
    assert any(np.array_equal(np.asarray(Image.open(path)), pixels) for pixels in first.values())


def test_bloodmnist_refuses_what_is_not_its_archive(tmp_path: Path) -> None:
    prep = get_dataset("bloodmnist").prepare
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no bloodmnist\*\.npz at .*: --src must be the MedMNIST archive"):
        prep(PrepareRequest(src=tmp_path / "empty", dst=tmp_path / "out"))
    write_archive(tmp_path / "two" / "bloodmnist.npz", {"train": 1, "val": 1, "test": 1})
    write_archive(tmp_path / "two" / "bloodmnist_128.npz", {"train": 1, "val": 1, "test": 1})
    with pytest.raises(DatasetError, match="holds bloodmnist.npz, bloodmnist_128.npz: give the one to use"):
        prep(PrepareRequest(src=tmp_path / "two", dst=tmp_path / "out"))
    np.savez(tmp_path / "bloodmnist.npz", train_images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="has no train_images/train_labels arrays"):
        prep(PrepareRequest(src=tmp_path / "bloodmnist.npz", dst=tmp_path / "out"))


@pytest.mark.parametrize("name", ["apacc", "bmcd", "bmt", "fnac2019"])
def test_a_wrong_folder_is_refused_naming_the_expected_classes(tmp_path: Path, name: str) -> None:
    class_folders(tmp_path / "raw", ["cats", "dogs"], 2)
    with pytest.raises(DatasetError) as err:
        get_dataset(name).prepare(PrepareRequest(src=tmp_path / "raw", dst=tmp_path / "out"))
    message = str(err.value)
    assert "needs one folder per class" in message and "\n" not in message
    assert all(c in message for c in import_module(f"datasets.{name}").LAYOUT.classes)
    assert not (tmp_path / "out").exists()


def test_a_split_list_naming_a_missing_image_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "fnac"
    image(src / "images" / "B" / "a.png")
    (src / "splits").mkdir()
    (src / "splits" / "train.txt").write_text("B/a.png 0\nM/gone.png 1\n")
    with pytest.raises(DatasetError, match=r"train.txt line 2: .*M/gone.png not found"):
        get_dataset("fnac2019").prepare(PrepareRequest(src=src, dst=tmp_path / "out"))
