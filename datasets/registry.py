"""The registry of datasets: what each one is, how to read it, its label levels and prompts.

A new dataset is one :func:`register` call (see ``datasets/catalog.py`` for the built-in ones):

    register(DatasetInfo(name="mine", description="...", reader=read_mine, layout="<root>/..."))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from datasets.errors import DatasetError

if TYPE_CHECKING:
    from datasets.prepare import PrepareRequest
    from datasets.readers import Listing

CELLS_PROMPT = "A cytological slide showing {} cells"
CELL_PROMPT = "A cytological slide showing a {} cell"
# How a HiCervix image without a label at the chosen level is treated (see datasets/hicervix.py).
LEVEL_FALLBACKS = ("original", "none", "parent")
DEFAULT_LEVEL_FALLBACK = "original"
DEFAULT_PROTOCOL = "paper"


@dataclass(frozen=True)
class ReadRequest:
    """What a reader is asked for besides the root: the label level and the labelling options."""

    dataset: str
    level: str | None = None
    level_fallback: str | None = None
    protocol: str = DEFAULT_PROTOCOL


Reader = Callable[[Path | None, ReadRequest], "Listing"]
Preparer = Callable[["PrepareRequest"], dict]


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: its reader, on-disk layout, label levels, prompt template and preparation.

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
    protocols: tuple[str, ...] = (DEFAULT_PROTOCOL,)
    needs_root: bool = True
    generic: bool = False  # a layout for any data (folder, csv): runs are named by --dataset_name
    synthetic: bool = False  # generated data: runs say so, and the default model is the small test model
    # hierarchy(root, level_fallback) -> {deepest-level label: (level_1, level_2)}, for datasets whose
    # labels form a tree; the engine then reports accuracy at the upper levels and mistake distances.
    hierarchy: Callable | None = None
    # the kind of data: "single_label", "multilabel" or "captions" (image-text pairs); a function of the
    # root for layouts whose files say it (csv). Read before the data is, for task-dependent defaults.
    task: str | Callable[[Path], str] = "single_label"


_DATASETS: dict[str, DatasetInfo] = {}


def register(info: DatasetInfo) -> DatasetInfo:
    """Add a dataset; DatasetError if its name is taken."""
    if info.name in _DATASETS:
        raise DatasetError(f"dataset '{info.name}' is already registered; choose another name")
    if info.levels and info.default_level not in info.levels:
        raise DatasetError(f"dataset '{info.name}': default level {info.default_level!r} is not one of its levels")
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


def _names_with(has: Callable[[DatasetInfo], bool]) -> str:
    return ", ".join(n for n, info in _DATASETS.items() if has(info)) or "no dataset"


def _with_levels() -> str:
    return _names_with(lambda info: bool(info.levels))


def resolve_level(dataset: str, level: str | None) -> str | None:
    """The label level to use: the dataset's default when none is given; None for datasets without levels."""
    info = get_dataset(dataset)
    if not info.levels:
        if level:
            raise DatasetError(f"--level applies to {_with_levels()} only (got --dataset {dataset})")
        return None
    if not level:
        return info.default_level
    if level not in info.levels:
        raise DatasetError(f"unknown {dataset} level '{level}': choose one of {', '.join(info.levels)}")
    return level


def resolve_level_fallback(dataset: str, fallback: str | None) -> str | None:
    """The level fallback to use; None for datasets without levels (where only the default is accepted)."""
    fallback = fallback or DEFAULT_LEVEL_FALLBACK
    if fallback not in LEVEL_FALLBACKS:
        raise DatasetError(f"unknown --level_fallback '{fallback}': choose one of {', '.join(LEVEL_FALLBACKS)}")
    if get_dataset(dataset).levels:
        return fallback
    if fallback != DEFAULT_LEVEL_FALLBACK:
        raise DatasetError(f"--level_fallback applies to {_with_levels()} only (got --dataset {dataset})")
    return None


def resolve_protocol(dataset: str, protocol: str | None) -> str:
    """The evaluation protocol to use; DatasetError naming the datasets that offer ``protocol``."""
    protocol = protocol or DEFAULT_PROTOCOL
    info = get_dataset(dataset)
    if protocol in info.protocols:
        return protocol
    offered = _names_with(lambda i: protocol in i.protocols)
    if offered != "no dataset":
        raise DatasetError(f"--protocol {protocol} applies to {offered} only (got --dataset {dataset})")
    raise DatasetError(f"unknown --protocol '{protocol}' for {dataset}: choose one of {', '.join(info.protocols)}")


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
    """One text prompt per class from the dataset's template ("_" in class names read as spaces)."""
    template = get_dataset(dataset).prompt_template
    return [template.format(str(cls).replace("_", " ")) for cls in classes]
