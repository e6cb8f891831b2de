"""Optional Weights & Biases logging that never blocks and never asks a question."""

from __future__ import annotations

import os
import sys
from pathlib import Path


class Tracker:
    """Logs to wandb when enabled; every method is a no-op otherwise."""

    def __init__(self, run=None):
        self.run = run

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


def start_tracking(enabled: bool, config: dict, run_dir: Path, name: str) -> Tracker:
    """A wandb run when --wandb or WANDB_MODE asks for one, else a silent tracker."""
    if not enabled and "WANDB_MODE" not in os.environ:
        return Tracker()
    mode = _mode()
    if mode == "disabled":
        return Tracker()
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "cytology-lora"),
            name=name,
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
