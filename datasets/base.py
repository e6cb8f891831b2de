"""The records every part of the data layer shares: a listing, a reader's request and a preparation's request."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PROTOCOL = "paper"  # the evaluation protocol every dataset offers
DEFAULT_RATIOS = (70.0, 10.0, 20.0)  # train/val/test percentages used by `prepare` where no split is given


@dataclass
class Listing:
    """All images of a dataset: relative paths (posix) and labels per split.

    A label is a class name ("single_label"), a tuple of 0/1 ints, one per class ("multilabel"),
    or a class name or None ("captions", with the caption of each path in ``captions``).
    """

    root: Path
    classes: list[str]
    items: dict[str, list[tuple[str, object]]]  # split -> [(relative path, label)], sorted by path
    left_out: int = 0
    notes: list[str] = field(default_factory=list)
    task: str = "single_label"
    captions: dict[str, str] = field(default_factory=dict)  # relative path -> caption
    groups: dict[str, str] = field(default_factory=dict)  # relative path -> group (patient, slide, ...)


@dataclass(frozen=True)
class ReadRequest:
    """What a reader is asked for besides the root: the label level and the labelling options.

    ``settings`` is the dataset's resolved settings dataclass (None for a dataset without settings).
    """

    dataset: str
    level: str | None = None
    level_fallback: str | None = None
    protocol: str = DEFAULT_PROTOCOL
    settings: object | None = None


@dataclass(frozen=True)
class PrepareRequest:
    """The settings of one ``python -m datasets prepare`` call."""

    src: Path
    dst: Path | None = None
    seed: int = 0
    ratios: tuple[float, float, float] = DEFAULT_RATIOS
    overwrite: bool = False
    manifest: Path | None = None
    columns: list[str] | None = None  # csv only: the columns kept besides path
