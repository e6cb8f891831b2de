"""HiCervix labels: fallback rules, the official 23-class protocol, the label tree and tree distances."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from datasets import DatasetError, hicervix_tree, hierarchical_distance, load_split
from datasets.hicervix import FALLBACKS, LEVEL_FALLBACKS
from datasets.layouts import SPLITS

# (level_1, level_2, level_3): a small tree with a known shape. Empty cells are missing labels.
KINDS = [
    ("SQUAMOUS", "ASC", "ASC-US"),
    ("SQUAMOUS", "ASC", "ASC-H"),
    ("SQUAMOUS", "HSIL", "HSIL-A"),
    ("SQUAMOUS", "LSIL", ""),  # level_3 leaf by fallback: LSIL
    ("GLANDULAR", "AGC", "AGC-NOS"),
    ("GLANDULAR", "AGC", ""),  # leaf AGC (official protocol: left out)
    ("GLANDULAR", "ADC", ""),  # leaf ADC (official protocol: left out)
    ("MICRO", "FUNGI", "CANDIDA"),
    ("NILM", "", ""),  # no label below level_1
]
PER_KIND = {"train": 3, "val": 2, "test": 1}

EXPECTED_TREE = {
    "ADC": ("GLANDULAR", "ADC"),
    "AGC": ("GLANDULAR", "AGC"),
    "AGC-NOS": ("GLANDULAR", "AGC"),
    "ASC-H": ("SQUAMOUS", "ASC"),
    "ASC-US": ("SQUAMOUS", "ASC"),
    "CANDIDA": ("MICRO", "FUNGI"),
    "HSIL-A": ("SQUAMOUS", "HSIL"),
    "LSIL": ("SQUAMOUS", "LSIL"),
}


def make_tree_dataset(root: Path, kinds=KINDS) -> Path:
    for split, n in PER_KIND.items():
        (root / split).mkdir(parents=True)
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_name", "class_name", "level_1", "level_2", "level_3"])
            for k, (l1, l2, l3) in enumerate(kinds):
                for i in range(n):
                    name = f"{split}_{k}_{i}.jpg"
                    writer.writerow([name, l3 or l2 or l1, l1, l2, l3])
                    (root / split / name).write_bytes(b"never decoded while listing")
    return root


@pytest.fixture
def tree_root(tmp_path: Path) -> Path:
    return make_tree_dataset(tmp_path / "hicervix")


def images(n_kinds: int) -> int:
    return n_kinds * sum(PER_KIND.values())


def test_fallback_names_match_the_registry() -> None:
    assert tuple(sorted(FALLBACKS)) == tuple(sorted(LEVEL_FALLBACKS))


@pytest.mark.parametrize(
    ("level", "fallback", "classes", "left_out_kinds"),
    [
        ("level_3", "original", sorted(EXPECTED_TREE), 1),  # NILM only
        ("level_3", "none", ["AGC-NOS", "ASC-H", "ASC-US", "CANDIDA", "HSIL-A"], 4),
        ("level_2", "original", ["ADC", "AGC", "ASC", "FUNGI", "HSIL", "LSIL"], 1),  # NILM has no level_2
        ("level_2", "parent", ["ADC", "AGC", "ASC", "FUNGI", "HSIL", "LSIL", "NILM"], 0),
        ("level_1", "original", ["GLANDULAR", "MICRO", "NILM", "SQUAMOUS"], 0),
    ],
)
def test_classes_and_left_out_per_fallback(tree_root: Path, level, fallback, classes, left_out_kinds) -> None:
    split = load_split(str(tree_root), "hicervix", shots=-1, level=level, level_fallback=fallback)
    assert split.classes == classes
    assert split.left_out == images(left_out_kinds)
    assert sum(split.sizes().values()) == images(len(KINDS) - left_out_kinds)


def test_official_protocol_drops_agc_agc_nos_and_adc_at_level_3(tree_root: Path) -> None:
    paper = load_split(str(tree_root), "hicervix", shots=-1)
    official = load_split(str(tree_root), "hicervix", shots=-1, protocol="official")
    assert set(paper.classes) - set(official.classes) == {"AGC", "AGC-NOS", "ADC"}
    assert official.left_out == paper.left_out + images(3)
    assert (paper.protocol, official.protocol) == ("paper", "official")
    # with no fallback, AGC and ADC cells have no level-3 label at all; AGC-NOS is dropped by the protocol
    strict = load_split(str(tree_root), "hicervix", shots=-1, protocol="official", level_fallback="none")
    assert strict.classes == ["ASC-H", "ASC-US", "CANDIDA", "HSIL-A"]
    # other levels keep every class
    level_2 = load_split(str(tree_root), "hicervix", shots=-1, level="level_2", protocol="official")
    assert "AGC" in level_2.classes and "ADC" in level_2.classes


def test_options_are_recorded_in_the_manifest_and_hash(tree_root: Path, tmp_path: Path) -> None:
    splits = {
        (fb, pr): load_split(str(tree_root), "hicervix", shots=2, level="level_1", level_fallback=fb, protocol=pr)
        for fb in LEVEL_FALLBACKS
        for pr in ("paper", "official")
    }
    # at level_1 the images are the same for every option, but the options still name the split
    assert len({s.sha256 for s in splits.values()}) == len(splits)
    assert len({json.dumps(s.train) for s in splits.values()}) == 1
    split = splits[("parent", "official")]
    assert split.manifest()["level_fallback"] == "parent" and split.manifest()["protocol"] == "official"
    split.write_manifest(tmp_path / "m.json")
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["level_fallback"] == "parent" and written["protocol"] == "official"
    assert written["split_sha256"] == split.sha256 and written["level"] == "level_1"


def test_tree_maps_each_level_3_label_to_its_ancestors(tree_root: Path) -> None:
    assert hicervix_tree(tree_root) == EXPECTED_TREE
    assert hicervix_tree(str(tree_root), level_fallback="none") == {
        k: EXPECTED_TREE[k] for k in ("AGC-NOS", "ASC-H", "ASC-US", "CANDIDA", "HSIL-A")
    }


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("ASC-US", "ASC-US", 0),
        ("ASC-US", "ASC-H", 1),  # same level-2 parent
        ("AGC-NOS", "AGC", 1),  # a level-2 label used as a leaf is a sibling of its children
        ("ASC-US", "HSIL-A", 2),  # same level-1 grandparent only
        ("ASC-US", "LSIL", 2),
        ("AGC", "ADC", 2),
        ("ASC-US", "CANDIDA", 3),
        ("LSIL", "AGC-NOS", 3),
    ],
)
def test_hierarchical_distance_known_answers(a: str, b: str, distance: int) -> None:
    assert hierarchical_distance(EXPECTED_TREE, a, b) == distance
    assert hierarchical_distance(EXPECTED_TREE, b, a) == distance


def test_hierarchical_distance_of_an_unknown_label() -> None:
    with pytest.raises(DatasetError, match="'NILM' is not a level-3 HiCervix label"):
        hierarchical_distance(EXPECTED_TREE, "ASC-US", "NILM")


def test_missing_ancestors_repeat_the_label_below(tmp_path: Path) -> None:
    root = make_tree_dataset(tmp_path / "h", kinds=[("", "ASC", "ASC-US"), ("", "", "LONE"), ("X", "Y", "Z")])
    tree = hicervix_tree(root)
    assert tree == {"ASC-US": ("ASC", "ASC"), "LONE": ("LONE", "LONE"), "Z": ("X", "Y")}
    assert hierarchical_distance(tree, "LONE", "Z") == 3


def test_a_label_with_two_parents_is_refused(tmp_path: Path) -> None:
    root = make_tree_dataset(tmp_path / "h", kinds=[("SQUAMOUS", "ASC", "ASC-US"), ("SQUAMOUS", "HSIL", "ASC-US")])
    with pytest.raises(DatasetError) as err:
        hicervix_tree(root)
    assert "'ASC-US' has two sets of ancestors" in str(err.value) and "\n" not in str(err.value)


def test_splits_keep_their_files(tree_root: Path) -> None:
    split = load_split(str(tree_root), "hicervix", shots=1, seed=4)
    for name in SPLITS:
        assert all(Path(p).parent.name == name for p, _ in split.items(name))
    assert split.counts()["train"] == dict.fromkeys(split.classes, 1)
