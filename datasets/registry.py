"""The registry of datasets: what each one is, how to read and prepare it, its settings, label levels and prompts.

A dataset kind is one module of this package that calls :func:`register` (see ``datasets/folder.py``):

    register(DatasetInfo(name="mine", description="...", reader=read_mine, layout="<root>/..."))

A kind with options declares a settings dataclass (``DatasetInfo.settings``), as methods do: each field is
one command-line flag (help text in ``field(metadata={"help": ..., "choices": ...})``, validation in
``__post_init__`` raising :class:`DatasetError`); :meth:`DatasetInfo.resolve` builds it from given values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from datasets.base import DEFAULT_PROTOCOL, Listing, PrepareRequest, ReadRequest
from datasets.errors import DatasetError

CELLS_PROMPT = "A cytological slide showing {} cells"
CELL_PROMPT = "A cytological slide showing a {} cell"

Reader = Callable[[Path | None, ReadRequest], Listing]
Preparer = Callable[[PrepareRequest], dict]


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: its reader, on-disk layout, settings, label levels, prompt template and preparation.

    ``reader(root, request)`` lists the files (root is None when ``needs_root`` is False);
    ``prepare(request)`` builds the layout from a raw download (None when there is nothing to do).
    """

    name: str
    description: str
    reader: Reader
    layout: str
    levels: tuple[str, ...] = ()
    default_level: str | None = None
    prompt_template: str = CELLS_PROMPT
    prepare: Preparer | None = None
    how_to_prepare: str = ""
    # a dataclass of the dataset's own options (HiCervix: level, level_fallback, protocol); None for none
    settings: type | None = None
    needs_root: bool = True
    generic: bool = False  # a layout for any data (folder, csv): runs are named by --dataset_name
    synthetic: bool = False  # generated data: runs say so, and the default model is the small test model
    # hierarchy(root, level_fallback) -> {deepest-level label: (level_1, level_2)}, for datasets whose
    # labels form a tree; the engine then reports accuracy at the upper levels and mistake distances.
    hierarchy: Callable | None = None
    # the kind of data: "single_label", "multilabel" or "captions" (image-text pairs); a function of the
    # root for layouts whose files say it (csv). Read before the data is, for task-dependent defaults.
    task: str | Callable[[Path], str] = "single_label"
    # how prompts name a class whose label is an abbreviation (BMCD's "ABE" -> "abnormal eosinophil")
    prompt_names: dict[str, str] = field(default_factory=dict, hash=False)
    source: str = ""  # where to get the data
    citation: str = ""  # the paper to cite
    licence: str = ""  # the data's licence, as its distributor states it

    def setting_fields(self) -> tuple[dataclasses.Field, ...]:
        """The fields of the settings dataclass (none without one)."""
        return dataclasses.fields(self.settings) if self.settings is not None else ()

    def takes(self, flag: str) -> bool:
        """True when ``--flag`` is one of this dataset's options (``level`` also for a plug-in with levels)."""
        return any(f.name == flag for f in self.setting_fields()) or (flag == "level" and bool(self.levels))

    def resolve(self, values: dict) -> object | None:
        """The settings dataclass from given values (None or "" count as not given and take the default).

        DatasetError naming the datasets that take a flag this one does not; None for a dataset without settings.
        """
        given = {k: v for k, v in values.items() if v is not None and v != ""}
        names = {f.name for f in self.setting_fields()}
        unknown = sorted(k for k in given if k not in names)
        if unknown:
            raise DatasetError(f"--{unknown[0]} applies to {datasets_taking(unknown[0])} only "
                               f"(got --dataset {self.name})")
        return None if self.settings is None else self.settings(**given)


_DATASETS: dict[str, DatasetInfo] = {}


def register(info: DatasetInfo) -> DatasetInfo:
    """Add a dataset; DatasetError if its name is taken or its levels and settings disagree."""
    if info.name in _DATASETS:
        raise DatasetError(f"dataset '{info.name}' is already registered; choose another name")
    if info.levels and info.default_level not in info.levels:
        raise DatasetError(f"dataset '{info.name}': default level {info.default_level!r} is not one of its levels")
    if info.settings is not None and not dataclasses.is_dataclass(info.settings):
        raise DatasetError(f"dataset '{info.name}': settings must be a dataclass")
    level = next((f for f in info.setting_fields() if f.name == "level"), None)
    if level is not None and (level.default != info.default_level or setting_choices(level) != info.levels):
        raise DatasetError(f"dataset '{info.name}': the level setting disagrees with its levels and default level")
    _DATASETS[info.name] = info
    return info


def unregister(name: str) -> None:
    """Remove a dataset (for plug-ins and tests)."""
    _DATASETS.pop(name, None)


def dataset_names() -> tuple[str, ...]:
    """Registered dataset names, in registration order."""
    return tuple(_DATASETS)


def get_dataset(name: str) -> DatasetInfo:
    """The entry of ``name``; DatasetError listing the known names."""
    info = _DATASETS.get(name)
    if info is None:
        raise DatasetError(f"unknown dataset '{name}': choose one of {', '.join(_DATASETS)}")
    return info


def setting_choices(f: dataclasses.Field) -> tuple:
    """The values a setting accepts (its metadata's "choices"; empty when any value of its type is fine)."""
    return tuple(f.metadata.get("choices", ()))


def dataset_setting_fields() -> dict[str, tuple[dataclasses.Field, tuple[str, ...]]]:
    """Every dataset setting as a flag: name -> (the field of the first dataset declaring it, all datasets
    that take it), for command lines that turn settings into flags."""
    out: dict[str, tuple[dataclasses.Field, tuple[str, ...]]] = {}
    for info in _DATASETS.values():
        for f in info.setting_fields():
            first, names = out.get(f.name, (f, ()))
            out[f.name] = (first, (*names, info.name))
    return out


def _names_with(has: Callable[[DatasetInfo], bool]) -> str:
    return ", ".join(n for n, info in _DATASETS.items() if has(info)) or "no dataset"


def datasets_taking(flag: str) -> str:
    """The names of the datasets that take ``--flag``, comma-separated ("no dataset" when none does)."""
    return _names_with(lambda info: info.takes(flag))


def _flag_default(flag: str) -> object:
    """The default of a setting among the datasets that declare it (None when none does)."""
    entry = dataset_setting_fields().get(flag)
    return None if entry is None else entry[0].default


def resolve_level(dataset: str, level: str | None) -> str | None:
    """The label level to use: the dataset's default when none is given; None for datasets without levels."""
    info = get_dataset(dataset)
    if not info.levels:
        if level:
            raise DatasetError(f"--level applies to {datasets_taking('level')} only (got --dataset {dataset})")
        return None
    if info.settings is not None and info.takes("level"):
        return info.resolve({"level": level}).level
    if not level:
        return info.default_level
    if level not in info.levels:
        raise DatasetError(f"unknown {dataset} level '{level}': choose one of {', '.join(info.levels)}")
    return level


def resolve_level_fallback(dataset: str, fallback: str | None) -> str | None:
    """The level fallback to use; None for datasets that do not take one (where only the default is accepted)."""
    entry = dataset_setting_fields().get("level_fallback")
    fallback = fallback or _flag_default("level_fallback")
    choices = setting_choices(entry[0]) if entry else ()
    if fallback is not None and choices and fallback not in choices:
        raise DatasetError(f"unknown --level_fallback '{fallback}': choose one of {', '.join(choices)}")
    info = get_dataset(dataset)
    if info.takes("level_fallback"):
        return info.resolve({"level_fallback": fallback}).level_fallback
    if fallback != _flag_default("level_fallback"):
        raise DatasetError(f"--level_fallback applies to {datasets_taking('level_fallback')} only "
                           f"(got --dataset {dataset})")
    return None


def protocols(info: DatasetInfo) -> tuple[str, ...]:
    """The evaluation protocols a dataset offers: its protocol setting's choices, else the default one."""
    f = next((f for f in info.setting_fields() if f.name == "protocol"), None)
    return setting_choices(f) if f is not None and setting_choices(f) else (DEFAULT_PROTOCOL,)


def resolve_protocol(dataset: str, protocol: str | None) -> str:
    """The evaluation protocol to use; DatasetError naming the datasets that offer ``protocol``."""
    protocol = protocol or DEFAULT_PROTOCOL
    info = get_dataset(dataset)
    if protocol in protocols(info):
        return info.resolve({"protocol": protocol}).protocol if info.takes("protocol") else protocol
    offered = _names_with(lambda i: protocol in protocols(i))
    if offered != "no dataset":
        raise DatasetError(f"--protocol {protocol} applies to {offered} only (got --dataset {dataset})")
    raise DatasetError(f"unknown --protocol '{protocol}' for {dataset}: choose one of {', '.join(protocols(info))}")


def dataset_task(dataset: str, root: str | Path | None) -> str | None:
    """The kind of data a dataset holds, without reading it all; None when its files cannot tell (the
    run then fails on reading them, with the reader's own message)."""
    task = get_dataset(dataset).task
    if not callable(task):
        return task
    try:
        return task(Path(root or "."))
    except DatasetError:
        return None


def class_prompts(dataset: str, classes: list[str]) -> list[str]:
    """One text prompt per class from the dataset's template and prompt names ("_" in class names read as spaces)."""
    info = get_dataset(dataset)
    return [info.prompt_template.format(info.prompt_names.get(str(cls), str(cls)).replace("_", " "))
            for cls in classes]
