"""The training loop shared by every method: schedule, precision, checkpoints, data parallelism.

Every step's randomness (batch order, augmentation, dropout) is a function of the seed and
the step number, so a run resumed from a checkpoint continues exactly as if it had never
stopped. Augmentation is drawn per sample from (seed, step, position in the global batch), so
N processes under torchrun, each training on a slice of the global batch, draw what one
process draws; their gradients are averaged with weights that make the result the mean over
the global batch.
"""

from __future__ import annotations

import math
import pickle
import signal
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common.errors import UserError
from common.io import atomic_write
from common.seeding import rng_state, set_rng_state
from engine import distributed as dist
from engine.distributed import Shard

CHECKPOINT_FILE = "checkpoint.pt"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class CompileFailed(UserError):
    """--compile: torch.compile could not build the training step (no C++ compiler, no Triton...)."""


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when its backend cannot compile (InductorError, e.g. a missing C++ compiler
    or Triton, is a BackendCompilerFailed)."""
    from torch._dynamo.exc import BackendCompilerFailed

    return (BackendCompilerFailed,)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    # the lr schedule, a key of SCHEDULES: "warmup_cosine" (every method) or "cosine_annealing" (the original
    # code's experiment 1, --compat seed), whose cosine restarts every `cycle_steps` steps
    schedule: str = "warmup_cosine"
    cycle_steps: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    compile: bool = False  # torch.compile the module's training forward (self.module and its state_dict unchanged)
    # torch.compile's mode: "default", or "reduce-overhead" (CUDA graphs: for small, launch-bound steps on a GPU)
    compile_mode: str = "default"
    # rows of a full global batch (min(batch size, train set)); with `compile`, smaller batches are padded to it so
    # that one graph serves every step. 0: the largest batch seen so far
    full_batch: int = 0


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


def cosine_annealing_factor(step: int, warmup: int, cycle: int, base_lr: float, min_lr: float) -> float:
    """The original code's experiment 1 schedule (``--compat seed``), as a factor of base_lr at `step`.

    Its linear probe (mdausort/Cytology-fine-tuning, ``lora.py``, ``run_uni``) builds
    ``CosineAnnealingLR(T_max=cycle, eta_min=min_lr)`` and pytorch_warmup's ``LinearWarmup(warmup)`` and,
    after every batch, steps the cosine inside ``warmup_scheduler.dampening()`` once the warmup's step
    count reaches ``warmup - 1``. So step i runs at ``cosine(max(i - warmup + 1, 0)) * min(1, (i + 1) / warmup)``,
    where ``cosine(t) = min_lr + (base_lr - min_lr) (1 + cos(pi t / cycle)) / 2`` is CosineAnnealingLR's
    closed form: T_max counts batches, so the lr swings between base_lr and min_lr every `cycle` steps
    for the whole run. ``warmup`` 0 is taken as 1 (no dampening, the cosine stepped after every batch).
    """
    warmup = max(warmup, 1)
    t = max(step - warmup + 1, 0)
    lr = min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t / max(cycle, 1)))
    return lr * min(1.0, (step + 1) / warmup) / base_lr


# lr schedules by name (TrainSettings.schedule, from the method's Stage): the factor of the base lr at a step
SCHEDULES: dict[str, Callable[[int, TrainSettings], float]] = {
    "warmup_cosine": lambda step, s: lr_factor(step, s.warmup_steps, s.total_steps, s.lr, s.min_lr),
    "cosine_annealing": lambda step, s: cosine_annealing_factor(step, s.warmup_steps, s.cycle_steps, s.lr, s.min_lr),
}


def step_seed(seed: int, step: int) -> int:
    """The seed of one training step."""
    return (seed * 1_000_003 + step) % (2**63 - 1)


def sample_seeds(seed: int, step: int, first: int, count: int) -> list[int]:
    """The augmentation seeds of samples first, ..., first + count - 1 of one step's global batch."""
    base = step_seed(seed, step) * 1_000_033
    return [(base + first + i) % (2**63 - 1) for i in range(count)]


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's global RNG (LoRA dropout) for one step on one rank: deterministic, but
    not the same masks as one process draws over the whole batch."""
    return (step_seed(seed, step) + rank * 1_000_000_007) % (2**63 - 1)


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one epoch: the last partial batch is kept, as the original code's loaders do, unless
    `drop_last` (which still keeps one batch when the set is smaller than a batch)."""
    return max(n // batch_size, 1) if drop_last else max(-(-n // batch_size), 1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n samples in one epoch: a permutation seeded by (seed, epoch), drawn on the CPU."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, -1 - epoch)))


def batch_slices(n: int, batch_size: int, seed: int, start_step: int, drop_last: bool = False
                 ) -> Iterator[tuple[torch.Tensor, int, int]]:
    """Endless (epoch order, start, stop): the batch of each step from `start_step` on is order[start:stop].

    One epoch order serves all of its batches (the same tensor object), so a consumer can move it to its
    device once per epoch and index there."""
    per_epoch = steps_per_epoch(n, batch_size, drop_last)
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        order = epoch_order(n, seed, epoch)
        for b in range(offset, per_epoch):
            yield order, b * batch_size, min((b + 1) * batch_size, n)
        epoch, offset = epoch + 1, 0


def batch_indices(n: int, batch_size: int, seed: int, start_step: int, drop_last: bool = False
                  ) -> Iterator[list[int]]:
    """Endless shuffled batches; epoch e is a permutation seeded by (seed, e), cut into steps_per_epoch
    batches (the last one partial unless `drop_last`)."""
    for order, start, stop in batch_slices(n, batch_size, seed, start_step, drop_last):
        yield order[start:stop].tolist()


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


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's tensors and plain values; torch.load with weights_only=True, so that a file crafted to run
    code on unpickling is refused instead. UserError for a tampered, truncated or corrupt file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds more than tensors and plain values (it was not written by this tool, or "
                        "was altered), so it is not loaded: delete it, or add --overwrite, to start this run "
                        "again") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path} is truncated or corrupt ({_first_line(exc, 120)}): delete it, or add "
                        "--overwrite, to start this run again") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint of this tool: delete it, or add --overwrite, to start this "
                        "run again")
    return state


def _plain_rng_state(state: dict) -> dict:
    """RNG states as tensors and plain values (NumPy's key array as a tensor), loadable with weights_only."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "python": list(state["python"]),
            "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached]}


def _native_rng_state(state: dict) -> dict:
    """The inverse of _plain_rng_state."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "python": (version, tuple(internal), gauss),
            "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)}


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
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                 forward_targets: bool = False):
        self.module = module
        self.loss_fn = loss_fn
        self.forward_targets = forward_targets  # the module takes (inputs, targets), e.g. image-text pairs
        self.extra_state: dict = {}  # what a caller keeps across a resume (e.g. the best validation so far)
        self._seconds_before, self._images_before = 0.0, 0  # earlier attempts of this stage (from a checkpoint)
        self._t0: float | None = None
        self._images_now = 0
        self.extra_loss = extra_loss
        self.checkpoint_name = checkpoint_name
        self.s = settings
        self.run_dir = run_dir
        self.fingerprint = fingerprint
        self.params = [p for p in module.parameters() if p.requires_grad]
        # on a GPU the fused AdamW: a few kernels per step instead of a Python loop over the parameters
        fused = settings.device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in self.params)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.999),
            **({"fused": True} if fused and self.params else {})
        )
        if settings.schedule not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {settings.schedule!r}; known: {', '.join(SCHEDULES)}")
        schedule = SCHEDULES[settings.schedule]
        # a pure function of the step: a resumed run (scheduler state: the step) continues the same lrs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: schedule(step, settings))
        self.scaler = torch.amp.GradScaler(settings.device.type, enabled=settings.precision == "fp16")
        self.step = 0
        self._pad_rows: int | None = None  # set by fit (see _padded_rows)

    # -- checkpoints -------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / self.checkpoint_name

    def save_checkpoint(self) -> Path | None:
        """Write trainable weights, optimiser, schedule, step and RNG states atomically (rank 0; the
        other ranks, whose state is the same, wait until it is written)."""
        path = self.checkpoint_path
        if path is None:
            return None
        with dist.main_writes() as writer:
            if writer:
                state = {
                    "fingerprint": self.fingerprint,
                    "step": self.step,
                    "trainable": _trainable_state(self.module),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": _plain_rng_state(rng_state()),
                    # time and images of every attempt so far, so that a resumed run's timing adds up
                    "seconds": self._seconds_so_far(),
                    "images": self._images_before + self._images_now,
                    "extra": self.extra_state,
                }
                atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    def try_resume(self) -> int:
        """Load the run's checkpoint if there is one; returns the step training resumes at."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return 0
        state = read_checkpoint(path)
        if state.get("fingerprint") != self.fingerprint:  # before any of it is used
            raise UserError(
                f"{path} was saved by a run with other settings: rerun the original command to resume it, "
                "or add --overwrite to start again"
            )
        try:
            missing = self.module.load_state_dict(state["trainable"], strict=False)
            if any(k in state["trainable"] for k in missing.unexpected_keys):
                raise UserError(f"{path} does not match this model: add --overwrite to start again")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            set_rng_state(_native_rng_state(state["rng"]))
            self.step = int(state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"{path} is incomplete or damaged ({_first_line(exc, 120)}): delete it, or add "
                            "--overwrite, to start this run again") from None
        self._seconds_before = float(state.get("seconds", 0.0))
        self._images_before = int(state.get("images", 0))
        self.extra_state.update(state.get("extra", {}))
        return self.step

    # -- training ----------------------------------------------------------------------
    def fit(
        self,
        batches: Callable[[int], Iterator[tuple]],
        prepare: Callable[[torch.Tensor, list[int]], torch.Tensor],
        log: Callable[[dict], None] | None = None,
        desc: str = "train",
        after_step: Callable[[int], None] | None = None,
    ) -> TrainStats:
        """Train from the current step to total_steps.

        `batches(start)` yields, for steps start, start+1, ..., either the global batch
        ``(inputs, labels)`` (each rank then takes its slice) or this rank's slice of it
        ``(inputs, labels, Shard)``; `prepare(inputs_on_device, sample_seeds)` turns them into model
        inputs (augmentation seeded per sample). `after_step(step)`, when given, runs after every step
        (e.g. validation; it may put the module in eval mode, training mode is restored after it).

        The loop does not wait for the device: each step's loss stays there, and the host reads the losses
        of the last steps together every `log_every` steps, before a checkpoint, at a signal and at the last
        step. A NaN or infinite loss therefore stops the run with TrainingDiverged naming the step where it
        appeared, at most `log_every` steps later and before any checkpoint holds its weights.
        """
        s = self.s
        start = self.step
        images, loss_value = 0, float("nan")
        self.module.train()
        freeze_batchnorm(self.module)
        forward = self._forward_module()
        self._pad_rows = self._padded_rows()
        compile_errors = _compile_errors() if s.compile else ()  # catches nothing without --compile
        progress = tqdm(total=s.total_steps, initial=start, desc=desc, unit="step", leave=False,
                        **dist.quiet_unless_main())
        t0 = self._t0 = time.perf_counter()
        self._images_now = 0
        pending: list[torch.Tensor] = []  # the losses of the steps since the host last read them
        agree = _StopAgreement()
        with _catch_signals() as received:
            for item in batches(start):
                if self.step >= s.total_steps:
                    break
                inputs, labels, shard = _local_part(item)
                try:
                    pending.append(self._one_step(forward, inputs, labels, shard, prepare))
                except compile_errors as exc:
                    if self.step != start:  # compilation happens in the first step
                        raise
                    progress.close()
                    raise CompileFailed(
                        f"--compile: torch.compile could not build the training step ({_first_line(exc)}); "
                        "drop --compile to train without it (or install what it needs: a C++ compiler on the "
                        "CPU, Triton on a GPU)"
                    ) from None
                images += shard.total
                self._images_now = images
                self.step += 1
                progress.update(1)
                stop = agree(bool(received))  # every rank agrees on the step, so they all stop together
                checkpoint = s.checkpoint_every > 0 and self.step % s.checkpoint_every == 0 \
                    and self.step < s.total_steps
                if stop or checkpoint or self.step % s.log_every == 0 or self.step == s.total_steps:
                    loss_value = self._read_losses(pending)
                    pending.clear()
                    progress.set_postfix(loss=f"{loss_value:.4f}")
                    if log is not None:
                        rate = images / max(time.perf_counter() - t0, 1e-9)
                        log({"train/loss": loss_value, "train/lr": self.scheduler.get_last_lr()[0],
                             "train/images_per_second": rate}, self.step)
                if after_step is not None:
                    after_step(self.step)
                    self.module.train()
                    freeze_batchnorm(self.module)
                if stop:
                    path = self.save_checkpoint()
                    progress.close()
                    raise TrainingInterrupted(self.step, received[0] if received else signal.SIGTERM, path)
                if checkpoint:
                    self.save_checkpoint()
        if pending:  # the batches ran out before total_steps
            loss_value = self._read_losses(pending)
        progress.close()
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
        seconds = self._seconds_so_far()
        self._t0 = None
        return TrainStats(self.step - start, self._images_before + images, seconds, loss_value, start)

    def _read_losses(self, pending: list[torch.Tensor]) -> float:
        """The global loss of the last pending step, read with one device-to-host copy (and under torchrun one
        all-reduce) for all of them; TrainingDiverged names the first step whose loss is not finite."""
        values = dist.all_sum(torch.stack(pending).tolist())
        first = self.step - len(values) + 1  # the step number (from 1) of values[0]
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"the loss became {value} at step {first + i}: lower the learning rate "
                    f"(--lr {self.s.lr:g} now) or use --precision fp32"
                )
        return values[-1]

    def _seconds_so_far(self) -> float:
        """Training time of this stage over every attempt: earlier ones (from the checkpoint) and this one."""
        now = 0.0 if self._t0 is None else time.perf_counter() - self._t0
        return self._seconds_before + now

    def _padded_rows(self) -> int | None:
        """Rows this rank's batches are padded to under `compile` (one graph for every step, the epoch's last
        partial batch included); None without `compile`, 0 when the full batch is not known (the largest batch
        seen so far is used). Image-text stages are not padded: their outputs depend on the whole batch."""
        if not self.s.compile or self.forward_targets:
            return None
        return -(-self.s.full_batch // dist.world_size())

    def _forward_module(self) -> nn.Module:
        """The module itself, or under torchrun a DistributedDataParallel wrapper that averages gradients.

        With `compile`, the module's torch.compile wrapper instead, inside DDP under torchrun (PyTorch's
        advice: compile the module DDP wraps; DDP's gradient buckets then split the compiled graphs). Only
        the training forward goes through it: self.module, whose state the checkpoints and the engine save
        and load, stays the plain module (a compiled wrapper's state_dict keys would gain `_orig_mod.`).

        Shapes are static (dynamic=False): every batch is padded to the full batch's rows (see _pad), so a run
        compiles one graph. `compile_mode` "reduce-overhead" records it as a CUDA graph."""
        module = self.module
        if self.s.compile:
            mode = None if self.s.compile_mode == "default" else self.s.compile_mode
            module = torch.compile(self.module, dynamic=False, mode=mode)
        if not dist.active():
            return module
        device = self.s.device
        return DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,  # buffers are frozen (normalisation statistics stay fixed)
            # the same parameters take part in every step; parameters that never do (a text tower that
            # requires grad while images are trained) keep no gradient, as in one process
            static_graph=True,
        )

    def _pad(self, inputs: torch.Tensor) -> torch.Tensor:
        """`inputs` with copies of its first row appended up to the padded rows (compile only). The padded rows'
        outputs are cut off before the loss, so they change neither the loss nor any gradient."""
        if self._pad_rows is None:
            return inputs
        self._pad_rows = max(self._pad_rows, len(inputs))
        missing = self._pad_rows - len(inputs)
        if missing == 0:
            return inputs
        return torch.cat([inputs, inputs[:1].expand(missing, *inputs.shape[1:])])

    def _one_step(self, forward: nn.Module, inputs, labels, shard: Shard, prepare) -> torch.Tensor:
        """One optimiser step; returns this rank's share of the loss over the global batch, on the device
        (nothing here waits for the device)."""
        s = self.s
        seed_step(dropout_seed(s.seed, self.step, dist.rank()), s.device)  # dropout of this step
        seeds = sample_seeds(s.seed, self.step, shard.first, len(labels))
        inputs = prepare(inputs.to(s.device, non_blocking=True), seeds)
        labels = labels.to(s.device, non_blocking=True)
        if s.compile and s.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
        rows = len(inputs)
        with autocast(s.device, s.precision):
            logits = forward(inputs, labels) if self.forward_targets else forward(self._pad(inputs))[:rows]
        task = self.loss_fn(logits.float(), labels)
        # DDP averages gradients over N ranks; weighting each slice's mean by N x its share of the
        # global batch makes that average the mean over the global batch, partial batches included.
        world = dist.world_size()
        factor = shard.weight * world
        loss = task if factor == 1.0 else task * factor  # (x * 1.0 is x: one operation less per step)
        extra = self.extra_loss(self.module) if self.extra_loss is not None else None
        if extra is not None:
            loss = loss + extra  # the same on every rank, so its average is itself
        reported = task.detach() if shard.weight == 1.0 else task.detach() * shard.weight
        if extra is not None:
            reported = reported + extra.detach() / world
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return reported


class _StopAgreement:
    """Whether any rank has received a signal, agreed by all ranks after every step without waiting for the
    device: one process reads its own flag; under torchrun the flags are summed over a CPU (gloo) group."""

    _groups: dict = {}  # one gloo group per default process group, made once (its creation is collective)

    def __init__(self):
        self.group = None
        if dist.active():
            import torch.distributed as tdist

            default = tdist.group.WORLD
            if tdist.get_backend() == "gloo":
                self.group = default
            else:
                if default not in self._groups:
                    self._groups[default] = tdist.new_group(backend="gloo")
                self.group = self._groups[default]

    def __call__(self, received: bool) -> bool:
        if self.group is None:
            return received
        import torch.distributed as tdist

        flag = torch.tensor([1 if received else 0], dtype=torch.int32)
        tdist.all_reduce(flag, group=self.group)
        return bool(flag.item())


def seed_step(seed: int, device: torch.device) -> None:
    """Seed torch's generators of the CPU and of `device` (dropout): what torch.manual_seed does for them,
    without its lazy seeding of every other device type on every call (milliseconds per step)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[torch.cuda.current_device() if device.index is None else device.index
                                      ].manual_seed(seed)
    elif device.type != "cpu":
        getattr(torch, device.type).manual_seed(seed)


def _local_part(item: tuple) -> tuple[torch.Tensor, torch.Tensor, Shard]:
    """(inputs, labels, Shard) of this rank from a global batch or an already sliced one."""
    if len(item) == 3:
        return item
    inputs, labels = item
    shard = dist.shard_batch(range(len(labels)))
    if shard.count == len(labels):
        return inputs, labels, shard
    ids = torch.as_tensor(shard.indices)
    return inputs[ids], labels[ids], shard


@torch.no_grad()
def collect_batches(
    fn: Callable[[torch.Tensor], torch.Tensor],
    module: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    precision: str,
    total: int | None = None,
    desc: str = "eval",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run `fn` (a forward of `module`, which is put in eval mode) over batches; per batch, float32
    outputs and labels on the CPU."""
    module.eval()
    out = []
    for inputs, labels in tqdm(batches, total=total, desc=desc, unit="batch", leave=False,
                               **dist.quiet_unless_main()):
        with autocast(device, precision):
            outputs = fn(prepare(inputs.to(device)))
        out.append((outputs.float().cpu(), torch.as_tensor(labels)))
    return out
