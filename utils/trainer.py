"""The training loop shared by every method: schedule, precision, checkpoints.

Every step's randomness (batch order, augmentation, dropout) is a function of the seed and
the step number, so a run resumed from a checkpoint continues exactly as if it had never
stopped.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from common.errors import UserError
from common.io import atomic_write
from common.seeding import rng_state, set_rng_state

CHECKPOINT_FILE = "checkpoint.pt"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was saved."""

    def __init__(self, step: int, signum: int, path: Path | None):
        self.step, self.signum, self.path = step, signum, path
        super().__init__(f"interrupted at step {step}")


@dataclass
class TrainSettings:
    """What the loop needs to know, independent of what is trained."""

    lr: float
    weight_decay: float
    warmup_steps: int
    total_steps: int
    min_lr: float
    seed: int
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    checkpoint_every: int = 200
    log_every: int = 10


@dataclass
class TrainStats:
    steps: int
    images: int
    train_seconds: float
    final_loss: float
    resumed_from: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.train_seconds if self.train_seconds > 0 else 0.0


def lr_factor(step: int, warmup: int, total: int, base_lr: float, min_lr: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from base_lr down to min_lr (the paper's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(step - warmup, span) / span
    lr = min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr / base_lr


def step_seed(seed: int, step: int) -> int:
    """The seed of one training step."""
    return (seed * 1_000_003 + step) % (2**63 - 1)


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one epoch: the last partial batch is kept, as the original code's loaders do, unless
    `drop_last` (which still keeps one batch when the set is smaller than a batch)."""
    return max(n // batch_size, 1) if drop_last else max(-(-n // batch_size), 1)


def batch_indices(n: int, batch_size: int, seed: int, start_step: int, drop_last: bool = False
                  ) -> Iterator[list[int]]:
    """Endless shuffled batches; epoch e is a permutation seeded by (seed, e), cut into steps_per_epoch
    batches (the last one partial unless `drop_last`)."""
    per_epoch = steps_per_epoch(n, batch_size, drop_last)
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, -1 - epoch)))
        for b in range(offset, per_epoch):
            yield order[b * batch_size : (b + 1) * batch_size].tolist()
        epoch, offset = epoch + 1, 0


def autocast(device: torch.device, precision: str):
    """Mixed-precision context for the forward pass."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def _catch_signals():
    """Turn SIGINT/SIGTERM into a flag checked between steps, so a checkpoint can be written."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k in names}


def freeze_batchnorm(module: nn.Module) -> None:
    """Keep normalisation statistics of a frozen backbone fixed while training."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class Trainer:
    """Runs the optimisation of the trainable parameters of one module."""

    def __init__(self, module: nn.Module, settings: TrainSettings, run_dir: Path | None, fingerprint: str,
                 checkpoint_name: str = CHECKPOINT_FILE, extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy):
        self.module = module
        self.loss_fn = loss_fn
        self.extra_loss = extra_loss
        self.checkpoint_name = checkpoint_name
        self.s = settings
        self.run_dir = run_dir
        self.fingerprint = fingerprint
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.999)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, settings.warmup_steps, settings.total_steps, settings.lr, settings.min_lr),
        )
        self.scaler = torch.amp.GradScaler(settings.device.type, enabled=settings.precision == "fp16")
        self.step = 0

    # -- checkpoints -------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / self.checkpoint_name

    def save_checkpoint(self) -> Path | None:
        """Write trainable weights, optimiser, schedule, step and RNG states atomically."""
        path = self.checkpoint_path
        if path is None:
            return None
        state = {
            "fingerprint": self.fingerprint,
            "step": self.step,
            "trainable": _trainable_state(self.module),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }
        return atomic_write(path, lambda tmp: torch.save(state, tmp))

    def try_resume(self) -> int:
        """Load the run's checkpoint if there is one; returns the step training resumes at."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return 0
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"{path} was saved by a run with other settings: rerun the original command to resume it, "
                "or add --overwrite to start again"
            )
        missing = self.module.load_state_dict(state["trainable"], strict=False)
        if any(k in state["trainable"] for k in missing.unexpected_keys):
            raise UserError(f"{path} does not match this model: add --overwrite to start again")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        return self.step

    def remove_checkpoint(self) -> None:
        if self.checkpoint_path is not None:
            self.checkpoint_path.unlink(missing_ok=True)

    # -- training ----------------------------------------------------------------------
    def fit(
        self,
        batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]],
        prepare: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        log: Callable[[dict], None] | None = None,
        desc: str = "train",
    ) -> TrainStats:
        """Train from the current step to total_steps.

        `batches(start)` yields (inputs, labels) for steps start, start+1, ...;
        `prepare(inputs_on_device, generator)` turns them into model inputs (augmentation).
        """
        s = self.s
        start = self.step
        images, loss_value = 0, float("nan")
        self.module.train()
        freeze_batchnorm(self.module)
        progress = tqdm(total=s.total_steps, initial=start, desc=desc, unit="step", leave=False)
        t0 = time.perf_counter()
        with _catch_signals() as received:
            for inputs, labels in batches(start):
                if self.step >= s.total_steps:
                    break
                loss_value = self._one_step(inputs, labels, prepare)
                images += len(labels)
                self.step += 1
                progress.update(1)
                if self.step % s.log_every == 0 or self.step == s.total_steps:
                    progress.set_postfix(loss=f"{loss_value:.4f}")
                    if log is not None:
                        log({"train/loss": loss_value, "train/lr": self.scheduler.get_last_lr()[0]}, self.step)
                if received:
                    path = self.save_checkpoint()
                    progress.close()
                    raise TrainingInterrupted(self.step, received[0], path)
                if s.checkpoint_every > 0 and self.step % s.checkpoint_every == 0 and self.step < s.total_steps:
                    self.save_checkpoint()
        progress.close()
        if s.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return TrainStats(self.step - start, images, seconds, loss_value, start)

    def _one_step(self, inputs, labels, prepare) -> float:
        s = self.s
        seed = step_seed(s.seed, self.step)
        torch.manual_seed(seed)  # dropout of this step; also seeds CUDA
        generator = torch.Generator().manual_seed(seed)
        inputs = prepare(inputs.to(s.device, non_blocking=True), generator)
        labels = labels.to(s.device, non_blocking=True)
        with autocast(s.device, s.precision):
            logits = self.module(inputs)
        loss = self.loss_fn(logits.float(), labels)
        if self.extra_loss is not None:
            loss = loss + self.extra_loss(self.module)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss.item()} at step {self.step + 1}: lower the learning rate "
                f"(--lr {s.lr:g} now) or use --precision fp32"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item()


@torch.no_grad()
def collect_outputs(
    fn: Callable[[torch.Tensor], torch.Tensor],
    module: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    precision: str,
    total: int | None = None,
    desc: str = "eval",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `fn` (a forward of `module`, which is put in eval mode) over batches; float32 outputs and labels."""
    module.eval()
    outputs, targets = [], []
    for inputs, labels in tqdm(batches, total=total, desc=desc, unit="batch", leave=False):
        with autocast(device, precision):
            out = fn(prepare(inputs.to(device)))
        outputs.append(out.float().cpu())
        targets.append(torch.as_tensor(labels))
    return torch.cat(outputs), torch.cat(targets)


def predict(module: nn.Module, batches, prepare, device, precision, total=None, desc="eval"):
    """Softmax probabilities and labels of a classifier over a stream of batches."""
    logits, labels = collect_outputs(module, module, batches, prepare, device, precision, total, desc)
    return logits.softmax(dim=1), labels
