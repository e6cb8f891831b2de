"""The method registry: what an adaptation method declares, and how the engine finds it.

A method is one file in ``methods/`` that calls :func:`register` with a :class:`Method`. The
engine (``utils/engine.py``) drives every method through the same run sequence; a method
only says what it consumes, what it trains and how its classifier is built, as a
:class:`Plan` of one or more training :class:`Stage` s.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from common.errors import UserError
from tasks import head_tasks, task_names

Inputs = Literal["features", "images"]
HEAD_TASKS = head_tasks()  # the kinds of task a method that trains a classification head handles
TASKS = task_names()  # every registered kind of task


class MethodError(UserError):
    """A method mistake the user can fix: unknown name, a setting out of range."""


@dataclass
class Stage:
    """One optimisation of `module` (the parameters of it that require grad) for `steps` steps at `lr`.

    `module` maps a batch of `inputs` (cached frozen features, or normalised images) to logits.
    """

    name: str
    module: typing.Any  # torch.nn.Module; kept untyped so that this file imports no torch
    inputs: Inputs
    steps: int
    lr: float
    augment: bool = True  # images only: random resized crop and flip, as the paper trains
    extra_loss: Callable | None = None  # extra_loss(module) -> scalar added to every step's labelled loss
    # the lr schedule (engine.trainer.SCHEDULES): "warmup_cosine", or "cosine_annealing" (the original code's
    # experiment 1 under --compat seed: CosineAnnealingLR(T_max=n_iters) stepped per batch)
    schedule: str = "warmup_cosine"
    # Image-text and other tasks whose loss is not a classification loss: `targets` lists, per train
    # image, what its batch entry carries instead of its label (e.g. its own index); `module` is then
    # called as module(inputs, targets) and `loss(outputs, targets)` replaces the task's loss.
    targets: typing.Sequence | None = None
    loss: Callable | None = None


@dataclass
class Plan:
    """What a method built for one run: the classifier to evaluate and the stages that train it.

    `model` maps `inputs` to logits at evaluation. The parameters of `model` that require grad
    are the trained state: saved after training and loaded back by ``--eval_only``. `export`,
    when given, writes extra files beside the results (e.g. ``lora.safetensors``).
    """

    model: typing.Any
    inputs: Inputs
    stages: list[Stage] = field(default_factory=list)
    export: Callable | None = None
    notes: dict = field(default_factory=dict)  # method-specific facts for results.json


@dataclass(frozen=True)
class Method:
    """A registered adaptation method.

    name: the ``--method`` value; description: one line for tables and --help;
    settings: a dataclass whose fields become CLI flags (help from ``field(metadata={"help": ...})``;
    validation in its ``__post_init__``); inputs: what the trained stages consume (the first
    stage for multi-stage methods); build(ctx, settings) -> Plan; trains: False for methods that
    only compute (zero-shot, nearest mean, kNN); lr: the method's own default learning rate,
    used when --lr is not given; source: where the method comes from (README); tasks: the
    kinds of data it handles (a head trained with a per-task loss handles multi-label data too);
    task_defaults: per kind of data, settings defaults that replace the dataclass's (flags still win).
    """

    name: str
    description: str
    settings: type
    inputs: Inputs
    build: Callable[..., Plan]
    trains: bool = True
    lr: float | None = None
    source: str = ""
    label: Callable[[object], str] | None = None
    paper_experiment: Callable[[object], int] | int = 0
    tasks: tuple[str, ...] = ("single_label",)  # the kinds of task it handles (names in tasks/)
    # settings whose default depends on the kind of data, e.g. {"captions": {"encoder": "both"}}
    task_defaults: dict = field(default_factory=dict, hash=False)
    # how python -m utils.export describes and rebuilds the method's head (methods.heads.HeadCodec); None: a plain
    # linear head. Kept untyped so that this file imports no torch.
    head_codec: typing.Any = None
    # what --n_iters counts: "shots" (warmup + n_iters x K steps few-shot, n_iters epochs otherwise: the paper's
    # LoRA, RunContext.paper_steps) or "epochs" (warmup + n_iters epochs: heads on cached features,
    # RunContext.epoch_steps); None: "shots" for methods trained on images, "epochs" for the others
    budget: Literal["shots", "epochs"] | None = None
    # whether runs sharing a frozen backbone may train packed in one step (engine.packing): its adapters and head
    # act on each run's own samples and the rest of the model is frozen and draws no random numbers
    packable: bool = False

    @property
    def entry_point(self) -> str:
        """The script whose default this method is closest to: image methods run from main_lora.py."""
        return "main_lora.py" if self.inputs == "images" else "main.py"

    @property
    def step_budget(self) -> str:
        """What --n_iters counts for this method: "shots" or "epochs" (see `budget`)."""
        return self.budget or ("shots" if self.inputs == "images" else "epochs")

    def setting_fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.settings)

    def resolve(self, values: dict) -> object:
        """The settings dataclass from given values (missing ones take their defaults)."""
        known = {f.name for f in self.setting_fields()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MethodError(f"--{unknown[0]} does not apply to --method {self.name}")
        return self.settings(**values)

    def folder_label(self, settings: object) -> str:
        """The method's part of a run folder name."""
        return self.label(settings) if self.label else self.name

    def experiment(self, config: object) -> int:
        """The paper's experiment number this run corresponds to (0: a method the paper did not run)."""
        e = self.paper_experiment
        return e(config) if callable(e) else e


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; a name that is taken raises."""
    if method.name in _METHODS:
        raise MethodError(f"method '{method.name}' is already registered; choose another name")
    if not dataclasses.is_dataclass(method.settings):
        raise MethodError(f"method '{method.name}': settings must be a dataclass")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (for plug-ins and tests)."""
    _METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def methods() -> tuple[Method, ...]:
    return tuple(_METHODS.values())


def get_method(name: str) -> Method:
    """The registered method of `name`; MethodError listing the valid names."""
    try:
        return _METHODS[name]
    except KeyError:
        raise MethodError(f"unknown method '{name}'; valid methods: {', '.join(_METHODS)}") from None


def compat_notes(ctx, *quirks: str) -> dict:
    """Plan notes (results.json ``method_notes``) naming the original code's quirks a ``--compat seed`` run
    reproduces, only those that apply to it: the given method ones and, when some class had fewer train or
    val images than asked, the draw with replacement ("few_shot_replacement")."""
    if ctx.config.compat != "seed":
        return {}
    applied = list(quirks)
    for part in ("train", "val"):
        paths = [path for path, _ in ctx.split.items(part)]
        if len(set(paths)) < len(paths) and "few_shot_replacement" not in applied:
            applied.append("few_shot_replacement")
    return {"compat_seed": applied} if applied else {}


def check_task(method: Method, task: str) -> None:
    """MethodError naming the methods that can, when `method` does not handle data of kind `task`."""
    if task not in method.tasks:
        able = ", ".join(m.name for m in methods() if task in m.tasks)
        raise MethodError(f"--method {method.name} handles {', '.join(method.tasks)} data, and this data is "
                          f"{task}: choose one of {able or 'no registered method'}")


def settings_dict(settings: object) -> dict:
    """A settings dataclass as plain JSON values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")
