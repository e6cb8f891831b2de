"""The `csv` dataset: single-label, multi-label and caption tables; multi-label sampling; `prepare csv`."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from datasets import load_split
from datasets.__main__ import main as datasets_main
from datasets.layouts import SPLITS
from tests.conftest import SHARED_DATA

SMEARS = SHARED_DATA / "bccd" / "smears"
SMEAR_LABELS = ("platelets", "wbc_multiple", "rbc_dense")
# positives per split (train, val, test) and images per split, from bccd/smears/README
SMEAR_POSITIVES = {"platelets": (117, 45, 39), "wbc_multiple": (10, 1, 3), "rbc_dense": (111, 37, 33)}
SMEAR_IMAGES = (205, 87, 72)


def run_in_process(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = datasets_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def write_table(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def write_images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(root / name)


# Multi-label fixture: 30 train, 12 val, 10 test images; label a on every 2nd, b every 3rd, c every 7th.
ML_SIZES = {"train": 30, "val": 12, "test": 10}


def ml_labels(i: int) -> list[int]:
    return [int(i % 2 == 0), int(i % 3 == 0), int(i % 7 == 0)]


@pytest.fixture
def ml_root(tmp_path: Path) -> Path:
    root = tmp_path / "ml"
    for split, n in ML_SIZES.items():
        names = [f"img/{split}_{i:02d}.png" for i in range(n)]
        write_images(root, names)
        rows = [[name, f"patient{i // 3}", *ml_labels(i)] for i, name in enumerate(names)]
        write_table(root / f"{split}.csv", ["path", "group", "a", "b", "c"], rows)
    return root


def positives(split, name: str) -> list[int]:
    return [sum(label[c] for _, label in split.items(name)) for c in range(len(split.classes))]


def test_single_label_csv_equals_the_folder_dataset(folder_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "csv"
    root.mkdir()
    for split in SPLITS:
        # label first, absolute paths, rows in a random order: none of it matters
        rows = [[p.name.rsplit("_", 1)[0], str(p)] for p in (folder_root / split).iterdir()]
        random.Random(0).shuffle(rows)
        write_table(root / f"{split}.csv", ["label", "path"], rows)
    as_csv = load_split(str(root), "csv", shots=2, seed=5)
    as_folder = load_split(str(folder_root), "folder", shots=2, seed=5)
    assert as_csv.task == "single_label"
    assert (as_csv.classes, as_csv.train, as_csv.val, as_csv.test) == (
        as_folder.classes, as_folder.train, as_folder.val, as_folder.test,
    )


def test_relative_paths_give_the_same_manifest_as_folder(folder_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(folder_root, tmp_path / "both"))
    for split in SPLITS:
        rows = [[f"{split}/{p.name}", p.name.rsplit("_", 1)[0]] for p in sorted((root / split).iterdir())]
        write_table(root / f"{split}.csv", ["path", "label"], rows)
    as_csv = load_split(str(root), "csv", shots=3, seed=2)
    assert as_csv.sha256 == load_split(str(root), "folder", shots=3, seed=2).sha256


def test_multilabel_columns_labels_and_groups(ml_root: Path) -> None:
    split = load_split(str(ml_root), "csv", shots=-1)
    assert split.task == "multilabel" and split.classes == ["a", "b", "c"]
    first = split.train[0]
    assert first[0].endswith("img/train_00.png") and first[1] == (1, 1, 1)
    assert split.counts()["train"] == {"a": 15, "b": 10, "c": 5}
    assert split.sizes() == ML_SIZES
    assert split.groups[first[0]] == "patient0" and "group" not in split.classes
    assert split.manifest()["task"] == "multilabel" and split.manifest()["train"][0][1] == [1, 1, 1]


@pytest.mark.parametrize("shots", [1, 2, 4, 8])
def test_multilabel_few_shot_gives_k_positives_per_label(ml_root: Path, shots: int) -> None:
    split = load_split(str(ml_root), "csv", shots=shots, seed=3)
    available = {"train": [15, 10, 5], "val": [6, 4, 2]}
    for name, k in (("train", shots), ("val", min(shots, 4))):
        got = positives(split, name)
        quotas = [min(k, a) for a in available[name]]
        assert all(g >= q for g, q in zip(got, quotas, strict=True)), (name, got)
        # images are drawn per label among its positives: never an image negative for all, never more than asked
        assert all(any(label) for _, label in split.items(name))
        assert len(split.items(name)) <= sum(quotas)
    assert split.sizes()["test"] == ML_SIZES["test"]


def test_multilabel_sampling_is_seeded_and_ignores_row_order(ml_root: Path) -> None:
    a = load_split(str(ml_root), "csv", shots=2, seed=1)
    for split in SPLITS:
        with open(ml_root / f"{split}.csv", newline="") as f:
            header, *rows = list(csv.reader(f))
        random.Random(7).shuffle(rows)
        write_table(ml_root / f"{split}.csv", header, rows)
    assert load_split(str(ml_root), "csv", shots=2, seed=1) == a
    assert len({load_split(str(ml_root), "csv", shots=2, seed=s).sha256 for s in range(5)}) > 1


def test_multilabel_percentage_keeps_p_percent_of_images(ml_root: Path) -> None:
    split = load_split(str(ml_root), "csv", shots=0, percentage=50, seed=4)
    assert split.sizes() == {"train": 15, "val": 6, "test": 10}
    again = load_split(str(ml_root), "csv", shots=0, percentage=50, seed=4)
    other = load_split(str(ml_root), "csv", shots=0, percentage=50, seed=5)
    assert again == split and other.train != split.train


def test_multilabel_label_map_merges_by_any(ml_root: Path) -> None:
    split = load_split(str(ml_root), "csv", shots=-1, label_map="ab=a,b")
    assert split.classes == ["ab", "c"]
    assert split.counts()["train"]["ab"] == sum(1 for i in range(30) if i % 2 == 0 or i % 3 == 0)


def test_summary_reports_positives_per_label(ml_root: Path) -> None:
    code, out, err = run_in_process("summary", "--root_path", str(ml_root), "--dataset", "csv", "--shots", "-1")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["task"] == "multilabel" and doc["images"] == ML_SIZES
    assert doc["counts"]["val"] == {"a": 6, "b": 4, "c": 2}


def test_captions_with_and_without_labels(tmp_path: Path) -> None:
    root = tmp_path / "cap"
    for split, n in ML_SIZES.items():
        names = [f"{split}_{i}.png" for i in range(n)]
        write_images(root, names)
        write_table(root / f"{split}.csv", ["path", "caption"], [[p, f"cell number {p}"] for p in names])
    split = load_split(str(root), "csv", shots=4, seed=1)
    assert split.task == "captions" and split.classes == []
    assert split.sizes() == {"train": 4, "val": 4, "test": 10}
    assert all(label == -1 for name in SPLITS for _, label in split.items(name))
    path = split.train[0][0]
    assert split.captions[path] == f"cell number {Path(path).name}" and len(split.captions) == 18
    assert split.manifest()["captions"][split.relative(path)] == split.captions[path]
    for split_name, n in ML_SIZES.items():
        names = [f"{split_name}_{i}.png" for i in range(n)]
        rows = [[p, f"a cell {i}", "odd" if i % 2 else "even"] for i, p in enumerate(names)]
        write_table(root / f"{split_name}.csv", ["path", "caption", "label"], rows)
    labelled = load_split(str(root), "csv", shots=2, seed=1)
    assert labelled.classes == ["even", "odd"] and labelled.counts()["train"] == {"even": 2, "odd": 2}


@pytest.mark.parametrize(
    ("case", "culprit"),
    [
        ("not 0/1", "train.csv line 3, column 'b': '2' is not 0 or 1"),
        ("no path column", "has no column path"),
        ("columns differ", "give the files the same columns"),
        ("missing image", "1 image(s) listed in"),
        ("in two splits", "is listed in both"),
        ("missing file", "val.csv not found: csv expects <root>/{train,val,test}.csv"),
    ],
)
def test_bad_tables_give_one_line(ml_root: Path, case: str, culprit: str) -> None:
    train = ml_root / "train.csv"
    text = train.read_text().splitlines()
    if case == "not 0/1":
        text[2] = text[2][: text[2].rindex(",", 0, text[2].rindex(","))] + ",2,0"
    elif case == "no path column":
        text[0] = text[0].replace("path", "file")
    elif case == "columns differ":
        text = [line.rsplit(",", 1)[0] for line in text]
    elif case == "missing image":
        (ml_root / "img" / "train_05.png").unlink()
    elif case == "in two splits":
        text.append((ml_root / "test.csv").read_text().splitlines()[1])
    else:
        (ml_root / "val.csv").unlink()
    train.write_text("\n".join(text) + "\n")
    code, _, err = run_in_process("summary", "--root_path", str(ml_root), "--dataset", "csv", "--shots", "1")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], err


def test_prepare_csv_from_a_split_manifest(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    names = [f"images/{i}.png" for i in range(12)]
    write_images(src, names)
    splits = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    write_table(src / "all.csv", ["path", "split", "label", "site"],
                [[n, s, "pos" if i % 2 else "neg", "x"] for i, (n, s) in enumerate(zip(names, splits, strict=True))])
    outside, inside = tmp_path / "out", src
    code, out, err = run_in_process("prepare", "csv", "--src", str(src / "all.csv"), "--dst", str(outside), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["task"] == "single_label" and report["split_images"] == {"train": 6, "val": 3, "test": 3}
    with open(outside / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "label", "site"] and rows[1][0] == str(src / "images" / "0.png")  # absolute
    code, _, err = run_in_process("prepare", "csv", "--src", str(src / "all.csv"), "--dst", str(inside),
                                  "--columns", "label")
    assert code == 0, err
    assert (inside / "train.csv").read_text().splitlines()[:2] == ["path,label", "images/0.png,neg"]  # relative
    split = load_split(str(inside), "csv", shots=-1)
    assert split.counts() == {"train": {"neg": 3, "pos": 3}, "val": {"neg": 2, "pos": 1}, "test": {"neg": 1, "pos": 2}}
    code, _, err = run_in_process("prepare", "csv", "--src", str(src / "all.csv"), "--dst", str(inside))
    assert code == 2 and "--overwrite" in err and "train.csv" in err


def test_prepare_csv_refuses_a_bad_split_value(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png"])
    write_table(tmp_path / "m.csv", ["path", "split", "label"], [["a.png", "training", "x"]])
    code, _, err = run_in_process("prepare", "csv", "--src", str(tmp_path / "m.csv"), "--dst", str(tmp_path / "o"))
    assert code == 2 and "line 2: split 'training' is not one of train, val, test" in err


@pytest.fixture(scope="module")
def smears_root(tmp_path_factory) -> Path:
    """bccd/smears in the csv layout, as the docstring of datasets/tabular.py says."""
    if not (SMEARS / "smears.csv").is_file():
        pytest.skip(f"BCCD smears not found at {SMEARS} (team data in ../shared/data)")
    dst = tmp_path_factory.mktemp("smears")
    code, _, err = run_in_process("prepare", "csv", "--src", str(SMEARS / "smears.csv"), "--dst", str(dst),
                                  "--columns", ",".join(SMEAR_LABELS))
    assert code == 0, err
    return dst


def test_bccd_smears_counts_match_the_readme(smears_root: Path) -> None:
    split = load_split(str(smears_root), "csv", shots=-1)
    assert split.task == "multilabel" and split.classes == list(SMEAR_LABELS)
    assert tuple(split.sizes().values()) == SMEAR_IMAGES
    for label, per_split in SMEAR_POSITIVES.items():
        assert tuple(split.counts()[s][label] for s in SPLITS) == per_split


def test_bccd_smears_few_shot(smears_root: Path, capsys) -> None:
    split = load_split(str(smears_root), "csv", shots=4, seed=1)
    assert all(n >= 4 for n in positives(split, "train"))
    assert positives(split, "val")[SMEAR_LABELS.index("wbc_multiple")] == 1  # the only positive in val
    assert "class 'wbc_multiple' has 1 image(s) in val, fewer than the 4 asked" in capsys.readouterr().err
    assert split.sizes()["train"] <= 3 * 4 and split.sizes()["test"] == SMEAR_IMAGES[2]


def test_bccd_smears_without_columns_names_the_count_column(tmp_path: Path) -> None:
    if not (SMEARS / "smears.csv").is_file():
        pytest.skip(f"BCCD smears not found at {SMEARS} (team data in ../shared/data)")
    code, _, err = run_in_process("prepare", "csv", "--src", str(SMEARS / "smears.csv"), "--dst", str(tmp_path))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "column 'rbc_count'" in lines[0] and "--columns" in lines[0]
    assert not (tmp_path / "train.csv").exists()
