"""Inputs: leakage across splits found on resolved paths and on content; high-bit-depth images scaled to 8 bits."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import DatasetError, load_image, load_split
from tests.conftest import make_folder_dataset


def write_csv_dataset(root: Path, paths: dict[str, list[str]]) -> Path:
    """A single-label csv dataset whose tables list the given path spellings; every image is distinct."""
    rng = np.random.default_rng(0)
    for split, listed in paths.items():
        rows = ["path,label"]
        for i, rel in enumerate(listed):
            image = root / os.path.normpath(rel)
            if not image.exists():
                image.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(image)
            rows.append(f"{rel},{'ab'[i % 2]}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize(("train_spelling", "test_spelling"), [
    ("./images/x.png", "images/x.png"),
    ("images/x.png", "images//x.png"),
    ("images/x.png", "images/sub/../x.png"),
])
def test_one_file_spelled_two_ways_in_two_splits_is_refused(tmp_path: Path, train_spelling, test_spelling) -> None:
    root = write_csv_dataset(tmp_path / "d", {
        "train": [train_spelling, "images/t1.png"], "val": ["images/v0.png", "images/v1.png"],
        "test": [test_spelling, "images/s1.png"]})
    (root / "images" / "sub").mkdir(exist_ok=True)
    with pytest.raises(DatasetError) as err:
        load_split(str(root), "csv", shots=-1)
    message = str(err.value)
    assert "are the same file" in message and "(test)" in message and "(train)" in message and "\n" not in message


def test_a_link_into_another_split_is_the_same_file(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "f", per_split={"train": 2, "val": 1, "test": 1})
    os.symlink(root / "train" / "red_0.png", root / "test" / "red_9.png")
    with pytest.raises(DatasetError, match=r"test/red_9.png \(test\) and .*train/red_0.png \(train\) are the same"):
        load_split(str(root), "folder", shots=-1)
    os.remove(root / "test" / "red_9.png")
    os.link(root / "train" / "red_1.png", root / "val" / "red_7.png")  # a hard link: same inode
    with pytest.raises(DatasetError, match="are the same file"):
        load_split(str(root), "folder", shots=-1)


def test_a_copy_in_another_split_is_warned_about_and_only_then(tmp_path: Path, capsys) -> None:
    root = make_folder_dataset(tmp_path / "f", per_split={"train": 3, "val": 1, "test": 2})
    load_split(str(root), "folder", shots=-1)
    assert "same content" not in capsys.readouterr().err  # distinct images: nothing to say
    shutil.copyfile(root / "train" / "blue_2.png", root / "test" / "blue_8.png")
    split = load_split(str(root), "folder", shots=-1)
    err = capsys.readouterr().err
    assert split.sizes()["test"] == 7
    (line,) = [x for x in err.splitlines() if "same content" in x]
    assert "blue_2.png (train)" in line and "blue_8.png (test)" in line
    # a file of the same size but other bytes is no copy
    data = bytearray((root / "test" / "blue_8.png").read_bytes())
    data[-20] ^= 0xFF
    (root / "test" / "blue_8.png").write_bytes(bytes(data))
    load_split(str(root), "folder", shots=-1)
    assert "same content" not in capsys.readouterr().err


def test_a_path_drawn_twice_within_one_split_is_not_leakage(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "f", per_split={"train": 2, "val": 1, "test": 1})
    split = load_split(str(root), "folder", shots=4, replacement=True)
    assert len(split.train) == 12 and len({p for p, _ in split.train}) == 6


# 16-bit values and their 8-bit result by hand: round(v / 65535 * 255), e.g. 32768 -> 127.5 -> 128
SIXTEEN = np.array([[0, 257, 32768], [1000, 65278, 65535]], dtype=np.uint16)
SIXTEEN_TO_8 = np.array([[0, 1, 128], [4, 254, 255]], dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"grey16{suffix}"
    Image.fromarray(SIXTEEN).save(path)
    assert Image.open(path).mode.startswith("I;16")
    img = load_image(path)
    assert img.mode == "RGB"
    rgb = np.asarray(img)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], SIXTEEN_TO_8)


def test_wide_integer_and_float_images_use_the_range_their_values_need(tmp_path: Path) -> None:
    eight_wide = np.array([[0, 100], [200, 255]], dtype=np.int32)  # 8-bit values stored as 32-bit
    Image.fromarray(eight_wide).save(tmp_path / "i8.tif")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "i8.tif"))[..., 0], eight_wide)
    sixteen_wide = SIXTEEN.astype(np.int32)
    Image.fromarray(sixteen_wide).save(tmp_path / "i16.tif")
    assert Image.open(tmp_path / "i16.tif").mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "i16.tif"))[..., 1], SIXTEEN_TO_8)
    unit = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)  # 0.25 * 255 = 63.75 -> 64; 0.5 -> 127.5 -> 128
    Image.fromarray(unit).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "f.tif"))[..., 2], [[0, 64], [128, 255]])


def test_eight_bit_images_are_unchanged(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "rgb.png")), rgb)
    grey = rgb[..., 0].copy()
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "grey.png")), np.repeat(grey[..., None], 3, -1))
