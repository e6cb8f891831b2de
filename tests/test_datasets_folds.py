"""Cross-validation folds: disjoint, covering, group-preserving, stable under listing order."""

import random

import pytest

from datasets import DatasetError, load_split
from datasets.folds import assign_folds
from tests.conftest import make_folder_dataset


def items_and_groups(n_groups=12, per_group=3, classes=("a", "b", "c")):
    items, groups = [], {}
    for g in range(n_groups):
        for i in range(per_group):
            rel = f"x/{g}_{i}.png"
            items.append((rel, classes[g % len(classes)]))
            groups[rel] = f"patient{g}"
    return items, groups


def test_folds_are_disjoint_cover_everything_and_keep_groups_whole():
    items, groups = items_and_groups()
    folds = assign_folds(items, groups, 4, seed=1)
    assert set(folds) == {rel for rel, _ in items} and set(folds.values()) == {0, 1, 2, 3}
    for g in set(groups.values()):
        assert len({folds[rel] for rel, grp in groups.items() if grp == g}) == 1
    per_fold = [sum(1 for f in folds.values() if f == k) for k in range(4)]
    assert max(per_fold) - min(per_fold) <= 3  # one group of 3 at most between folds
    for label in "abc":  # each class spread over the folds
        assert len({folds[rel] for rel, lab in items if lab == label}) >= 3


def test_folds_do_not_depend_on_listing_order_but_on_the_seed():
    items, groups = items_and_groups()
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    assert assign_folds(items, groups, 3, seed=1) == assign_folds(shuffled, groups, 3, seed=1)
    assert assign_folds(items, groups, 3, seed=1) != assign_folds(items, groups, 3, seed=2)


def test_cv_replaces_train_and_val_and_leaves_test(tmp_path):
    root = make_folder_dataset(tmp_path / "d", {"train": 6, "val": 3, "test": 4})
    plain = load_split(str(root), "folder", shots=-1, seed=1)
    pool = sorted(plain.train + plain.val)
    vals = []
    for fold in range(3):
        s = load_split(str(root), "folder", shots=-1, seed=1, cv=3, fold=fold)
        assert s.test == plain.test and sorted(s.train + s.val) == pool
        assert not set(s.train) & set(s.val)
        vals += s.val
        assert s.manifest()["fold"] == fold and s.sha256 != plain.sha256
    assert sorted(vals) == pool  # every image is validation exactly once


def test_cv_on_a_dataset_with_its_own_validation_split_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="--cv applies to folder and csv data"):
        load_split(None, "demo", shots=2, seed=1, cv=3, fold=0)
    root = make_folder_dataset(tmp_path / "d", {"train": 2, "val": 1, "test": 1})
    with pytest.raises(DatasetError, match="--fold 5 is outside 0..2"):
        load_split(str(root), "folder", shots=-1, seed=1, cv=3, fold=5)
