"""Reading and grouping runs: every results.json below a folder, grouped by setting (all but the seed)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from datasets.base import Listing
from engine import results as res
from engine.config import DERIVED_FIELDS, RUNTIME_FIELDS, RunConfig, method_label, model_label
from methods import get_method
from tasks import Task, get_task

RESULTS_FILE = res.RESULTS_FILE
HEADLINE = "headline"  # pseudo-metric: each run's own headline (the one its task names)
# results.json written before runs recorded their task hold the datasets' default kind (one class per image)
DEFAULT_TASK = Listing.task
# What two arms must share to be paired: the same data (the first is the one shown).
CONTEXT_FIELDS = ("dataset", "level", "shots", "percentage", "dataset_name", "root_path", "level_fallback",
                  "protocol", "label_map")
MODEL_FIELDS = ("model_name", "backbone")
SHOWN_FIELDS = ("experiment", "dataset", "level", "shots", "percentage", "lr")
# Already visible in the model and method labels, so not repeated in an arm's name.
LABELLED_FIELDS = frozenset({"experiment", "preset", "model_name", "method", "method_settings"})
SKIPPED_DIRS = frozenset({"checkpoints", "checkpoint"})


class ReportError(UserError):
    """A folder or results file the report cannot use."""


@dataclass
class Run:
    """One finished run: where its results.json is and what it says."""

    path: Path
    data: dict
    config: dict

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def replicate(self) -> tuple[int, int]:
        """What varies between repeats of one setting: the seed, and the cross-validation fold."""
        fold = self.config.get("fold")
        return (self.seed, -1 if fold is None else int(fold))

    @property
    def replicate_label(self) -> str:
        seed, fold = self.replicate
        return str(seed) if fold < 0 else f"{seed}/fold{fold}"

    @property
    def schema(self) -> object:
        return self.data.get("schema_version")

    @property
    def task(self) -> Task:
        """The kind of task the run was (results.json's ``task``; the datasets' default kind when absent)."""
        return get_task(self.data.get("task") or DEFAULT_TASK)

    @property
    def headline(self) -> str:
        """The metric this run is compared on: the one results.json names, else its task's headline."""
        return self.data.get("headline") or self.task.headline

    @property
    def budget_intended(self) -> bool:
        """Whether the run trained for its method's intended step budget (results.json ``budget.intended``;
        runs that do not say are taken as intended)."""
        budget = self.data.get("budget")
        return not (isinstance(budget, dict) and budget.get("intended") is False)

    def metric(self, split: str, name: str) -> float:
        """A metric of one split; HEADLINE stands for the run's headline metric."""
        value = self.data["metrics"][split].get(self.headline if name == HEADLINE else name)
        return math.nan if not isinstance(value, (int, float)) else float(value)


@dataclass
class Group:
    """Runs that share every result-changing setting except the seed."""

    key: dict
    runs: list[Run] = field(default_factory=list)

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.runs[0].config)

    def values(self, split: str, name: str) -> list[float]:
        return [run.metric(split, name) for run in self.runs]

    @property
    def task(self) -> Task:
        return self.runs[0].task

    @property
    def headline(self) -> str:
        """The display name of the metric this setting is compared on."""
        run = self.runs[0]
        return run.task.headline_name if run.headline == run.task.headline else run.headline

    @property
    def headline_key(self) -> str:
        """The key of the metric this setting is compared on (for file names)."""
        return self.runs[0].headline

    @property
    def lr(self) -> float | None:
        """The learning rate, or None for a method that trains nothing (it has none to show)."""
        return learning_rate(self.config)


# ---------------------------------------------------------------- reading


def find_results(root: Path) -> list[Path]:
    """Every results.json below root, skipping checkpoint and hidden folders."""
    found = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        parts = path.relative_to(root).parts[:-1]
        if any(p in SKIPPED_DIRS or p.startswith(".") for p in parts):
            continue
        if path.is_file():
            found.append(path)
    return found


def _read_one(path: Path) -> Run:
    """Parse and check one results.json; ReportError naming the file otherwise."""
    try:
        data = res.read_results(path)
    except res.ResultsError as exc:
        raise ReportError(f"{exc}, or pass --skip_invalid") from None
    try:
        get_task(data.get("task") or DEFAULT_TASK)
    except UserError as exc:
        raise ReportError(f"{path}: {exc}; update the tool, or pass --skip_invalid") from None
    return Run(path, data, dict(data["config"]))


def learning_rate(config: RunConfig) -> float | None:
    """The run's learning rate, or None when its method trains nothing (a recorded lr would mean nothing)."""
    if config.lr is None or not get_method(config.method).trains:
        return None
    return float(config.lr)


def load_runs(root: str | Path, skip_invalid: bool = False) -> list[Run]:
    """All usable runs below root; invalid files raise, or are skipped with a warning."""
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root} does not exist; give the --output_dir of your runs")
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder; give the --output_dir of your runs")
    paths = find_results(root)
    if not paths:
        raise ReportError(f"no {RESULTS_FILE} below {root}; run experiments first (bash launch_run.sh ...)")
    runs = []
    for path in paths:
        try:
            runs.append(_read_one(path))
        except ReportError as exc:
            if not skip_invalid:
                raise
            print(f"warning: skipping {exc}", file=sys.stderr)
    if not runs:
        raise ReportError(f"no usable {RESULTS_FILE} below {root} (all were skipped as invalid)")
    return runs


# ---------------------------------------------------------------- grouping


def settings_key(run: Run) -> dict:
    """Every config field that can change results (all but the seed and runtime fields), plus the schema."""
    key = {k: v for k, v in run.config.items()
           if k not in RUNTIME_FIELDS | DERIVED_FIELDS and k not in ("seed", "fold")}
    key["schema_version"] = run.schema
    env = run.data.get("env")
    if isinstance(env, dict) and env.get("precision"):
        # "auto" precision resolves per device (fp32 on CPU, bf16 on GPUs): keep what was really used.
        key["resolved_precision"] = env["precision"]
    return key


def _freeze(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs by settings; two runs of one setting and seed are an error naming both files."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = settings_key(run)
        group = groups.setdefault(_freeze(key), Group(key))
        twin = next((r for r in group.runs if r.replicate == run.replicate), None)
        if twin is not None:
            raise ReportError(f"{run.path} and {twin.path} are the same settings and seed {run.replicate_label}; "
                              "remove one of them")
        group.runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: r.replicate)
    return sorted(groups.values(), key=_group_order)


def _group_order(group: Group) -> tuple:
    c = group.config
    data = (0, c.shots if c.shots >= 0 else 10**9) if c.percentage is None else (1, c.percentage)
    return (c.experiment, c.dataset_name or c.dataset, c.level or "", model_label(c), method_label(c), data,
            -1.0 if c.lr is None else c.lr, _freeze(group.key))


def varying_fields(groups: Sequence[Group]) -> list[str]:
    """Setting fields (besides the shown ones) that differ between groups: they get their own columns."""
    names = sorted({k for g in groups for k in g.key})
    out = []
    for name in names:
        if name in SHOWN_FIELDS:
            continue
        if len({json.dumps(g.key.get(name), sort_keys=True, default=str) for g in groups}) > 1:
            out.append(name)
    return out


def _display(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def arm_label(group: Group, varying: Sequence[str]) -> str:
    """Model and method, plus any varying setting that these two labels do not show."""
    c = group.config
    extras = []
    for name in varying:
        if name in LABELLED_FIELDS or name in CONTEXT_FIELDS or name in ("lr", "backbone"):
            continue
        value = group.key.get(name)
        if value is None or (name == "weights" and value == "random"):
            continue  # unset (e.g. no step budget for a method that trains nothing), or shown by the model label
        if name == "weights":
            value = Path(str(value)).name
        extras.append(f"{name}={_display(value)}")
    label = f"{model_label(c)} {method_label(c)}"
    return label + (f" [{', '.join(extras)}]" if extras else "")
