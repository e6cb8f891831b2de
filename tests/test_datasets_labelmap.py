"""Label maps: merging classes at load time, before sampling; parsing; errors; real Herlev data."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from datasets import DatasetError, load_split, parse_label_map
from datasets.__main__ import main as datasets_main
from tests.conftest import SHARED_DATA

HERLEV = SHARED_DATA / "herlev"
HERLEV_COUNTS = {
    "carcinoma_in_situ": 150,
    "light_dysplastic": 182,
    "moderate_dysplastic": 146,
    "normal_columnar": 98,
    "normal_intermediate": 70,
    "normal_superficiel": 74,
    "severe_dysplastic": 197,
}
NORMAL_ABNORMAL = (
    "normal=normal_columnar,normal_intermediate,normal_superficiel;"
    "abnormal=carcinoma_in_situ,light_dysplastic,moderate_dysplastic,severe_dysplastic"
)
SIZES = {"HSIL": (9, 5, 3), "LSIL": (6, 2, 2), "NL": (10, 5, 4), "SCC": (3, 3, 1)}


@pytest.fixture
def mlcc_root(tmp_path: Path) -> Path:
    for cls, per_split in SIZES.items():
        for split, n in zip(("train", "val", "test"), per_split, strict=True):
            folder = tmp_path / "MLCC" / "images" / split
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{cls}_{i}.jpg")
    return tmp_path


def run_in_process(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = datasets_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_parse_inline_and_json(tmp_path: Path) -> None:
    expected = {"SIL": ["HSIL", "LSIL"], "other": ["SCC"]}
    assert parse_label_map(" SIL = HSIL, LSIL ; other=SCC; ") == expected
    path = tmp_path / "map.json"
    path.write_text(json.dumps(expected))
    assert parse_label_map(str(path)) == expected
    assert list(parse_label_map("b=x;a=y")) == ["b", "a"]  # the map's order is kept


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        ("SIL HSIL,LSIL", "cannot read label map part 'SIL HSIL,LSIL'"),
        ("=HSIL", "cannot read label map part '=HSIL'"),
        ("SIL=HSIL;SIL=LSIL", "gives class 'SIL' twice"),
        ("SIL=", "class 'SIL' needs a name and at least one old class"),
        ("missing.json", "label map missing.json not found"),
    ],
)
def test_parse_errors_are_one_line(text: str, culprit: str) -> None:
    with pytest.raises(DatasetError) as err:
        parse_label_map(text)
    assert culprit in str(err.value) and "\n" not in str(err.value)


def test_json_of_the_wrong_shape(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"SIL": "HSIL"}))
    with pytest.raises(DatasetError, match="class 'SIL' must map to a list of class names"):
        parse_label_map(path)
    path.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="must map each new class to a list of old classes"):
        parse_label_map(path)


def test_merged_classes_are_sampled_as_one(mlcc_root: Path) -> None:
    split = load_split(str(mlcc_root), "mlcc", shots=-1, label_map={"SIL": ["HSIL", "LSIL"]})
    assert split.classes == ["SIL", "NL", "SCC"]  # new classes first, then the others in paper order
    assert split.counts()["train"] == {"SIL": 15, "NL": 10, "SCC": 3}
    # shots count the merged class: 4 SIL images, not 4 HSIL + 4 LSIL
    few = load_split(str(mlcc_root), "mlcc", shots=4, seed=2, label_map="SIL=HSIL,LSIL")
    assert few.counts() == {
        "train": {"SIL": 4, "NL": 4, "SCC": 3},
        "val": {"SIL": 4, "NL": 4, "SCC": 3},
        "test": {"SIL": 5, "NL": 4, "SCC": 1},
    }
    names = {Path(p).name.split("_")[0] for p, label in few.train if label == 0}
    assert names <= {"HSIL", "LSIL"}


def test_map_is_recorded_and_hashed(mlcc_root: Path, tmp_path: Path) -> None:
    plain = load_split(str(mlcc_root), "mlcc", shots=2, seed=1)
    as_dict = load_split(str(mlcc_root), "mlcc", shots=2, seed=1, label_map={"SIL": ["HSIL", "LSIL"]})
    as_text = load_split(str(mlcc_root), "mlcc", shots=2, seed=1, label_map="SIL=HSIL,LSIL")
    assert as_dict == as_text and as_dict.sha256 == as_text.sha256 != plain.sha256
    assert as_dict.manifest()["label_map"] == {"SIL": ["HSIL", "LSIL"]}
    assert "label_map" not in plain.manifest() and plain.label_map is None
    renamed = load_split(str(mlcc_root), "mlcc", shots=2, seed=1, label_map="NILM=NL")
    assert renamed.classes == ["NILM", "HSIL", "LSIL", "SCC"]
    as_dict.write_manifest(tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["label_map"] == {"SIL": ["HSIL", "LSIL"]}


@pytest.mark.parametrize(
    ("mapping", "culprit"),
    [
        ("A=HSIL,LSIL;B=LSIL", "label map names class 'LSIL' twice (in 'A' and 'B')"),
        ("A=HSIL,ASCUS", "label map names class 'ASCUS', which mlcc does not have (classes: HSIL, LSIL, NL, SCC)"),
        ("NL=HSIL", "label map class 'NL' is also a class it does not list"),
    ],
)
def test_bad_maps_name_the_class(mlcc_root: Path, mapping: str, culprit: str) -> None:
    with pytest.raises(DatasetError) as err:
        load_split(str(mlcc_root), "mlcc", shots=2, label_map=mapping)
    assert culprit in str(err.value) and "\n" not in str(err.value)
    code, _, stderr = run_in_process(
        "summary", "--root_path", str(mlcc_root), "--dataset", "mlcc", "--label_map", mapping
    )
    assert code == 2 and stderr.strip().splitlines() == [f"error: {err.value}"]


@pytest.fixture(scope="module")
def herlev_root(herlev_prepared) -> tuple[Path, str]:
    """Herlev prepared as a folder dataset (grouped by source image from its manifest.csv), once per session."""
    return herlev_prepared


def test_herlev_seven_classes_become_normal_and_abnormal(herlev_root) -> None:
    root, prepare_log = herlev_root
    assert f"using {HERLEV / 'manifest.csv'}" in prepare_log  # prepare folder found the manifest itself
    seven = load_split(str(root), "folder", shots=-1)
    assert {c: sum(seven.counts()[s][c] for s in seven.counts()) for c in seven.classes} == HERLEV_COUNTS
    two = load_split(str(root), "folder", shots=-1, label_map=NORMAL_ABNORMAL)
    assert two.classes == ["normal", "abnormal"]
    totals = {c: sum(two.counts()[s][c] for s in two.counts()) for c in two.classes}
    assert totals == {"normal": 98 + 70 + 74, "abnormal": 150 + 182 + 146 + 197}
    assert [p for p, _ in two.test] == [p for p, _ in seven.test]
    normal = {seven.classes[label].startswith("normal_") for _, label in seven.test}
    assert normal == {True, False}
    assert all(
        two.classes[b] == ("normal" if seven.classes[a].startswith("normal_") else "abnormal")
        for (_, a), (_, b) in zip(seven.test, two.test, strict=True)
    )
    few = load_split(str(root), "folder", shots=16, seed=3, label_map=NORMAL_ABNORMAL)
    assert few.counts()["train"] == {"normal": 16, "abnormal": 16}
    assert few.counts()["val"] == {"normal": 4, "abnormal": 4}


def test_herlev_summary_with_a_label_map(herlev_root) -> None:
    root, _ = herlev_root
    code, out, err = run_in_process(
        "summary", "--root_path", str(root), "--dataset", "folder", "--shots", "8", "--label_map", NORMAL_ABNORMAL
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["classes"] == ["normal", "abnormal"] and doc["counts"]["train"] == {"normal": 8, "abnormal": 8}
