"""The settings of one run and the folder its results live in.

This module must stay importable without torch: the sweep launcher uses it to decide,
in a fraction of a second, which runs are already finished.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets.layouts import DEFAULT_HICERVIX_LEVEL

RESULTS_FILE = "results.json"


@dataclass
class RunConfig:
    """Every setting of a run; saved in full with its results."""

    experiment: int = 2
    root_path: str = ""
    dataset: str = "demo"
    level: str | None = None
    seed: int = 1
    shots: int = 16
    percentage: float | None = None
    model_name: str = "tiny_clip"
    backbone: str = "ViT-B/16"
    weights: str | None = None
    num_classes: int | None = None
    textual: bool = False
    # optimisation (the paper's defaults)
    lr: float = 2e-4
    n_iters: int = 500
    batch_size: int = 32
    weight_decay: float = 1e-2
    warmup_steps: int = 50
    min_lr: float = 1e-6
    # LoRA
    position: str = "all"
    encoder: str = "vision"
    params: tuple[str, ...] = ("q", "k", "v")
    r: int = 2
    alpha: float = 1.0
    dropout_rate: float = 0.25
    scaling: str = "sqrt"
    # runtime
    output_dir: str = "results"
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 2
    wandb: bool = False
    eval_only: bool = False
    lora_path: str | None = None
    overwrite: bool = False
    checkpoint_every: int = 200
    demo: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The label level exists for HiCervix only; normalising it here keeps one folder per run
        # whether or not --level was given.
        if self.dataset == "hicervix":
            self.level = self.level or DEFAULT_HICERVIX_LEVEL
        else:
            self.level = None

    @property
    def method(self) -> str:
        return "linear" if self.experiment == 1 else "lora"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["params"] = list(self.params)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "params" in kwargs:
            kwargs["params"] = tuple(kwargs["params"])
        return cls(**kwargs)


def _num(x: float) -> str:
    """Shortest faithful text for a number in a folder name (2e-4 -> 0.0002, 10.0 -> 10)."""
    return format(float(x), "g") if float(x) != int(x) else str(int(x))


def model_label(config: RunConfig) -> str:
    """The model as results name it: key, backbone for CLIP, and '-random' for random init."""
    label = config.model_name.replace(":", "-")
    if config.model_name == "clip":
        label += "-" + config.backbone.replace("/", "")
    if config.weights == "random":
        label += "-random"
    return label


def method_label(config: RunConfig) -> str:
    """Linear head (optionally text-initialised) or LoRA with its placement."""
    if config.experiment == 1:
        return "linear-textual" if config.textual else "linear"
    params = "".join(config.params)
    return f"lora-{params}-r{config.r}-{config.position}-{config.encoder}"


def data_label(config: RunConfig) -> str:
    """Shots for few-shot runs, a percentage for experiment-3-style runs."""
    if config.shots == 0 and config.percentage is not None:
        return f"pct{_num(config.percentage)}"
    return "shotsall" if config.shots == -1 else f"shots{config.shots}"


def run_dir(config: RunConfig) -> Path:
    """The folder of one run, a pure function of the settings that define it."""
    dataset = f"{config.dataset}-{config.level}" if config.level else config.dataset
    return (
        Path(config.output_dir)
        / f"exp{config.experiment}"
        / dataset
        / model_label(config)
        / method_label(config)
        / data_label(config)
        / f"lr{_num(config.lr)}"
        / f"seed{config.seed}"
    )


def is_finished(folder: Path) -> bool:
    """A run is finished when its results.json exists and parses."""
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        return False
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True
