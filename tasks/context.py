"""What a method or a task sees of a run: the typed context the engine hands them (engine.context.RunContext)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Context(Protocol):
    """Settings, split, model and device of one run; frozen features on demand; its step budgets."""

    config: Any  # engine.config.RunConfig: the resolved run configuration
    out: Path  # the run folder
    split: Any  # datasets.Split: train/val/test items, classes, task, captions
    spec: Any  # models.ModelSpec: the model, its encoders, preprocessing and facts
    device: Any  # torch.device
    precision: str

    def features(self, part: str) -> tuple[Any, Any]:
        """Frozen backbone features and labels of one part of the split."""

    def epoch_steps(self, warmup_epochs: bool = False) -> int:
        """Warmup plus n_iters epochs of the train set."""

    def probe_steps(self) -> int:
        """The linear probe's budget (the paper's experiment 1)."""

    def paper_steps(self) -> int:
        """The paper's LoRA budget: warmup + n_iters x K steps few-shot, n_iters epochs otherwise."""
