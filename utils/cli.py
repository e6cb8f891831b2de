"""The one command-line parser of every run (main.py, main_lora.py and each sweep run) and its error boundary.

Run flags come from two places only: the RunConfig fields below and each method's settings
dataclass (``methods/``). A flag of another method is an error, not silently ignored.
Precedence: RunConfig defaults < the method's own lr < --preset < flags given.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import typing
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

from common.errors import UserError, exit_status
from engine.config import DEFAULT_MODEL, DEMO_DATASET, SYNTHETIC_MODEL, RunConfig
from utils.presets import PRESETS

DEFAULTS = RunConfig()


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as UserError (one line, exit 2) instead of printing usage."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in {"true", "1", "yes"}:
        return True
    if value in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _finite(text: str) -> float:
    """A float flag: a finite number (nan and inf are refused here, before anything runs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


_finite.__name__ = "float"  # argparse names the type in its message


def refuse_control_characters(words: Sequence[str], prog: str) -> None:
    """A newline, tab or other control character in an argument (a path pasted with its line end, a broken
    script) would split generated scripts and logs: refused before anything runs."""
    for word in words:
        bad = next((ch for ch in word if unicodedata.category(ch) == "Cc"), None)
        if bad is not None:
            raise UserError(f"argument {word!r} contains the control character {bad!r}: remove it "
                            f"(see {prog} --help)")


def _d(name: str) -> str:
    value = getattr(DEFAULTS, name)
    return f" (default: {value})" if value not in (None, "") else ""


def _add(group, *flags: str, help: str = "", default_of: str | None = None, **kw) -> None:
    text = help + (_d(default_of) if default_of else "")
    group.add_argument(*flags, default=argparse.SUPPRESS, help=text, **kw)


def _model_help() -> str:
    from models.registry import valid_keys_text

    return f"model key: {valid_keys_text()} (default: clip; tiny_clip on the demo dataset)"


def _method_flag(hint: object) -> dict:
    """argparse keywords for one settings field, from its type hint."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        return {"nargs": "+"}
    if origin is typing.Literal:
        return {"choices": typing.get_args(hint)}
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return {"type": {bool: _bool, int: int, float: _finite}.get(args[0], str)}


def method_flags() -> dict[str, list[str]]:
    """Each method-settings flag and the methods that take it."""
    from methods import methods

    out: dict[str, list[str]] = {}
    for m in methods():
        for f in m.setting_fields():
            out.setdefault(f.name, []).append(m.name)
    return out


def task_flags() -> dict[str, list[str]]:
    """Each task-settings flag and the kinds of task that take it."""
    from tasks import tasks

    out: dict[str, list[str]] = {}
    for t in tasks():
        for f in t.setting_fields():
            out.setdefault(f.name, []).append(t.name)
    return out


def _add_settings_flags(p: argparse.ArgumentParser, plugins, kind: str, owners: dict[str, list[str]]) -> None:
    """One argument group per plug-in (method or task) with a flag per field of its settings dataclass; help,
    default and choices come from the field, so each is written once."""
    from methods.registry import help_of

    seen: set[str] = set()
    for plugin in plugins:
        fields = [f for f in plugin.setting_fields() if f.name not in seen]
        if not fields:
            continue
        hints = typing.get_type_hints(plugin.settings)
        group = p.add_argument_group(f"--{kind} {plugin.name}", plugin.description)
        for f in fields:
            seen.add(f.name)
            others = [t for t in owners[f.name] if t != plugin.name]
            also = f"; also for {', '.join(others)}" if others else ""
            default = " ".join(f.default) if isinstance(f.default, tuple) else f.default
            group.add_argument(f"--{f.name}", default=argparse.SUPPRESS, **_method_flag(hints[f.name]),
                               help=f"{help_of(f)} (default: {default}{also})")


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    from methods import methods
    from tasks import tasks

    _add_settings_flags(p, methods(), "method", method_flags())
    _add_settings_flags(p, tasks(), "task", task_flags())


def build_parser(default_method: str, prog: str) -> argparse.ArgumentParser:
    """The run parser; `default_method` is what --method defaults to for this entry point."""
    from datasets.registry import dataset_names, dataset_setting_fields
    from methods import method_names, methods
    from methods.registry import help_of
    from models.registry import entries

    p = _Parser(prog=prog, allow_abbrev=False,
                description=f"cytology-lora: adapt a foundation model to a dataset (default --method "
                            f"{default_method}). With no arguments, runs the offline demo.")
    g = p.add_argument_group("method")
    _add(g, "--method", choices=method_names(), help=f"adaptation method (default: {default_method}); "
         "python -m methods list describes them")
    _add(g, "--preset", choices=tuple(PRESETS),
         help="exp1, exp2, exp3: the paper README's command for that experiment (exp3's ViT-L/14 from its run.py); "
              "medpeft: LoRA q v, alpha 32, dropout 0.1, rank 4/8/32 at <=1%%/<=10%%/more of the data (flags given "
              "explicitly override a preset)")
    g = p.add_argument_group("data")
    _add(g, "--root_path", help="folder holding the datasets")
    _add(g, "--dataset", help=f"one of {', '.join(dataset_names())}", default_of="dataset")
    _add(g, "--dataset_name", help="folder and csv data: the name in run folders, tables and plots (default: "
         "the --root_path folder's name)")
    for name, (f, takers) in dataset_setting_fields().items():  # each dataset kind's settings dataclass
        _add(g, f"--{name}", help=f"{', '.join(takers)}: {help_of(f)}")
    _add(g, "--label_map", help='merge classes at load time: a JSON file or "normal=a,b,c;abnormal=d,e"')
    _add(g, "--seed", type=int, default_of="seed")
    _add(g, "--cv", type=int, help="folder and csv data: split train + val into K stratified (and grouped) folds")
    _add(g, "--fold", type=int, help="with --cv: the fold used as validation (0 .. K-1; default 0)")
    _add(g, "--shots", type=int, help="images per class; -1 = all; 0 with --pourcentage", default_of="shots")
    _add(g, "--pourcentage", "--percentage", dest="percentage", type=_finite,
         help="with --shots 0: percent of each class used for train and val")
    _add(g, "--num_classes", type=int, help="optional; checked against the data")
    g = p.add_argument_group("model")
    _add(g, "--model_name", help=_model_help())
    _add(g, "--backbone", help="for models with a choice of backbones (" + "; ".join(
        f"{e.key}: {', '.join(e.backbones)}, the first by default" for e in entries() if e.backbones) + ")")
    _add(g, "--weights", help="local weights file or folder, or 'random'")
    g = p.add_argument_group("training")
    _add(g, "--lr", type=_finite, help=f"learning rate (default: {DEFAULTS.lr:g}, or the method's own: " + ", ".join(
        f"{m.name} {m.lr:g}" for m in methods() if m.lr is not None) + ")")
    _add(g, "--n_iters", type=int, help="few-shot: n_iters x K steps; otherwise n_iters epochs; plus "
         "--warmup_steps", default_of="n_iters")
    _add(g, "--batch_size", type=int, default_of="batch_size")
    _add(g, "--pos_weight", choices=("none", "auto"), help="multi-label data: auto weights each label's "
         "positives by its negative/positive ratio in train (default: none)")
    _add(g, "--drop_last", type=_bool, help="True: drop each epoch's last partial batch (default: False, as the "
         "original code)")
    _add(g, "--select", choices=("last", "best_val"), help="last: evaluate the last iterate (the paper); best_val: "
         "the step with the best validation headline metric (default: last)")
    _add(g, "--eval_every", type=int, help="validate every N steps (recorded as a curve; with --select best_val "
         "the default is 10 times per stage)")
    _add(g, "--compat", choices=("none", "seed"), help="seed: reproduce the original code's quirks for its exact "
         "numbers (README: Differences from the original code; default: none)")
    _add(g, "--warmup_steps", type=int, default_of="warmup_steps")
    _add(g, "--weight_decay", type=_finite, default_of="weight_decay")
    _add(g, "--checkpoint_every", type=int, help="steps between checkpoints", default_of="checkpoint_every")
    _add_method_flags(p)
    g = p.add_argument_group("run")
    _add(g, "--output_dir", default_of="output_dir")
    _add(g, "--device", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps, cpu", default_of="device")
    _add(g, "--precision", choices=["auto", "fp32", "bf16", "fp16"], default_of="precision")
    _add(g, "--num_workers", type=int, default_of="num_workers")
    _add(g, "--compile", type=_bool, help="True: torch.compile the trained module (for GPU runs; default: False)")
    _add(g, "--wandb", action="store_const", const=True, help="log to Weights & Biases (offline without a login)")
    _add(g, "--wandb_project", help="wandb project (default: $WANDB_PROJECT, else cytology-lora)")
    _add(g, "--wandb_entity", help="wandb entity (default: $WANDB_ENTITY, else your default entity)")
    _add(g, "--overwrite", action="store_const", const=True, help="replace a finished run in the same folder")
    _add(g, "--eval_only", action="store_const", const=True, help="evaluate a finished run's saved weights "
         "(needs --run)")
    _add(g, "--run", "--lora_path", dest="run", help="run folder whose weights --eval_only evaluates (its "
         "settings are read from its results.json; give only what changes, such as --root_path or --device)")
    _add(g, "--from", dest="from_results", help="a results.json whose recorded settings this run repeats "
         "(flags given override them)")
    return p


def _demo_overrides(inputs: str) -> dict:
    """The settings of the demo: small, offline, under a minute on two CPU cores (flags given still win)."""
    on_images = inputs == "images"
    return dict(model_name=SYNTHETIC_MODEL, shots=16, n_iters=25 if on_images else 100,
                lr=1e-3 if on_images else 1e-2, batch_size=32, demo=True, output_dir=os.path.join("results", "demo"))


def parse_config(argv: Sequence[str] | None, default_method: str = "lora", prog: str | None = None,
                 notify: bool = True) -> RunConfig:
    """Parse arguments into a resolved RunConfig; without --dataset (or with --dataset demo) the demo's small
    settings apply where no flag sets them. `notify`: print the config's warnings (``note: ...``) on stderr."""
    from methods import get_method

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or ("main_lora.py" if default_method == "lora" else "main.py")
    refuse_control_characters(argv, prog)
    given = vars(build_parser(default_method, prog).parse_args(argv))
    saved = _saved_settings(given)
    preset = dict(PRESETS.get(given.get("preset"), {}))
    saved_method = saved.pop("method", None)
    method = get_method(given.pop("method", None) or saved_method or preset.pop("method", None) or default_method)
    preset.pop("method", None)
    given.pop("from_results", None)
    values: dict = {}
    if method.lr is not None:
        values["lr"] = method.lr
    dataset = given.get("dataset", saved.get("dataset", preset.get("dataset", DEFAULTS.dataset)))
    demo = dataset == DEMO_DATASET and not saved
    if demo:
        values.update(_demo_overrides(method.inputs))
        if method.lr is not None:
            values["lr"] = method.lr  # a method's own learning rate (full fine-tuning's 1e-5) beats the demo's
    values.update(saved)
    values.update({k: v for k, v in preset.items() if k in RunConfig.__dataclass_fields__ or k in _fields(method)})
    values.update(given)
    for key, value in preset.items():
        if callable(value) and key not in given:
            values[key] = value(values)
    warnings: list[str] = []
    _backbone_of_another_model(given, saved, preset, values, warnings)
    wrong = sorted(set(given) & (set(method_flags()) - _fields(method)))
    if wrong:
        takers = ", ".join(method_flags()[wrong[0]])
        raise UserError(f"--{wrong[0]} does not apply to --method {method.name} (it is a setting of {takers})")
    settings = {k: values.pop(k) for k in list(values) if k in _fields(method)}
    task_given = {k: values.pop(k) for k in list(values) if k in task_flags()}
    values = {k: v for k, v in values.items() if k in RunConfig.__dataclass_fields__}
    config = RunConfig(method=method.name, **values)
    config.warnings = warnings
    _task_defaults(method, config, settings)
    config.method_settings = _resolve_settings(method, settings)
    _resolve(config, {**saved, **given}, preset)
    _task_settings(config, method, task_given)
    _budget(config, method, given, saved, preset, demo)
    config.experiment = method.experiment(config)
    _validate(config)
    if notify:
        for message in config.warnings:
            print(f"note: {message}", file=sys.stderr)
    return config


def _backbone_of_another_model(given: dict, saved: dict, preset: dict, values: dict, warnings: list[str]) -> None:
    """A preset's (or a repeated run's) backbone belongs to its model: --model_name naming that same model keeps
    it, another model drops it (that model runs with its own default backbone), with a notice."""
    if "model_name" not in given or "backbone" in given:
        return
    source, where = (preset, f"--preset {given.get('preset')}") if "model_name" in preset else (saved, "--from")
    if given["model_name"] == source.get("model_name"):
        return
    dropped = values.get("backbone")
    values["backbone"] = None
    if dropped and source.get("model_name"):
        warnings.append(f"--model_name {given['model_name']} replaces the {source['model_name']} {dropped} of "
                        f"{where}: {given['model_name']} runs with its own default backbone (add --backbone to "
                        "choose one)")


def trains_something(method, settings: dict) -> bool:
    """Whether a run optimises anything (a learning rate and a step budget mean something): a method that trains,
    or a computed one with a transductive stage trained on top (--transductive proportion)."""
    return method.trains or settings.get("transductive") == "proportion"


def _budget(config: RunConfig, method, given: dict, saved: dict, preset: dict, demo: bool) -> None:
    """Where n_iters came from: "flag" (a value of the user's own, not the method's intended budget), "paper" (a
    flag giving a paper preset's value), "preset", "demo" or "default" (a repeated run keeps its origin); a run
    that trains nothing has no learning rate and no budget."""
    if not trains_something(method, config.method_settings):
        config.lr = None
        config.n_iters = None
        config.n_iters_from = None
        return
    if "n_iters" in given:
        # a typed value that is the paper's (a preset's for this method) or the default is still the intended budget
        paper = {p["n_iters"] for p in PRESETS.values() if p.get("method") == method.name and "n_iters" in p}
        config.n_iters_from = ("paper" if config.n_iters in paper else
                               "default" if config.n_iters == DEFAULTS.n_iters else "flag")
    elif "n_iters" in preset:
        config.n_iters_from = "preset"
    elif "n_iters" in saved:
        config.n_iters_from = saved.get("n_iters_from") or "default"
    else:
        config.n_iters_from = "demo" if demo else "default"


def _saved_settings(given: dict) -> dict:
    """The recorded settings of a finished run: --from RESULTS_JSON, or --eval_only --run RUN_FOLDER."""
    from engine import results as res

    source = given.get("from_results")
    if source is None and given.get("eval_only") and given.get("run"):
        source = Path(given["run"]) / res.RESULTS_FILE
        if not source.is_file():
            raise UserError(f"no {res.RESULTS_FILE} in {given['run']}: point --run at a finished run folder")
    if source is None:
        return {}
    config = res.read_results(source)["config"]
    skip = {"eval_only", "run", "overwrite", "demo", "experiment", "preset", "method_settings", "task_settings",
            "warnings"}
    saved = {k: v for k, v in config.items() if k in RunConfig.__dataclass_fields__ and k not in skip}
    saved.update(config.get("method_settings", {}))
    saved.update(config.get("task_settings", {}))
    return saved


def _task_defaults(method, config: RunConfig, settings: dict) -> None:
    """The method's defaults for this kind of data (e.g. LoRA in both towers for image-text pairs) where no
    flag, preset or saved run set them; a method that does not handle the data is refused here."""
    from datasets.registry import dataset_task
    from methods.registry import check_task

    task = dataset_task(config.dataset, config.root_path)
    if task is not None:
        check_task(method, task)  # before anything runs (a sweep checks every run's arguments this way)
    for key, value in method.task_defaults.get(task, {}).items():
        settings.setdefault(key, value)


def _task_settings(config: RunConfig, method, given: dict) -> None:
    """The data's task settings (e.g. --loss, --decision on single-label data), resolved by the task; a flag of
    another task is refused like another method's. A loss other than cross-entropy is ignored, with a warning
    recorded, by a method that trains nothing (a sweep passes it to every method)."""
    from datasets.registry import dataset_task
    from methods.registry import settings_dict
    from tasks import get_task

    name = dataset_task(config.dataset, config.root_path)
    if name is None:
        config.task_settings = dict(given)
        return
    task = get_task(name)
    if given.get("loss", "ce") != "ce" and not method.trains:
        config.warnings.append(f"--loss {given['loss']} ignored: --method {method.name} trains no classifier head")
        given = {k: v for k, v in given.items() if k != "loss"}
    resolved = task.resolve(given)
    config.task_settings = settings_dict(resolved) if resolved is not None else {}


def _fields(method) -> set[str]:
    return {f.name for f in method.setting_fields()}


def _resolve_settings(method, settings: dict) -> dict:
    from methods.registry import settings_dict

    if "params" in settings and isinstance(settings["params"], list):
        settings["params"] = tuple(settings["params"])
    return settings_dict(method.resolve(settings))


def _resolve(config: RunConfig, given: dict, preset: dict) -> None:
    """Model, backbone and label level resolved through their registries, so folders name what runs."""
    from datasets.registry import get_dataset, resolve_level, resolve_level_fallback, resolve_protocol
    from models.registry import resolve, resolve_backbone

    if config.percentage == 0 and config.shots != 0:
        config.percentage = None  # the paper's scripts pass --pourcentage 0 to mean "not used"
    if "model_name" not in given and "model_name" not in preset and not config.demo:
        config.model_name = SYNTHETIC_MODEL if get_dataset(config.dataset).synthetic else DEFAULT_MODEL
    entry, _ = resolve(config.model_name)
    config.backbone = resolve_backbone(entry, config.model_name, config.backbone)
    level = config.level if "level" in given else None
    if level is None and "level" in preset:
        level = preset["level"] if resolve_level(config.dataset, None) else None
    if level and not get_dataset(config.dataset).levels:
        # the paper's commands pass --level for every dataset, and its code ignored it where there are none
        config.warnings.append(f"--level {level} ignored: {config.dataset} has no label levels (--level applies to "
                               "datasets with a label tree, such as hicervix)")
        level = None
    config.level = resolve_level(config.dataset, level)
    _resolve_data(config)
    config.level_fallback = resolve_level_fallback(config.dataset, config.level_fallback)
    config.protocol = resolve_protocol(config.dataset, config.protocol)
    if config.label_map:
        from datasets import parse_label_map

        parse_label_map(config.label_map)  # a bad map fails here, before anything runs


def _resolve_data(config: RunConfig) -> None:
    """An absolute data root (it is part of a run's identity) and the name of generic (folder, csv) data."""
    from datasets import get_dataset

    info = get_dataset(config.dataset)
    if config.root_path:
        config.root_path = str(Path(config.root_path).expanduser().resolve())
    if config.dataset_name and not info.generic:
        raise UserError(f"--dataset_name names folder or csv data; {config.dataset} has its own name")
    if info.generic and not config.dataset_name:
        config.dataset_name = Path(config.root_path).name if config.root_path else None
    if config.dataset_name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", config.dataset_name):
        raise UserError(f"--dataset_name {config.dataset_name!r}: use letters, digits, '_', '-' and '.'")


def _validate(config: RunConfig) -> None:
    """Checks that need no data or model; the rest happens where the data and model are known."""
    if config.shots < -1:
        raise UserError(
            f"--shots {config.shots} is invalid: use K > 0 images per class, -1 for all, or 0 with --pourcentage"
        )
    if config.shots == 0 and config.percentage is None:
        raise UserError("--shots 0 needs --pourcentage P (percent of each class, 0 < P <= 100)")
    if config.percentage is not None and not 0 < config.percentage <= 100:
        raise UserError(f"--pourcentage {config.percentage:g} is outside (0, 100]: give a percent such as 10")
    if config.percentage is not None and config.shots != 0:
        raise UserError("--pourcentage needs --shots 0 (percentage mode replaces few-shot sampling)")
    for name in ("n_iters", "batch_size"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1")
    if config.warmup_steps < 0:
        raise UserError(f"--warmup_steps must be at least 0, got {config.warmup_steps}")
    if config.lr is not None and config.lr <= 0:
        raise UserError(f"--lr must be positive, got {config.lr:g}")
    if config.weight_decay < 0:
        raise UserError(f"--weight_decay must be at least 0, got {config.weight_decay:g}")
    if config.eval_every is not None and config.eval_every < 1:
        raise UserError(f"--eval_every must be at least 1 step, got {config.eval_every}")
    if config.fold is not None and config.cv is None:
        raise UserError("--fold needs --cv K (the number of folds)")
    if config.cv is not None:
        config.fold = config.fold or 0
        if config.cv < 2 or not 0 <= config.fold < config.cv:
            raise UserError(f"--cv {config.cv} --fold {config.fold}: give K >= 2 and a fold in 0..K-1")
    if config.eval_only and not config.run:
        raise UserError("--eval_only needs --run (a finished run folder)")
    if config.weights and config.weights != "random" and not os.path.exists(config.weights):
        raise UserError(f"--weights {config.weights} does not exist: give a local weights file or folder, or 'random'")


def run_cli(main: Callable[[], int]) -> int:
    """Run an entry point: user mistakes become one line on stderr and exit status 2."""
    from engine.trainer import TrainingInterrupted

    try:
        return exit_status(main)
    except TrainingInterrupted as exc:
        where = f"; checkpoint saved to {exc.path}" if exc.path else ""
        print(f"interrupted at step {exc.step}{where}: rerun the same command to resume", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def open_run(folder, args=()):
    """A finished run's context and classifier with its trained weights loaded, in eval mode.

    Settings come from the run's results.json; `args` override what may change on this machine
    (e.g. ``["--root_path", "/data", "--device", "cpu"]``).
    """
    from engine.run import load_run

    return load_run(parse_config(["--eval_only", "--run", str(folder), *args], prog="open_run"))
