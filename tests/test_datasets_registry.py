"""The dataset registry: entries, lookups that replace per-dataset branches, prompts and levels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import datasets
from datasets import DatasetError, DatasetInfo, class_prompts, dataset_names, get_dataset, load_split, resolve_level
from datasets.folder import read_folder
from datasets.registry import register, unregister
from tests.conftest import make_folder_dataset
from tests.conftest import run_datasets_cli as run_cli

BUILT_IN = ("mlcc", "bcfc", "sipakmed", "hicervix", "apacc", "bloodmnist", "bmcd", "bmt", "fnac2019", "folder", "csv",
            "demo", "demo_captions")


@pytest.fixture
def plugin():
    """A dataset registered the way a plug-in would: the folder reader, its own layout text and levels."""
    info = DatasetInfo(
        name="plugin_cells",
        description="a test plug-in",
        reader=read_folder,
        layout="<root>/<the plug-in's own layout>",
        levels=("coarse", "fine"),
        default_level="fine",
        how_to_prepare="ask the plug-in's author",
    )
    register(info)
    yield info
    unregister(info.name)


def test_built_in_datasets_are_registered_in_order() -> None:
    assert dataset_names() == BUILT_IN
    assert datasets.DATASET_NAMES == BUILT_IN
    for name in BUILT_IN:
        info = get_dataset(name)
        assert info.name == name and info.description and info.layout and info.how_to_prepare
    assert get_dataset("hicervix").levels == ("level_1", "level_2", "level_3", "class_name")
    assert get_dataset("hicervix").default_level == "level_3"
    assert all(not get_dataset(n).levels and get_dataset(n).default_level is None for n in BUILT_IN if n != "hicervix")
    assert [n for n in BUILT_IN if get_dataset(n).prepare is None] == ["demo", "demo_captions"]
    assert get_dataset("mlcc").layout == "<root>/MLCC/images/{train,val,test}/<class>_<n>.jpg"


def test_entries_are_frozen_and_names_unique(plugin: DatasetInfo) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        plugin.name = "other"  # type: ignore[misc]
    with pytest.raises(DatasetError, match="'plugin_cells' is already registered"):
        register(plugin)
    with pytest.raises(DatasetError, match="default level 'medium'"):
        register(dataclasses.replace(plugin, name="broken", default_level="medium"))
    assert "broken" not in dataset_names()


def test_unknown_dataset_lists_the_known_names() -> None:
    with pytest.raises(DatasetError) as err:
        get_dataset("cifar")
    message = str(err.value)
    assert "unknown dataset 'cifar'" in message and "\n" not in message
    assert all(name in message for name in BUILT_IN)


@pytest.mark.parametrize(
    ("dataset", "classes", "expected"),
    [
        ("sipakmed", ["Superficial-Intermediate"], ["A cytological slide showing a Superficial-Intermediate cell"]),
        ("hicervix", ["ASC-US", "HSIL"], ["A cytological slide showing a ASC-US cell",
                                           "A cytological slide showing a HSIL cell"]),
        ("mlcc", ["HSIL", "NL"], ["A cytological slide showing HSIL cells", "A cytological slide showing NL cells"]),
        ("bcfc", ["malignant"], ["A cytological slide showing malignant cells"]),
        ("folder", ["normal_columnar"], ["A cytological slide showing normal columnar cells"]),
        ("demo", ["high_grade"], ["A cytological slide showing high grade cells"]),
        ("csv", ["wbc_multiple"], ["A cytological slide showing wbc multiple cells"]),
    ],
)
def test_class_prompts_use_the_dataset_template(dataset: str, classes: list[str], expected: list[str]) -> None:
    assert class_prompts(dataset, classes) == expected


def test_resolve_level(plugin: DatasetInfo) -> None:
    assert resolve_level("hicervix", None) == "level_3"
    assert resolve_level("hicervix", "") == "level_3"
    assert resolve_level("hicervix", "level_1") == "level_1"
    assert resolve_level("mlcc", None) is None
    assert resolve_level("plugin_cells", None) == "fine"
    with pytest.raises(DatasetError) as err:
        resolve_level("mlcc", "level_3")
    # the datasets that have levels come from the registry
    assert str(err.value).startswith("--level applies to hicervix, plugin_cells only")
    with pytest.raises(DatasetError, match="choose one of level_1, level_2, level_3, class_name"):
        resolve_level("hicervix", "level_9")
    with pytest.raises(DatasetError, match="unknown dataset"):
        resolve_level("cifar", None)


def test_level_is_refused_for_datasets_without_levels(folder_root: Path) -> None:
    with pytest.raises(DatasetError, match="--level applies to hicervix only"):
        load_split(str(folder_root), "folder", shots=1, level="level_2")
    with pytest.raises(DatasetError, match="--level_fallback applies to hicervix only"):
        load_split(str(folder_root), "folder", shots=1, level_fallback="parent")
    with pytest.raises(DatasetError, match="--protocol official applies to hicervix only"):
        load_split(str(folder_root), "folder", shots=1, protocol="official")
    with pytest.raises(DatasetError, match="unknown --level_fallback 'sideways'"):
        load_split(str(folder_root), "folder", shots=1, level_fallback="sideways")
    split = load_split(str(folder_root), "folder", shots=1)
    assert split.level is None and split.level_fallback is None and split.protocol == "paper"


def test_a_registered_dataset_loads_and_its_layout_text_is_used(plugin: DatasetInfo, tmp_path: Path) -> None:
    make_folder_dataset(tmp_path / "cells", per_split={"train": 3, "val": 2, "test": 2})
    assert datasets.DATASET_NAMES[-1] == "plugin_cells"  # derived from the registry, not a frozen copy
    split = load_split(str(tmp_path / "cells"), "plugin_cells", shots=2, level="coarse")
    assert split.dataset == "plugin_cells" and split.level == "coarse"
    assert split.counts()["train"] == {"blue": 2, "green-ish": 2, "red": 2}
    with pytest.raises(DatasetError) as err:
        load_split(str(tmp_path / "absent"), "plugin_cells", shots=2)
    assert "<the plug-in's own layout>" in str(err.value) and "ask the plug-in's author" in str(err.value)
    needs_root = "--root_path is required for plugin_cells: give the folder that holds <root>/<the"
    with pytest.raises(DatasetError, match=needs_root):
        load_split(None, "plugin_cells")


def test_cli_choices_come_from_the_registry() -> None:
    done = run_cli("prepare", "--help")
    assert done.returncode == 0
    assert "{mlcc,bcfc,sipakmed,hicervix,apacc,bloodmnist,bmcd,bmt,fnac2019,folder,csv}" in done.stdout
    done = run_cli("summary", "--dataset", "imagenet")
    assert done.returncode == 2 and "{" + ",".join(BUILT_IN) + "}" in done.stderr
