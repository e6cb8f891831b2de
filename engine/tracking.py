"""Optional Weights & Biases logging that never blocks and never asks a question."""

from __future__ import annotations

import os
import sys
from pathlib import Path


class Tracker:
    """Logs to wandb when enabled; every method is a no-op otherwise."""

    def __init__(self, run=None):
        self.run = run

    def results(self, record: dict) -> None:
        """The end of a run: val/test metrics in the summary, the test confusion matrix and per-class recall
        as tables."""
        if self.run is None:
            return
        import wandb

        classes = record.get("classes", [])
        self.summary({f"{part}/{key}": value for part, metrics in record.get("metrics", {}).items()
                      for key, value in metrics.items() if isinstance(value, (int, float))})
        test = record.get("metrics", {}).get("test", {})
        tables = {}
        if test.get("confusion_matrix"):
            rows = [[t, p, n] for t, row in zip(classes, test["confusion_matrix"], strict=False)
                    for p, n in zip(classes, row, strict=False)]
            tables["test/confusion_matrix"] = wandb.Table(columns=["true", "predicted", "count"], data=rows)
        if test.get("per_class_recall"):
            rows = [[name, value] for name, value in test["per_class_recall"].items()]
            tables["test/per_class_recall"] = wandb.Table(columns=["class", "recall"], data=rows)
        if tables:
            self.run.log(tables)

    def log(self, values: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def _mode() -> str:
    """online only with credentials; otherwise offline (or what WANDB_MODE says)."""
    requested = os.environ.get("WANDB_MODE")
    if requested in {"online", "offline", "disabled", "dryrun"}:
        return "offline" if requested == "dryrun" else requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def identity(config: dict) -> dict:
    """A readable name, a group that every seed of a setting shares (so that seeds aggregate in the wandb
    UI), and tags, from a run's resolved config."""
    from engine.config import RunConfig, data_label, lr_label, method_label, model_label

    c = RunConfig.from_dict(config)
    dataset = c.dataset_name or c.dataset
    parts = (dataset, model_label(c), method_label(c), data_label(c), lr_label(c))  # no lr where nothing trains
    setting = "/".join(part for part in parts if part)
    tags = [f"exp{c.experiment}" if c.experiment else "no-paper-experiment", dataset, model_label(c), c.method,
            data_label(c)]
    return {"name": f"{setting}/seed{c.seed}", "group": setting, "tags": tags}


def start_tracking(enabled: bool, config: dict, run_dir: Path, name: str | None = None) -> Tracker:
    """A wandb run when --wandb or WANDB_MODE asks for one, else a silent tracker.

    The project and entity come from --wandb_project / --wandb_entity, else WANDB_PROJECT /
    WANDB_ENTITY, else the project 'cytology-lora' of the default entity.
    """
    if not enabled and "WANDB_MODE" not in os.environ:
        return Tracker()
    mode = _mode()
    if mode == "disabled":
        return Tracker()
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

        who = identity(config) if "method" in config else {"name": name, "group": None, "tags": ["report"]}
        run = wandb.init(
            project=config.get("wandb_project") or os.environ.get("WANDB_PROJECT", "cytology-lora"),
            entity=config.get("wandb_entity") or os.environ.get("WANDB_ENTITY") or None,
            name=who["name"],
            group=who["group"],
            tags=who["tags"],
            config=config,
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True, init_timeout=60),
        )
    except Exception as exc:  # noqa: BLE001 - logging must never cost a run
        print(f"warning: Weights & Biases disabled ({type(exc).__name__}: {exc})", file=sys.stderr)
        return Tracker()
    if mode == "offline":
        print(f"Weights & Biases: offline run in {run_dir}/wandb (sync later with `wandb sync`)", file=sys.stderr)
    return Tracker(run)
