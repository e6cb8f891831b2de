"""The settings of one run and the folder its results live in.

Method-specific settings live in each method's settings dataclass (``methods/``); a run
records the active method's resolved settings in ``method_settings``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunConfig:
    """Every setting of a run; saved in full with its results."""

    method: str = "lora"
    method_settings: dict = field(default_factory=dict)
    task_settings: dict = field(default_factory=dict)  # the data's task settings (tasks/: e.g. loss, decision)
    preset: str | None = None
    experiment: int = 0  # the paper's experiment this run corresponds to (0: none); a label, not a switch
    root_path: str = ""
    dataset: str = "demo"
    dataset_name: str | None = None  # folder/csv data: the name in folders, tables and plots
    level: str | None = None
    level_fallback: str | None = None  # label levels only: original (the paper's code), parent or none
    protocol: str = "paper"
    label_map: str | None = None  # merge classes at load time: JSON file or "new=a,b;other=c"
    seed: int = 1
    cv: int | None = None  # folder/csv data: K cross-validation folds of train + val
    fold: int | None = None  # ... and the one used as validation
    shots: int = 16
    percentage: float | None = None
    model_name: str = "tiny_clip"
    backbone: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    # optimisation (CLIP-LoRA's defaults; --preset expN sets the paper's own commands)
    lr: float | None = 2e-4  # None: the method trains nothing
    n_iters: int | None = 500  # None: the method trains nothing
    # where n_iters came from: "flag", "paper", "preset", "demo" or "default" (the intended budget unless "flag")
    n_iters_from: str | None = "default"
    batch_size: int = 32
    pos_weight: str = "none"  # multi-label: "auto" weights each label's positives by negatives/positives
    drop_last: bool = False  # True drops each epoch's last partial batch (the original code keeps it)
    compat: str = "none"  # "seed": reproduce the original code's quirks (README, Differences from the original code)
    select: str = "last"  # "last": the paper's last iterate; "best_val": the step with the best validation headline
    eval_every: int | None = None  # validation every N steps (with --select best_val: 10 times per stage if unset)
    weight_decay: float = 1e-2
    warmup_steps: int = 50
    min_lr: float = 1e-6
    # runtime
    output_dir: str = "results"
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 2
    wandb: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None
    eval_only: bool = False
    run: str | None = None
    overwrite: bool = False
    checkpoint_every: int = 200
    compile: bool = False  # torch.compile the trained module (GPU runs; same numbers, faster steps)
    demo: bool = False
    warnings: list[str] = field(default_factory=list)  # what the settings' resolution said (also in results.json)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Settings that say where or how a run executes, not what it computes: a checkpoint resumes
# across them, and the report groups runs without them.
DEFAULT_MODEL = "clip"  # the paper's default model for real data
SYNTHETIC_MODEL = "tiny_clip"  # the small offline model of the synthetic demo data
DEMO_DATASET = RunConfig.dataset  # the dataset of a command that names none: the synthetic demo

RUNTIME_FIELDS = frozenset({"output_dir", "device", "num_workers", "wandb", "wandb_project", "wandb_entity",
                            "overwrite", "eval_only", "run",
                            "checkpoint_every", "compile", "demo"})
# Recorded, but derived from the others: two runs that differ only here compute the same thing (num_classes is
# a check of the data, as the paper's commands pass it).
DERIVED_FIELDS = frozenset({"preset", "experiment", "warnings", "n_iters_from", "num_classes"})


def computing_settings(config: RunConfig) -> dict:
    """The settings that change what a run computes, with a local weights file identified by its content
    stamp (paths, sizes, modification times), so that a replaced file is a new run."""
    from common.io import file_identity

    settings = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS | DERIVED_FIELDS}
    settings["weights"] = file_identity(config.weights)
    return settings


def fingerprint(config: RunConfig) -> str:
    """Hash of the settings that define what a run computes (a checkpoint resumes only under the same)."""
    return hashlib.sha256(json.dumps(computing_settings(config), sort_keys=True, default=str).encode()).hexdigest()


def _num(x: float) -> str:
    """Shortest faithful text for a number in a folder name (2e-4 -> 0.0002, 10.0 -> 10)."""
    return format(float(x), "g") if float(x) != int(x) else str(int(x))


def model_label(config: RunConfig) -> str:
    """The model as results name it: key, backbone where the model has a choice, '-random' for random init."""
    label = config.model_name.replace(":", "-")
    if config.backbone:
        label += "-" + config.backbone.replace("/", "")
    if config.weights == "random":
        label += "-random"
    return label


def method_label(config: RunConfig) -> str:
    """The method and the settings that matter most, as the method names them."""
    from methods import get_method

    method = get_method(config.method)
    return method.folder_label(method.resolve(config.method_settings))


def data_label(config: RunConfig) -> str:
    """Shots for few-shot runs, a percentage for experiment-3-style runs."""
    if config.shots == 0 and config.percentage is not None:
        return f"pct{_num(config.percentage)}"
    return "shotsall" if config.shots == -1 else f"shots{config.shots}"


def run_dir(config: RunConfig) -> Path:
    """The folder of one run: readable parts, then a short hash of every computing setting.

    Two runs that compute different things never share a folder; a rerun of the same settings
    finds its own folder (and skips or resumes it).
    """
    name = config.dataset_name or config.dataset
    dataset = f"{name}-{config.level}" if config.level else name
    top = f"exp{config.experiment}" if config.experiment else "runs"
    return (Path(config.output_dir) / top / dataset / model_label(config) / method_label(config)
            / data_label(config) / lr_label(config)
            / f"seed{config.seed}{_fold(config)}-{fingerprint(config)[:8]}")


def lr_label(config: RunConfig) -> str:
    """The learning rate's part of a run folder ("lr0.0002"); empty for runs that train nothing."""
    return "" if config.lr is None else f"lr{_num(config.lr)}"


def _fold(config: RunConfig) -> str:
    return "" if config.cv is None else f"-fold{config.fold}of{config.cv}"


def budget_record(config: RunConfig, stages: list[dict]) -> dict:
    """results.json's ``budget``: what n_iters counts for the method ("shots", "epochs"; "none" when nothing
    trains), its value and origin, the steps of the stages, and whether it is the method's intended budget (not
    changed by a flag), so that a report can refuse to compare runs whose budgets were cut short."""
    from methods import get_method

    steps = sum(int(s.get("steps", 0)) for s in stages)
    if config.n_iters is None:
        return {"kind": "none", "n_iters": None, "from": None, "steps": steps, "intended": True}
    return {"kind": get_method(config.method).step_budget, "n_iters": config.n_iters, "from": config.n_iters_from,
            "steps": steps, "intended": config.n_iters_from != "flag"}
