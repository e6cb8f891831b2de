"""Dataset settings as a dataclass per dataset kind (HiCervix: level, level_fallback, protocol), resolved like
method settings: defaults from the dataclass, validation in it, a flag another dataset takes refused in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from datasets import (
    DatasetError,
    DatasetInfo,
    get_dataset,
    load_split,
    registry,
    resolve_level_fallback,
    resolve_protocol,
)
from datasets.__main__ import build_parser
from datasets.folder import read_folder
from datasets.hicervix import DEFAULT_LEVEL, LEVEL_FALLBACKS, LEVELS, ORIGINAL_FALLBACK, HicervixSettings
from datasets.registry import dataset_setting_fields, datasets_taking, register, unregister


@dataclasses.dataclass(frozen=True)
class StainSettings:
    stain: str = dataclasses.field(default="pap", metadata={"help": "staining", "choices": ("pap", "giemsa")})

    def __post_init__(self) -> None:
        if self.stain not in ("pap", "giemsa"):
            raise DatasetError(f"unknown --stain '{self.stain}'")


@pytest.fixture
def stained():
    info = register(DatasetInfo(name="stained_cells", description="a plug-in with a setting", reader=read_folder,
                                layout="<root>/...", settings=StainSettings))
    yield info
    unregister(info.name)


def test_hicervix_settings_defaults_and_help() -> None:
    info = get_dataset("hicervix")
    assert info.settings is HicervixSettings
    assert info.resolve({}) == HicervixSettings(level=DEFAULT_LEVEL, level_fallback=ORIGINAL_FALLBACK, protocol="paper")
    assert (info.levels, info.default_level) == (LEVELS, DEFAULT_LEVEL)  # one source for the engine and the flags
    for f in info.setting_fields():
        assert f.metadata["help"] and f.metadata["choices"]
    assert dataclasses.fields(HicervixSettings)[1].metadata["choices"] == LEVEL_FALLBACKS


def test_hicervix_settings_resolve_and_validate() -> None:
    info = get_dataset("hicervix")
    got = info.resolve({"level": "level_1", "level_fallback": "parent", "protocol": None})
    assert (got.level, got.level_fallback, got.protocol) == ("level_1", "parent", "paper")
    for values, message in [({"level": "level_9"}, "unknown hicervix level 'level_9'"),
                            ({"level_fallback": "sideways"}, "unknown --level_fallback 'sideways'"),
                            ({"protocol": "mine"}, "unknown --protocol 'mine' for hicervix")]:
        with pytest.raises(DatasetError, match=message) as err:
            info.resolve(values)
        assert "\n" not in str(err.value)


def test_a_flag_of_another_dataset_is_refused_naming_who_takes_it(stained) -> None:
    assert get_dataset("sipakmed").resolve({}) is None
    assert get_dataset("sipakmed").resolve({"level": None, "protocol": ""}) is None  # not given
    with pytest.raises(DatasetError, match=r"^--level_fallback applies to hicervix only \(got --dataset sipakmed\)$"):
        get_dataset("sipakmed").resolve({"level_fallback": "parent"})
    with pytest.raises(DatasetError, match=r"^--stain applies to stained_cells only \(got --dataset hicervix\)$"):
        get_dataset("hicervix").resolve({"stain": "giemsa"})
    assert stained.resolve({"stain": "giemsa"}) == StainSettings("giemsa")
    with pytest.raises(DatasetError, match=r"^--shots applies to no dataset only"):
        stained.resolve({"shots": 3})
    assert datasets_taking("level") == "hicervix"
    fields = dataset_setting_fields()
    assert fields["stain"][1] == ("stained_cells",) and fields["protocol"][1] == ("hicervix",)


def test_registration_checks_the_settings() -> None:
    base = DatasetInfo(name="odd", description="d", reader=read_folder, layout="l")
    with pytest.raises(DatasetError, match="settings must be a dataclass"):
        register(dataclasses.replace(base, settings=dict))
    with pytest.raises(DatasetError, match="level setting disagrees"):
        register(dataclasses.replace(base, settings=HicervixSettings, levels=LEVELS, default_level="level_1"))
    assert "odd" not in datasets_taking("level")


def test_the_old_resolvers_delegate_to_the_settings() -> None:
    assert resolve_level_fallback("hicervix", None) == ORIGINAL_FALLBACK
    assert resolve_level_fallback("mlcc", None) is None
    assert resolve_level_fallback("mlcc", ORIGINAL_FALLBACK) is None  # the flag at its default counts as not given
    assert resolve_protocol("hicervix", "official") == "official"
    assert resolve_protocol("mlcc", None) == "paper"


def test_load_split_hands_the_reader_the_settings(hicervix_root: Path, folder_root: Path, stained,
                                                  monkeypatch) -> None:
    seen = []
    info = get_dataset("hicervix")
    monkeypatch.setitem(registry._DATASETS, "hicervix", dataclasses.replace(
        info, reader=lambda root, request: seen.append(request.settings) or info.reader(root, request)))
    split = load_split(str(hicervix_root), "hicervix", shots=1, level="level_2")
    assert seen == [HicervixSettings(level="level_2")] and split.level_fallback == ORIGINAL_FALLBACK
    with pytest.raises(DatasetError, match="--stain applies to stained_cells only"):
        load_split(str(hicervix_root), "hicervix", shots=1, settings={"stain": "giemsa"})
    assert load_split(str(folder_root), "stained_cells", shots=1, settings={"stain": "giemsa", "other": None})


def test_the_summary_flags_come_from_the_settings(stained, capsys) -> None:
    args = build_parser().parse_args(["summary", "--dataset", "hicervix", "--level_fallback", "parent"])
    assert (args.level, args.level_fallback, args.protocol, args.stain) == (None, "parent", None, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["summary", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "staining [stained_cells]" in help_text and "--level_fallback" in help_text and "[hicervix]" in help_text
