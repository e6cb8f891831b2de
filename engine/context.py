"""The run's context: devices and precision, the split and model it runs on, and its step budgets.

``prepare_context`` is the first stage of a run: everything that can fail because of a user mistake
happens there, before anything is written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import UserError
from common.seeding import seed_everything
from datasets import get_dataset, load_split
from engine import images as img
from engine import results as res
from engine.config import RunConfig, model_label, run_dir
from engine.features import cache_root, extract_features
from engine.session import Session
from engine.trainer import steps_per_epoch
from methods import get_method
from methods.registry import settings_dict
from models import load_model

DEMO_BANNER = (
    "SYNTHETIC DEMO: generated cell images and a small randomly initialised model, run offline. "
    "The numbers show that the pipeline learns; they are not a medical result."
)


def resolve_device(name: str) -> torch.device:
    """auto = cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    return device

def resolve_precision(name: str, device: torch.device) -> str:
    """auto = bf16 on GPUs that support it, fp16 (with loss scaling) on older ones, fp32 elsewhere."""
    if name != "auto":
        if name != "fp32" and device.type == "cpu":
            return name if name == "bf16" else "fp32"
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"

@dataclass
class RunContext:
    """What a method sees: settings, split, model, device; frozen features on demand; step budgets."""

    config: RunConfig
    out: Path
    split: object
    spec: object
    device: torch.device
    precision: str
    _features: dict = field(default_factory=dict, repr=False)

    @property
    def model_label(self) -> str:
        return model_label(self.config)

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.spec.mean, device=self.device)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.spec.std, device=self.device)

    def features(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen backbone features and labels of one part of the split (cached on disk and here)."""
        if part not in self._features:
            c = self.config
            self.spec.model.to(self.device).eval()
            self._features[part] = extract_features(
                self.spec, self.split.items(part), self.device, self.precision, c.batch_size, c.num_workers,
                c.backbone, desc=f"features {part}")
        return self._features[part]

    def epoch_steps(self, warmup_epochs: bool = False) -> int:
        """Warmup plus n_iters epochs of the train set (the linear probe's budget).

        ``warmup_epochs``: warmup + n_iters whole epochs instead, as the original code's experiment 1
        counts its 50 warmup steps in epochs (``--compat seed``).
        """
        c = self.config
        per_epoch = steps_per_epoch(len(self.split.train), c.batch_size, c.drop_last)
        if warmup_epochs:
            return (c.warmup_steps + c.n_iters) * per_epoch
        return c.warmup_steps + c.n_iters * per_epoch

    def probe_steps(self) -> int:
        """The linear probe's budget (the paper's experiment 1): epoch_steps, or with --compat seed the
        original code's warmup + n_iters whole epochs."""
        return self.epoch_steps(warmup_epochs=self.config.compat == "seed")

    def paper_steps(self) -> int:
        """The paper's LoRA budget: warmup + n_iters x K steps few-shot, n_iters epochs otherwise.

        K is the largest number of train images actually drawn for a class, which is smaller than
        --shots when every class has fewer images than asked.
        """
        c = self.config
        if c.shots > 0:
            # image-text pairs without classes are one class: K pairs in all
            drawn = max(self.split.counts()["train"].values(), default=len(self.split.train))
            if drawn < c.shots:
                print(f"note: no class has {c.shots} train images (at most {drawn}); the step budget uses "
                      f"K = {drawn}", file=sys.stderr)
            return c.warmup_steps + c.n_iters * max(min(c.shots, drawn), 1)
        return self.epoch_steps()

def synthetic(config: RunConfig) -> bool:
    return get_dataset(config.dataset).synthetic

def load_data(config: RunConfig):
    """The run's split, checked against --num_classes."""
    split = load_split(config.root_path or None, config.dataset, shots=config.shots, seed=config.seed,
                       level=config.level, percentage=config.percentage, protocol=config.protocol,
                       level_fallback=config.level_fallback or "original", label_map=config.label_map,
                       cv=config.cv, fold=config.fold, replacement=config.compat == "seed")
    if config.num_classes is not None and config.num_classes != len(split.classes):
        raise UserError(
            f"--num_classes {config.num_classes} disagrees with the data: {config.dataset} has "
            f"{len(split.classes)} classes ({', '.join(split.classes)}); drop the flag or fix it"
        )
    return split

def _cache_dir() -> Path:
    return cache_root().parent

def class_warnings(split) -> list[str]:
    """Classes too thin to support a conclusion: fewer than 2 train images, or none in test."""
    counts = split.counts()
    out = [f"class {name!r} has {n} train image(s): its metrics rest on almost nothing"
           for name, n in counts["train"].items() if n < 2]
    absent = [name for name, n in counts["test"].items() if n == 0]
    if absent and split.test:
        out.append(f"class(es) {', '.join(map(repr, absent))} absent from test: balanced accuracy and macro "
                   "scores average over the other classes only")
    return out

def _warn_about_classes(split) -> None:
    for message in class_warnings(split):
        print(f"warning: {message}", file=sys.stderr)

def prepare_context(config: RunConfig, session: Session | None = None) -> RunContext | None:
    """Everything that can fail because of a user mistake happens here, before anything is written.

    With a `session` (a sweep worker's), the model is a copy of one built once and images already checked
    in it are not checked again."""
    out = Path(config.run) if config.eval_only else run_dir(config)
    if synthetic(config):
        print(DEMO_BANNER, file=sys.stderr)
    if not config.eval_only and res.is_finished(out) and not config.overwrite:
        print(f"already finished: {out / res.RESULTS_FILE} (add --overwrite to run it again)")
        return None
    seed_everything(config.seed)
    split = load_data(config)
    check = session.check_decodable if session else img.check_decodable
    check([path for part in ("train", "val", "test") for path, _ in split.items(part)], _cache_dir() / "decodable.json")
    _warn_about_classes(split)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    spec = (session.model if session else load_model)(config.model_name, backbone=config.backbone,
                                                      weights=config.weights)
    spec.model.requires_grad_(False)
    return RunContext(config, out, split, spec, device, precision)

def method_settings_of(config: RunConfig) -> dict:
    """The resolved settings of the config's method as plain values."""
    method = get_method(config.method)
    return settings_dict(method.resolve(config.method_settings))
