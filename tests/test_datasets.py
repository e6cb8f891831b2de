"""Readers, sampling, manifests and the `summary` CLI of the data layer, on tiny fixtures."""

from __future__ import annotations

import builtins
import csv
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import datasets
from datasets import DatasetError, load_image, load_split
from tests.conftest import REPO
from tests.conftest import run_datasets_cli as run_cli

# Images per class and split of the MLCC fixture: a mix of classes above and below K.
MLCC_SIZES = {
    "HSIL": {"train": 20, "val": 6, "test": 3},
    "LSIL": {"train": 10, "val": 3, "test": 2},
    "NL": {"train": 5, "val": 5, "test": 2},
    "SCC": {"train": 17, "val": 2, "test": 1},
}


def write_image(path: Path, seed: int = 0) -> None:
    """A 16x16 RGB image whose colour depends on ``seed``."""
    rng = random.Random(seed)
    Image.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3))).save(path)


def make_class_tree(base: Path, sizes: dict[str, dict[str, int]], ext: str, reverse: bool = False) -> None:
    """``base/<split>/<class>_<n><ext>`` files; ``reverse`` creates them in the opposite order."""
    jobs = [
        (cls, split, n) for cls, per in sizes.items() for split, k in per.items() for n in range(1, k + 1)
    ]
    for i, (cls, split, n) in enumerate(reversed(jobs) if reverse else jobs):
        (base / split).mkdir(parents=True, exist_ok=True)
        write_image(base / split / f"{cls}_{n}{ext}", seed=i)


@pytest.fixture
def mlcc_root(tmp_path: Path) -> Path:
    make_class_tree(tmp_path / "MLCC" / "images", MLCC_SIZES, ".jpg")
    return tmp_path


def expected_counts(sizes: dict, shots: int, percentage: float | None = None) -> dict:
    """The paper's rule, written independently of the implementation."""
    out: dict = {"train": {}, "val": {}, "test": {}}
    for cls, per in sizes.items():
        for split, n in per.items():
            if split == "test" or shots == -1:
                k = n
            elif shots > 0:
                k = min(n, shots if split == "train" else min(shots, 4))
            else:
                k = max(1, int(n * percentage / 100))
            out[split][cls] = k
    return out


def paths(split: datasets.Split, name: str) -> set[str]:
    return {p for p, _ in split.items(name)}


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("shots", [1, 2, 4, 16, -1])
def test_counts_per_class_follow_the_paper(mlcc_root: Path, shots: int) -> None:
    split = load_split(str(mlcc_root), "mlcc", shots=shots, seed=3)
    assert split.classes == ["HSIL", "LSIL", "NL", "SCC"]
    assert split.counts() == expected_counts(MLCC_SIZES, shots)
    assert split.shots == shots and split.level is None and split.percentage is None


@pytest.mark.parametrize("percentage", [1, 10, 33.3, 50, 100])
def test_percentage_keeps_int_n_p_over_100_at_least_one(mlcc_root: Path, percentage: float) -> None:
    split = load_split(str(mlcc_root), "mlcc", shots=0, seed=1, percentage=percentage)
    assert split.counts() == expected_counts(MLCC_SIZES, 0, percentage)
    assert split.percentage == percentage


def test_fewer_images_than_shots_warns_and_takes_all(mlcc_root: Path, capsys) -> None:
    split = load_split(str(mlcc_root), "mlcc", shots=16, seed=1)
    err = capsys.readouterr().err
    assert split.counts()["train"]["NL"] == 5
    assert "warning: class 'NL' has 5 image(s) in train" in err
    assert "'LSIL' has 10 image(s) in train" in err
    assert "'HSIL'" not in err and "'SCC' has 17" not in err
    assert "'SCC' has 2 image(s) in val, fewer than the 4" in err


def test_labels_match_file_names_and_paths_are_absolute(mlcc_root: Path) -> None:
    split = load_split(str(mlcc_root), "mlcc", shots=-1)
    for name in datasets.SPLITS:
        for path, label in split.items(name):
            assert os.path.isabs(path) and os.path.isfile(path)
            assert Path(path).name.startswith(split.classes[label] + "_")
            assert Path(path).parent.name == name


def test_splits_never_overlap(mlcc_root: Path) -> None:
    for shots, pct in [(1, None), (4, None), (16, None), (-1, None), (0, 50)]:
        split = load_split(str(mlcc_root), "mlcc", shots=shots, seed=5, percentage=pct)
        tr, va, te = paths(split, "train"), paths(split, "val"), paths(split, "test")
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert len(tr) == len(split.train)  # no duplicates either


def test_same_inputs_same_split(mlcc_root: Path) -> None:
    a = load_split(str(mlcc_root), "mlcc", shots=4, seed=7)
    b = load_split(str(mlcc_root), "mlcc", shots=4, seed=7)
    assert a == b and a.sha256 == b.sha256
    assert a.train == sorted(a.train)


def test_different_seeds_draw_different_images(mlcc_root: Path) -> None:
    draws = {
        tuple(sorted(paths(load_split(str(mlcc_root), "mlcc", shots=4, seed=s), "train"))) for s in range(4)
    }
    assert len(draws) == 4
    shas = {load_split(str(mlcc_root), "mlcc", shots=4, seed=s).sha256 for s in range(4)}
    assert len(shas) == 4


def test_smaller_k_is_a_subset_of_larger_k(mlcc_root: Path) -> None:
    k4 = paths(load_split(str(mlcc_root), "mlcc", shots=4, seed=2), "train")
    k16 = paths(load_split(str(mlcc_root), "mlcc", shots=16, seed=2), "train")
    assert k4 < k16


class _Listed:
    """What os.scandir returns, with its entries in a chosen order."""

    def __init__(self, entries):
        self.entries = entries

    def __enter__(self):
        return iter(self.entries)

    def __exit__(self, *exc):
        return False

    def __iter__(self):
        return iter(self.entries)


@pytest.mark.parametrize("order_seed", [0, 1])
def test_split_does_not_depend_on_listing_order(mlcc_root: Path, monkeypatch, order_seed: int) -> None:
    reference = load_split(str(mlcc_root), "mlcc", shots=4, seed=11)
    real_scandir = os.scandir

    def shuffled_scandir(path):
        with real_scandir(path) as it:
            entries = list(it)
        random.Random(order_seed).shuffle(entries)
        return _Listed(entries)

    monkeypatch.setattr(os, "scandir", shuffled_scandir)
    shuffled = load_split(str(mlcc_root), "mlcc", shots=4, seed=11)
    assert shuffled == reference


def test_same_files_created_in_another_order_elsewhere_give_the_same_manifest(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "a" / "MLCC" / "images", MLCC_SIZES, ".jpg")
    make_class_tree(tmp_path / "b" / "MLCC" / "images", MLCC_SIZES, ".jpg", reverse=True)
    a = load_split(str(tmp_path / "a"), "mlcc", shots=2, seed=4)
    b = load_split(str(tmp_path / "b"), "mlcc", shots=2, seed=4)
    assert a.root != b.root
    assert a.manifest() == b.manifest() and a.sha256 == b.sha256


def test_listing_never_decodes_an_image(mlcc_root: Path, monkeypatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened while listing")

    monkeypatch.setattr(Image, "open", no_decoding)
    assert load_split(str(mlcc_root), "mlcc", shots=2).counts()["test"]["HSIL"] == 3


@pytest.mark.parametrize(
    ("shots", "percentage", "culprit"),
    [
        (-2, None, "--shots -2"),
        (0, None, "--pourcentage"),
        (0, 0, "(0, 100]"),
        (0, 150, "150"),
        (0, -5, "-5"),
        (4, 10, "only with --shots 0"),
    ],
)
def test_bad_sampling_settings_are_refused(mlcc_root: Path, shots, percentage, culprit) -> None:
    with pytest.raises(DatasetError, match=None) as err:
        load_split(str(mlcc_root), "mlcc", shots=shots, percentage=percentage)
    assert culprit in str(err.value) and "\n" not in str(err.value)


def test_percentage_zero_with_few_shots_means_not_used(mlcc_root: Path) -> None:
    split = load_split(str(mlcc_root), "mlcc", shots=2, percentage=0)
    assert split.percentage is None and split.counts() == expected_counts(MLCC_SIZES, 2)


# --------------------------------------------------------------------------- other layouts


def test_bcfc_and_sipakmed_use_the_paper_class_order(tmp_path: Path) -> None:
    bcfc = {"benign": dict.fromkeys(datasets.SPLITS, 2), "malignant": dict.fromkeys(datasets.SPLITS, 3)}
    make_class_tree(tmp_path / "BCFC" / "images", bcfc, ".png")
    split = load_split(str(tmp_path), "bcfc", shots=-1)
    assert split.classes == ["malignant", "benign"]
    assert split.counts()["train"] == {"malignant": 3, "benign": 2}
    sip = {
        c: dict.fromkeys(datasets.SPLITS, 1)
        for c in ["Parabasal", "Superficial-Intermediate", "Dyskeratotic"]
    }
    sip |= {c: dict.fromkeys(datasets.SPLITS, 1) for c in ["Koilocytotic", "Metaplastic"]}
    make_class_tree(tmp_path / "sipakmed" / "images", sip, ".bmp")
    split = load_split(str(tmp_path), "sipakmed", shots=1)
    assert split.classes == [
        "Dyskeratotic",
        "Koilocytotic",
        "Metaplastic",
        "Parabasal",
        "Superficial-Intermediate",
    ]
    assert all(n == 1 for per in split.counts().values() for n in per.values())


def test_folder_infers_classes_with_dashes_spaces_and_underscores(tmp_path: Path) -> None:
    sizes = {
        "normal_columnar": {"train": 3, "val": 1, "test": 1},
        "ASC-US cell": {"train": 2, "val": 1, "test": 1},
    }
    make_class_tree(tmp_path, sizes, ".png")
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".hidden_1.png").write_bytes(b"")
    split = load_split(str(tmp_path), "folder", shots=-1)
    assert split.classes == ["ASC-US cell", "normal_columnar"]
    assert split.counts()["train"] == {"ASC-US cell": 2, "normal_columnar": 3}


# --------------------------------------------------------------------------- HiCervix

# (image, level_1, level_2, level_3, class_name) rows covering each fallback case.
HICERVIX_ROWS = [
    ("full.jpg", "A", "A1", "A1a", "A1a"),  # labelled at every level
    ("no_l3.jpg", "A", "A1", "", "A1"),  # level_3 falls back to level_2
    ("nan_l3.jpg", "C", "C1", "nan", "C1"),  # pandas' NaN text counts as missing
    ("only_l1.jpg", "B", "", "", "B"),  # level_2 falls back to level_1; no label at level_3
    ("none.jpg", "", "", "", ""),  # no label at all
]


def make_hicervix(
    root: Path, rows=HICERVIX_ROWS, columns=("image_name", "level_1", "level_2", "level_3", "class_name")
) -> None:
    for split in datasets.SPLITS:
        (root / split).mkdir(parents=True)
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for name, l1, l2, l3, cname in rows:
                full = {"image_name": name, "level_1": l1, "level_2": l2, "level_3": l3, "class_name": cname}
                writer.writerow([full[c] for c in columns])
                (root / split / name).write_bytes(b"not decoded while listing")


def labels_by_name(split: datasets.Split) -> dict[str, str]:
    return {Path(p).name: split.classes[label] for p, label in split.train}


ALL_FOUR = {"full.jpg": "A", "no_l3.jpg": "A", "nan_l3.jpg": "C", "only_l1.jpg": "B"}
BY_NAME = {"full.jpg": "A1a", "no_l3.jpg": "A1", "nan_l3.jpg": "C1", "only_l1.jpg": "B"}


@pytest.mark.parametrize(
    ("fallback", "level", "expected", "left_out_per_split"),
    [
        # original (mdausort/Cytology-fine-tuning): level_3 falls back to level_2, nothing else falls back
        ("original", "level_3", {"full.jpg": "A1a", "no_l3.jpg": "A1", "nan_l3.jpg": "C1"}, 2),
        ("original", "level_2", {"full.jpg": "A1", "no_l3.jpg": "A1", "nan_l3.jpg": "C1"}, 2),
        ("original", "level_1", ALL_FOUR, 1),
        ("original", "class_name", BY_NAME, 1),
        # parent: each level falls back one step to its parent
        ("parent", "level_3", {"full.jpg": "A1a", "no_l3.jpg": "A1", "nan_l3.jpg": "C1"}, 2),
        ("parent", "level_2", {"full.jpg": "A1", "no_l3.jpg": "A1", "nan_l3.jpg": "C1", "only_l1.jpg": "B"}, 1),
        ("parent", "level_1", ALL_FOUR, 1),
        # none: only the labels written at that level
        ("none", "level_3", {"full.jpg": "A1a"}, 4),
        ("none", "level_2", {"full.jpg": "A1", "no_l3.jpg": "A1", "nan_l3.jpg": "C1"}, 2),
        ("none", "level_1", ALL_FOUR, 1),
    ],
)
def test_hicervix_hierarchy_fallback(tmp_path: Path, fallback, level, expected, left_out_per_split) -> None:
    make_hicervix(tmp_path)
    split = load_split(str(tmp_path), "hicervix", shots=-1, level=level, level_fallback=fallback)
    assert labels_by_name(split) == expected
    assert split.classes == sorted(set(expected.values()))
    assert split.left_out == 3 * left_out_per_split
    assert split.level == level and split.level_fallback == fallback and split.protocol == "paper"


def test_hicervix_default_level_is_level_3_and_each_csv_is_read_once(tmp_path: Path, monkeypatch) -> None:
    make_hicervix(tmp_path)
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    split = load_split(str(tmp_path), "hicervix", shots=1, seed=0)
    monkeypatch.setattr(builtins, "open", real_open)
    assert split.level == "level_3"
    assert sorted(Path(f).name for f in opened if f.endswith(".csv")) == ["test.csv", "train.csv", "val.csv"]
    assert sum(split.counts()["test"].values()) == 3


# --------------------------------------------------------------------------- manifest


def test_manifest_is_relative_and_hashed_canonically(mlcc_root: Path, tmp_path: Path) -> None:
    split = load_split(str(mlcc_root), "mlcc", shots=2, seed=1)
    doc = split.manifest()
    assert doc["classes"] == split.classes
    assert doc["train"][0][0].startswith("MLCC/images/train/")
    assert all(not os.path.isabs(rel) for name in datasets.SPLITS for rel, _ in doc[name])
    assert [label for _, label in doc["test"]] == [label for _, label in split.test]
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    assert split.sha256 == hashlib.sha256(canonical.encode()).hexdigest()
    out = tmp_path / "out" / "split.json"
    split.write_manifest(out)
    written = json.loads(out.read_text())
    assert written["split_sha256"] == split.sha256 and written["seed"] == 1 and written["shots"] == 2
    assert {k: written[k] for k in doc} == doc


# --------------------------------------------------------------------------- images


def test_load_image_gives_rgb_and_names_an_undecodable_file(tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    Image.new("L", (16, 16), 90).save(grey)
    img = load_image(grey)
    assert img.mode == "RGB" and img.size == (16, 16) and img.getpixel((3, 3)) == (90, 90, 90)
    bad = tmp_path / "broken_1.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DatasetError, match="broken_1.jpg"):
        load_image(bad)
    with pytest.raises(DatasetError, match="absent.png"):
        load_image(tmp_path / "absent.png")


# --------------------------------------------------------------------------- CLI


def test_summary_prints_one_json_document(mlcc_root: Path) -> None:
    done = run_cli(
        "summary", "--root_path", str(mlcc_root), "--dataset", "mlcc", "--shots", "4", "--seed", "2"
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    split = load_split(str(mlcc_root), "mlcc", shots=4, seed=2)
    assert doc == {
        "task": "single_label",
        "classes": split.classes,
        "counts": split.counts(),
        "images": {"train": 4 * 4, "val": 4 + 3 + 4 + 2, "test": 3 + 2 + 2 + 1},
        "split_sha256": split.sha256,
        "left_out": 0,
    }


def test_summary_percentage_spellings_agree(mlcc_root: Path) -> None:
    base = ["summary", "--root_path", str(mlcc_root), "--dataset", "mlcc", "--shots", "0"]
    fr = json.loads(run_cli(*base, "--pourcentage", "50").stdout)
    en = json.loads(run_cli(*base, "--percentage", "50").stdout)
    assert fr == en and fr["counts"] == expected_counts(MLCC_SIZES, 0, 50)


def test_summary_hicervix_level_and_left_out(tmp_path: Path) -> None:
    make_hicervix(tmp_path)
    base = ["summary", "--root_path", str(tmp_path), "--dataset", "hicervix", "--shots", "-1", "--level", "level_2"]
    doc = json.loads(run_cli(*base).stdout)
    assert doc["classes"] == ["A1", "C1"] and doc["left_out"] == 6
    assert doc["counts"]["test"] == {"A1": 2, "C1": 1}
    doc = json.loads(run_cli(*base, "--level_fallback", "parent").stdout)
    assert doc["classes"] == ["A1", "B", "C1"] and doc["left_out"] == 3
    assert doc["counts"]["test"] == {"A1": 2, "B": 1, "C1": 1}


def test_import_does_not_load_torch() -> None:
    code = "import sys, datasets; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.stdout.strip() == "[]", done.stderr


def _bad_mlcc(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """Break an MLCC fixture in one way; return summary arguments and the text the error must name."""
    make_class_tree(tmp_path / "MLCC" / "images", MLCC_SIZES, ".jpg")
    images = tmp_path / "MLCC" / "images"
    args = ["summary", "--root_path", str(tmp_path), "--dataset", "mlcc", "--shots", "2"]
    if case == "missing root":
        return ["summary", "--root_path", str(tmp_path / "nowhere"), "--dataset", "mlcc"], "nowhere"
    if case == "missing split":
        for f in (images / "val").iterdir():
            f.unlink()
        (images / "val").rmdir()
        return args, str(images / "val")
    if case == "empty split":
        for f in (images / "test").iterdir():
            f.unlink()
        return args, str(images / "test")
    if case == "unknown class":
        write_image(images / "train" / "ASCUS_1.jpg")
        return args, "ASCUS_1.jpg"
    if case == "no class in name":
        write_image(images / "val" / "picture.jpg")
        return args, "picture.jpg"
    if case == "undecodable":
        (images / "test" / "SCC_1.jpg").write_bytes(b"garbage")
        return [*args, "--decode"], "SCC_1.jpg"
    if case == "bad shots":
        return [*args[:-1], "-2"], "--shots -2"
    if case == "shots 0 alone":
        return [*args[:-1], "0"], "--pourcentage"
    if case == "bad percentage":
        return [*args[:-1], "0", "--pourcentage", "120"], "120"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing root",
        "missing split",
        "empty split",
        "unknown class",
        "no class in name",
        "undecodable",
        "bad shots",
        "shots 0 alone",
        "bad percentage",
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path: Path, case: str) -> None:
    args, culprit = _bad_mlcc(tmp_path, case)
    done = run_cli(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], done.stderr
    if case in ("missing root", "missing split", "empty split"):
        assert "MLCC/images/{train,val,test}" in lines[0] and "python -m datasets prepare mlcc" in lines[0]


@pytest.mark.parametrize("case", ["missing column", "missing images", "missing csv"])
def test_bad_hicervix_gives_one_clear_line(tmp_path: Path, case: str) -> None:
    if case == "missing column":
        make_hicervix(tmp_path, columns=("image_name", "level_1", "level_3"))
        culprit = "level_2"
    elif case == "missing csv":
        make_hicervix(tmp_path)
        (tmp_path / "val.csv").unlink()
        culprit = "val.csv"
    else:
        rows = HICERVIX_ROWS + [(f"gone_{i}.jpg", "A", "A1", "A1a", "A1a") for i in range(7)]
        make_hicervix(tmp_path, rows=rows)
        for split in datasets.SPLITS:
            for i in range(7):
                (tmp_path / split / f"gone_{i}.jpg").unlink()
        culprit = "7 image(s) listed in"
    done = run_cli("summary", "--root_path", str(tmp_path), "--dataset", "hicervix", "--shots", "1")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], done.stderr
    if case == "missing images":
        assert "gone_0.jpg, gone_1.jpg, gone_2.jpg, gone_3.jpg, gone_4.jpg, ..." in lines[0]
        assert "gone_5.jpg" not in lines[0]


def test_api_errors_are_dataset_errors(tmp_path: Path) -> None:
    from common.errors import UserError

    assert issubclass(DatasetError, UserError)
    with pytest.raises(DatasetError, match="unknown dataset 'cifar'"):
        load_split(str(tmp_path), "cifar")
    with pytest.raises(DatasetError, match="--root_path is required for mlcc"):
        load_split(None, "mlcc")
    make_hicervix(tmp_path)
    with pytest.raises(DatasetError, match="unknown hicervix level 'level_4'"):
        load_split(str(tmp_path), "hicervix", level="level_4")
