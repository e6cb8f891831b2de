"""`python -m datasets prepare`: raw Kaggle-style trees to paper layouts, grouped splits, HiCervix check."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from datasets import SPLITS, load_split
from datasets.assign import split_sizes
from tests.conftest import run_datasets_cli as run_cli


def write_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (value % 256, (3 * value) % 256, 77)).save(path)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def prepare(*args: str) -> dict:
    done = run_cli("prepare", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def sources(root: Path) -> list[dict[str, str]]:
    with open(root / "sources.csv", newline="") as f:
        return list(csv.DictReader(f))


# Raw MLCC as on Kaggle: long class names, nested under a wrapper folder.
MLCC_RAW = {
    "High squamous intra-epithelial lesion": ("HSIL", 12),
    "Low squamous intra-epithelial lesion": ("LSIL", 7),
    "Negative for Intraepithelial malignancy": ("NL", 20),
    "Squamous cell carcinoma": ("SCC", 5),
}


@pytest.fixture
def mlcc_raw(tmp_path: Path) -> Path:
    src = tmp_path / "raw"
    for i, (folder, (_, n)) in enumerate(MLCC_RAW.items()):
        for k in range(n):
            write_image(src / "Liquid-based cytology" / folder / f"IMG {k:03d}.JPG", 10 * i + k)
    (src / "README.txt").write_text("dataset notes")
    return src


def test_mlcc_from_kaggle_names(mlcc_raw: Path, tmp_path: Path) -> None:
    before = snapshot(mlcc_raw)
    report = prepare("mlcc", "--src", str(mlcc_raw), "--dst", str(tmp_path / "data"), "--seed", "0")
    assert snapshot(mlcc_raw) == before  # copied, never moved or modified
    for cls, n in MLCC_RAW.values():
        assert list(report["counts"][cls].values()) == list(split_sizes(n, (70, 10, 20)))
    images = tmp_path / "data" / "MLCC" / "images"
    names = sorted(p.name for s in SPLITS for p in (images / s).iterdir())
    assert names == sorted(f"{cls}_{k}.jpg" for cls, n in MLCC_RAW.values() for k in range(1, n + 1))
    split = load_split(str(tmp_path / "data"), "mlcc", shots=-1)
    assert {c: sum(split.counts()[s][c] for s in SPLITS) for c in split.classes} == dict(MLCC_RAW.values())
    # every written file is a byte copy of the source named in sources.csv
    for row in sources(tmp_path / "data" / "MLCC"):
        written = tmp_path / "data" / "MLCC" / row["file"]
        assert written.read_bytes() == (mlcc_raw / row["source"]).read_bytes()
        assert written.name.startswith(row["label"] + "_")


def test_seed_decides_the_split_reproducibly(mlcc_raw: Path, tmp_path: Path) -> None:
    for name, seed in [("a", "3"), ("b", "3"), ("c", "4")]:
        prepare("mlcc", "--src", str(mlcc_raw), "--dst", str(tmp_path / name), "--seed", seed)

    def assignment(name: str) -> dict[str, str]:
        return {r["source"]: r["file"].split("/")[1] for r in sources(tmp_path / name / "MLCC")}

    assert assignment("a") == assignment("b")
    assert assignment("a") != assignment("c")


def test_bcfc_case_insensitive_folders_and_custom_ratios(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    for k in range(10):
        write_image(src / "BENIGN" / f"b{k}.png", k)
        write_image(src / "Malignant" / f"m{k}.png", 50 + k)
    report = prepare("bcfc", "--src", str(src), "--dst", str(tmp_path / "data"), "--ratios", "60", "20", "20")
    assert report["counts"] == {
        "malignant": {"train": 6, "val": 2, "test": 2},
        "benign": {"train": 6, "val": 2, "test": 2},
    }
    assert load_split(str(tmp_path / "data"), "bcfc", shots=-1).classes == ["malignant", "benign"]


SIPAKMED_RAW = {
    "Dyskeratotic": 4,
    "Koilocytotic": 5,
    "Metaplastic": 3,
    "Parabasal": 4,
    "Superficial-Intermediate": 6,
}


def test_sipakmed_nested_layout_uses_only_the_cropped_cells(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    for i, (cls, n) in enumerate(SIPAKMED_RAW.items()):
        inner = src / f"im_{cls}" / f"im_{cls}"
        write_image(inner / "001.bmp", 200 + i)  # whole slide image: not a cell, must be skipped
        (inner / "001_cyt01.dat").write_text("1,2\n")
        for k in range(n):
            write_image(inner / "CROPPED" / f"001_{k:02d}.bmp", 10 * i + k)
    report = prepare("sipakmed", "--src", str(src), "--dst", str(tmp_path / "data"))
    assert {c: sum(v.values()) for c, v in report["counts"].items()} == SIPAKMED_RAW
    assert all("/CROPPED/" in r["source"] for r in sources(tmp_path / "data" / "sipakmed"))
    split = load_split(str(tmp_path / "data"), "sipakmed", shots=-1)
    assert split.classes == list(SIPAKMED_RAW)
    assert all(Path(p).suffix == ".bmp" for p, _ in split.test)


def test_missing_class_folder_is_named(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    for cls in ["HSIL", "LSIL", "NL"]:
        write_image(src / cls / "a.jpg", 1)
    line = one_error_line(run_cli("prepare", "mlcc", "--src", str(src), "--dst", str(tmp_path / "d")))
    assert "SCC" in line and str(src) in line


def test_destination_rules(mlcc_raw: Path, tmp_path: Path) -> None:
    dst = tmp_path / "data"
    prepare("mlcc", "--src", str(mlcc_raw), "--dst", str(dst), "--seed", "1")
    first = snapshot(dst)
    line = one_error_line(
        run_cli("prepare", "mlcc", "--src", str(mlcc_raw), "--dst", str(dst), "--seed", "2")
    )
    assert "not empty" in line and "--overwrite" in line
    assert snapshot(dst) == first
    prepare("mlcc", "--src", str(mlcc_raw), "--dst", str(dst), "--seed", "2", "--overwrite")
    assert snapshot(dst) != first and sum(1 for _ in (dst / "MLCC" / "images").rglob("*.jpg")) == 44
    assert not [p for p in dst.iterdir() if p.name.startswith(".")]  # no temporary folders left
    (dst / "MLCC" / "mine.txt").write_text("keep")
    line = one_error_line(
        run_cli("prepare", "mlcc", "--src", str(mlcc_raw), "--dst", str(dst), "--overwrite")
    )
    assert "mine.txt" in line and (dst / "MLCC" / "mine.txt").exists()
    line = one_error_line(run_cli("prepare", "mlcc", "--src", str(mlcc_raw), "--dst", str(mlcc_raw / "out")))
    assert "overlaps the source" in line
    line = one_error_line(run_cli("prepare", "mlcc", "--src", str(tmp_path / "absent"), "--dst", str(dst)))
    assert "absent" in line


def test_folder_without_manifest(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    for k in range(10):
        write_image(src / "normal_columnar" / f"x{k}.png", k)
        write_image(src / "ASC-US cell" / "deeper" / f"y{k}.jpeg", 40 + k)
    report = prepare("folder", "--src", str(src), "--dst", str(tmp_path / "out"))
    assert report["counts"]["normal_columnar"] == {"train": 7, "val": 1, "test": 2}
    split = load_split(str(tmp_path / "out"), "folder", shots=-1)
    assert split.classes == ["ASC-US cell", "normal_columnar"]
    assert {Path(p).suffix for p, _ in split.train} == {".png", ".jpeg"}


def make_grouped(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A tree whose manifest gives labels (not the folder names) and groups of 1 to 4 images."""
    src = tmp_path / "raw"
    rows, group_of = [], {}
    k = 0
    for g in range(30):
        label = ["alpha", "beta", "gamma"][g % 3]
        for j in range(1 + g % 4):
            rel = f"imgs/{'a' if g % 2 else 'b'}/{g}_{j}.jpg"
            write_image(src / rel, k)
            rows.append((rel, label, f"slide{g}"))
            group_of[rel] = f"slide{g}"
            k += 1
    write_image(src / "imgs" / "unlisted.jpg", 999)
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "group"), *rows])
    return src, manifest, group_of


def test_folder_with_manifest_keeps_groups_together(tmp_path: Path) -> None:
    src, manifest, group_of = make_grouped(tmp_path)
    done = run_cli(
        "prepare",
        "folder",
        "--src",
        str(src),
        "--dst",
        str(tmp_path / "out"),
        "--manifest",
        str(manifest),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert "1 image(s)" in done.stderr and "not listed" in done.stderr
    report = json.loads(done.stdout)
    splits_of_group = defaultdict(set)
    for row in sources(tmp_path / "out"):
        assert row["group"] == group_of[row["source"]]
        splits_of_group[row["group"]].add(row["file"].split("/")[0])
    assert len(splits_of_group) == 30 and all(len(s) == 1 for s in splits_of_group.values())
    assert report["images"] == len(group_of) and sum(report["groups"].values()) == 30
    for cls, per in report["counts"].items():
        assert per["train"] > per["test"] > 0 and per["val"] > 0, (cls, per)
    split = load_split(str(tmp_path / "out"), "folder", shots=-1)
    assert split.counts() == {s: {c: report["counts"][c][s] for c in split.classes} for s in SPLITS}


def test_folder_manifest_problems(tmp_path: Path) -> None:
    src, manifest, _ = make_grouped(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label,group\nimgs/a/1_0.jpg,alpha,s1\n")
    line = one_error_line(
        run_cli("prepare", "folder", "--src", str(src), "--dst", str(tmp_path / "o"), "--manifest", str(bad))
    )
    assert "no column path" in line
    bad.write_text("path,label,group\nimgs/a/1_0.jpg,alpha,s1\nimgs/nothere.jpg,beta,s2\n")
    line = one_error_line(
        run_cli("prepare", "folder", "--src", str(src), "--dst", str(tmp_path / "o"), "--manifest", str(bad))
    )
    assert "imgs/nothere.jpg" in line
    line = one_error_line(
        run_cli(
            "prepare", "mlcc", "--src", str(src), "--dst", str(tmp_path / "o"), "--manifest", str(manifest)
        )
    )
    assert "--manifest" in line


def test_folder_finds_its_manifest_and_warns_without_groups(tmp_path: Path) -> None:
    src, manifest, group_of = make_grouped(tmp_path)
    (src / "manifest.csv").write_text(manifest.read_text())
    done = run_cli("prepare", "folder", "--src", str(src), "--dst", str(tmp_path / "auto"), "--json")
    assert done.returncode == 0, done.stderr
    assert f"using {src / 'manifest.csv'}" in done.stderr and "without groups" not in done.stderr
    assert sum(json.loads(done.stdout)["groups"].values()) == 30
    assert {r["group"] for r in sources(tmp_path / "auto")} == set(group_of.values())
    # an explicit --manifest wins and is not announced
    done = run_cli("prepare", "folder", "--src", str(src), "--dst", str(tmp_path / "explicit"),
                   "--manifest", str(manifest))
    assert done.returncode == 0 and "using" not in done.stderr
    # rows without a group are split one by one, and said so
    rows = manifest.read_text().splitlines()
    partial = [rows[0]] + [r.rsplit(",", 1)[0] + "," if i < 5 else r for i, r in enumerate(rows[1:])]
    (src / "manifest.csv").write_text("\n".join(partial) + "\n")
    done = run_cli("prepare", "folder", "--src", str(src), "--dst", str(tmp_path / "partial"))
    assert done.returncode == 0 and f"5 of {len(rows) - 1} image(s)" in done.stderr and "no group" in done.stderr
    # class folders alone carry no groups
    (src / "manifest.csv").unlink()
    done = run_cli("prepare", "folder", "--src", str(src), "--dst", str(tmp_path / "plain"))
    assert done.returncode == 0 and "without groups" in done.stderr and "using" not in done.stderr


def test_prepare_help_documents_the_default_ratios() -> None:
    done = run_cli("prepare", "--help")
    text = " ".join(done.stdout.split())
    assert done.returncode == 0 and "(default 70/10/20)" in text and "default ratios 70/10/20 percent" in text


def make_hicervix_raw(root: Path, missing: int = 0) -> None:
    rows = [("a.jpg", "A", "A1", "A1a"), ("b.jpg", "A", "A1", ""), ("c.jpg", "B", "", "")]
    rows += [(f"lost_{i}.jpg", "A", "A1", "A1a") for i in range(missing)]
    for split in SPLITS:
        (root / split).mkdir(parents=True)
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_name", "class_name", "level_1", "level_2", "level_3"])
            for name, l1, l2, l3 in rows:
                writer.writerow([name, l3 or l2 or l1, l1, l2, l3])
                if not name.startswith("lost_"):
                    (root / split / name).write_bytes(b"")


def test_hicervix_check_reports_counts(tmp_path: Path) -> None:
    make_hicervix_raw(tmp_path / "hc")
    before = snapshot(tmp_path / "hc")
    report = prepare("hicervix", "--src", str(tmp_path / "hc"))
    assert snapshot(tmp_path / "hc") == before
    assert report["images"] == {"train": 3, "val": 3, "test": 3}
    # c.jpg has only a level_1 label: at level_2 and level_3 it is left out (the original rules)
    assert report["classes"] == {"level_1": 2, "level_2": 1, "level_3": 2, "class_name": 3}
    assert report["left_out"] == {"level_1": 0, "level_2": 3, "level_3": 3, "class_name": 0}
    assert report["counts"]["level_3"] == {
        "A1": {"train": 1, "val": 1, "test": 1},
        "A1a": {"train": 1, "val": 1, "test": 1},
    }
    text = run_cli("prepare", "hicervix", "--src", str(tmp_path / "hc"))
    assert text.returncode == 0 and "level_3: 2 classes, 3 image(s) without a label" in text.stdout


def test_hicervix_check_names_missing_images_and_columns(tmp_path: Path) -> None:
    make_hicervix_raw(tmp_path / "hc", missing=7)
    line = one_error_line(run_cli("prepare", "hicervix", "--src", str(tmp_path / "hc")))
    assert "7 image(s)" in line and "lost_0.jpg, lost_1.jpg, lost_2.jpg, lost_3.jpg, lost_4.jpg, ..." in line
    make_hicervix_raw(tmp_path / "hc2")
    (tmp_path / "hc2" / "test.csv").write_text("image_name,level_1,level_3\na.jpg,A,A1a\n")
    line = one_error_line(run_cli("prepare", "hicervix", "--src", str(tmp_path / "hc2")))
    assert "test.csv" in line and "level_2" in line
