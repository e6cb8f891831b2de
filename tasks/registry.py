"""The registry of kinds of task: what a task owns, and how the engine, report, predict and export find it.

A task is one file in ``tasks/`` that calls :func:`register` with a :class:`Task`. It owns the loss and
targets of a classifier trained on its data, the evaluation (metrics, thresholds chosen on validation,
predictions.csv rows), the headline and summary metrics, the report's columns and chance level, the output
activation, and what predict and export write. The kind of a dataset (``Split.task``) names its task.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from common.errors import UserError

Activation = typing.Literal["softmax", "sigmoid"]


@dataclass
class Evaluation:
    """What evaluating a run gives: metrics per part, one predictions.csv row per image, results.json extras."""
    metrics: dict
    rows: list  # (part, path, label, pred, values of the probability columns)
    columns: list[str]  # the probability columns of predictions.csv (the classes; none for image-text pairs)
    extra: dict = field(default_factory=dict)
    extra_columns: list[str] = field(default_factory=list)  # predictions.csv columns after the probabilities


# predict(part, fn=None) -> (outputs, labels): the classifier's float32 outputs (or those of `fn`, a forward of
# the plan's model on images) on one part of the split, every image once (the engine's engine.prediction.predict)
Predictor = Callable[..., tuple]


@dataclass(frozen=True)
class Task:
    """A registered kind of task.

    name: the kind a dataset declares (``Split.task``); headline: the metric runs are compared and selected on
    (a key of each part's metrics), headline_name its readable name; summary: (metric key, name) pairs printed
    at the end of a run; report_metrics: the report's per-metric table columns; exclusive: one class per image
    (class priors, transduction and class trees apply); trains_head: a classification head trained with
    `loss` handles it; contrastive: image-text pairs trained with the method's own loss;
    activation: what turns the classifier's outputs into the probabilities predict writes;
    chance(n): the headline's chance level, in its own units, with n what `chance_counts` names (None when
    it has none);
    loss(ctx) -> loss(outputs, labels); evaluate(ctx, plan, predict, parts, extras) -> Evaluation;
    scorer(ctx, plan) -> a function of normalised images giving the outputs predict turns into probabilities
    (None: the classifier's own outputs); predictions_csv(ctx, names, probs, record) -> CSV text;
    export_info(record) -> what model.json says about the outputs (raise UserError when such runs do not export);
    settings: a dataclass of the task's own settings (flags, like a method's), resolved by :func:`settings_of`.
    """
    name: str
    description: str
    headline: str
    headline_name: str
    summary: tuple[tuple[str, str], ...]
    report_metrics: tuple[str, ...]
    evaluate: Callable[..., Evaluation]
    activation: Activation | None = None
    exclusive: bool = False
    trains_head: bool = True
    contrastive: bool = False
    chance: Callable[[int], float | None] = lambda n: None
    loss: Callable | None = None
    scorer: Callable | None = None
    predictions_csv: Callable[..., str] | None = None
    export_info: Callable[[dict], dict] | None = None
    settings: type | None = None
    # what chance's argument counts: "classes" (the run's classes) or the test items a guess picks among
    # (image-text pairs: recall@1 of a random ranking is 1 / the number of test pairs)
    chance_counts: str = "classes"

    def setting_fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.settings) if self.settings else ()

    def resolve(self, values: dict | None) -> object | None:
        """The settings dataclass from given values (missing ones take their defaults); None without settings."""
        values = dict(values or {})
        known = {f.name for f in self.setting_fields()}
        unknown = sorted(set(values) - known)
        if unknown:
            takers = [t.name for t in _TASKS.values() if unknown[0] in {f.name for f in t.setting_fields()}]
            raise UserError(f"--{unknown[0]} applies to {', '.join(takers) or 'no'} data, and this data is {self.name}")
        return self.settings(**values) if self.settings else None


_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task; a name that is taken raises."""
    if task.name in _TASKS:
        raise UserError(f"task '{task.name}' is already registered; choose another name")
    _TASKS[task.name] = task
    return task


def get_task(name: str | None) -> Task:
    """The registered task of `name`; UserError listing the known ones."""
    try:
        return _TASKS[name]
    except KeyError:
        raise UserError(f"unknown kind of task '{name}'; known kinds: {', '.join(_TASKS)}") from None


def settings_of(ctx, task: Task) -> object | None:
    """The run's resolved settings of `task` (``config.task_settings``; defaults where a run has none)."""
    return task.resolve(getattr(ctx.config, "task_settings", None))


def task_names() -> tuple[str, ...]:
    return tuple(_TASKS)


def head_tasks() -> tuple[str, ...]:
    """The kinds of task a method that trains a classification head handles."""
    return tuple(name for name, task in _TASKS.items() if task.trains_head)


def tasks() -> tuple[Task, ...]:
    return tuple(_TASKS.values())


def probability_csv(names: Sequence[str], probs, classes: Sequence[str], preds: Sequence[str]) -> str:
    """`path,pred,p_<class>...` text: one row per image, probabilities with 8 significant digits."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "pred", *(f"p_{c}" for c in classes)])
    for name, pred, row in zip(names, preds, probs.tolist(), strict=True):
        writer.writerow([name, pred, *(format(p, ".8g") for p in row)])
    return buffer.getvalue()
