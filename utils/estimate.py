"""What a sweep costs before it runs (``bash launch_run.sh ... --estimate``).

For every pending run: its training steps (from its own resolved settings and split, through the
engine's budgets ``RunContext.epoch_steps`` and ``paper_steps``), the images of those steps, and the
images it passes through the backbone without training (feature extraction, evaluation). Seconds
come from timing, on this machine, one training step of every stage after a warm-up step, for
each model, method and batch size of the grid, on synthetic inputs of the model's own input size
(the model and the method's plan are built as a run builds them); or from ``--step_seconds``,
given by the user, and then nothing is timed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import io
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from engine.config import RunConfig, model_label, run_dir

PARTS = ("train", "val", "test")


# -- what each method runs -------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A method's plan as far as cost goes: its stages (name, inputs, budget), the parts of the split
    whose frozen features it needs (extracted once per model and images, then cached), and whether it
    evaluates on features or on images."""

    stages: tuple[tuple[str, str, str | int], ...]  # budget: "epoch", "probe", "paper" or a number of steps
    feature_parts: tuple[str, ...]
    evaluates_on: str


def _feature_head(name: str, budget: str = "epoch") -> Callable[[object], Shape]:
    def shape(s) -> Shape:
        stages = [(name, "features", budget)]
        if getattr(s, "transductive", "none") != "none":
            stages.append(("transductive", "features", s.ti_steps))
        return Shape(tuple(stages), PARTS, "features")

    return shape


def _on_images(name: str) -> Callable[[object], Shape]:
    return lambda s: Shape(((name, "images", "paper"),), (), "images")


# What each method's build() decides (methods/*.py), by name: which budget each stage takes (a
# RunContext method: epoch_steps, probe_steps or paper_steps) and what passes through the backbone.
# A second record of those decisions: a method missing here is reported as such, never guessed.
_SHAPES: dict[str, Callable[[object], Shape]] = {
    "linear": _feature_head("linear", "probe"),
    "prototype": _feature_head("prototype"),
    "adapter": _feature_head("adapter"),
    "lora": _on_images("lora"),
    "dora": _on_images("dora"),
    "bitfit": _on_images("bitfit"),
    "full": _on_images("full"),
    "lp_ft": lambda s: Shape((("lp", "features", "epoch"), ("ft", "images", "paper")), ("train",), "images"),
    "zeroshot": lambda s: Shape((), ("val", "test"), "features"),
    "simpleshot": lambda s: Shape((), PARTS, "features"),
    "knn": lambda s: Shape((), PARTS, "features"),
}


def method_shape(config: RunConfig) -> Shape | None:
    """The cost shape of the config's method, None for a method this module does not know."""
    from methods import get_method

    method = get_method(config.method)
    known = _SHAPES.get(method.name)
    if known is not None:
        return known(method.resolve(config.method_settings))
    # a method that trains nothing costs no steps; its forward passes count as features of every part
    return None if method.trains else Shape((), PARTS, "features")


# -- steps of one run --------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSteps:
    """One training stage of one run: steps, and how many images each step holds."""

    name: str
    inputs: str
    steps: int
    batch: int  # images in a full step: min(--batch_size, train images)
    partial_steps: int = 0  # steps that hold only an epoch's last, partial batch
    partial_batch: int = 0

    @property
    def images(self) -> int:
        return (self.steps - self.partial_steps) * self.batch + self.partial_steps * self.partial_batch


def _stage_steps(config: RunConfig, n_train: int, name: str, inputs: str, steps: int) -> StageSteps:
    """Split `steps` into full and partial batches the way engine.trainer.batch_indices draws them."""
    from engine.trainer import steps_per_epoch

    b = config.batch_size
    rest = n_train % b
    if config.drop_last or n_train <= b or rest == 0:
        return StageSteps(name, inputs, steps, min(b, max(n_train, 1)))
    partial = steps // steps_per_epoch(n_train, b, config.drop_last)  # one per completed epoch
    return StageSteps(name, inputs, steps, b, partial, rest)


def run_stages(config: RunConfig, split, shape: Shape) -> list[StageSteps]:
    """The training stages of one run, with the engine's own step budgets for its split."""
    import torch

    from engine.context import RunContext

    # A context without a model: the budgets read only the settings and the split.
    ctx = RunContext(config=config, out=run_dir(config), split=split, spec=None, device=torch.device("cpu"),
                     precision="fp32")
    out = []
    for name, inputs, budget in shape.stages:
        with contextlib.redirect_stderr(io.StringIO()):  # paper_steps' note on small classes, once per run
            budgets = {"epoch": ctx.epoch_steps, "probe": ctx.probe_steps, "paper": ctx.paper_steps}
            steps = budgets[budget]() if isinstance(budget, str) else int(budget)
        out.append(_stage_steps(config, len(split.train), name, inputs, steps))
    return out


# -- timing ----------------------------------------------------------------------------------
@dataclass
class Timing:
    """Measured on this machine for one (model, method) build: seconds per step of each stage at each
    batch size, seconds per image of a forward pass, and the model's build time."""

    label: str
    device: str = ""
    step_seconds: dict[tuple[str, int], float] = field(default_factory=dict)  # (stage, batch) -> s
    forward_seconds: float = 0.0  # per image, no gradient
    startup_seconds: float = 0.0  # building the model (a run pays it once)
    note: str = ""  # e.g. timed with random init because the weights cannot be loaded here
    error: str = ""  # why nothing could be timed

    def step(self, stage: StageSteps) -> float:
        """Seconds of a stage's steps: full batches as timed, partial ones in proportion to their images."""
        full = self.step_seconds[(stage.name, stage.batch)]
        return (stage.steps - stage.partial_steps) * full + stage.partial_steps * full * stage.partial_batch / \
            stage.batch


def _quiet():
    """Keep the output of model building and training (banners, progress bars) out of the estimate."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _short(exc: BaseException, limit: int = 160) -> str:
    """The exception's type and first line, cut to `limit` characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _context(config: RunConfig, split):
    """The run's context with its model loaded and synthetic frozen features, plus the build seconds.

    Mirrors engine.context.prepare_context without its checks (every image decodes, the run is not
    finished), which an estimate must not pay for or stop at.
    """
    import torch

    from common.seeding import seed_everything
    from engine.context import RunContext, resolve_device, resolve_precision
    from models import load_model

    seed_everything(config.seed)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    t0 = time.perf_counter()
    spec = load_model(config.model_name, backbone=config.backbone, weights=config.weights)
    startup = time.perf_counter() - t0
    spec.model.requires_grad_(False)
    ctx = RunContext(config=config, out=run_dir(config), split=split, spec=spec, device=device, precision=precision)
    classes = max(len(split.classes), 1)
    for part in PARTS:  # methods that read features at build time get random ones of the right shape
        n = max(len(split.items(part)), classes)
        ctx._features[part] = (torch.randn(n, spec.feature_dim), torch.arange(n) % classes)
    return ctx, startup


def _synthetic_batches(ctx, stage, batch: int, times: list[float]):
    """Endless batches of `batch` random inputs for a stage, stamping the time each one is asked for."""
    import torch

    classes = max(len(ctx.split.classes), 1)
    if stage.inputs == "features":
        x = torch.randn(batch, ctx.spec.feature_dim)
    else:
        size = ctx.spec.input_size
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    y = torch.arange(batch) % classes

    def batches(start: int):
        while True:
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            times.append(time.perf_counter())
            yield x, y

    return batches


def _prepare(ctx, stage):
    """How the engine turns a stage's batches into model inputs (as engine.batches.stage_batches, which cannot be
    called here: it decodes the whole train set)."""
    from engine.augment import augment_batch_seeded, normalise

    if stage.inputs == "features":
        return lambda x, seeds: x
    mean, std = ctx.mean, ctx.std
    if stage.augment:
        return lambda x, seeds: augment_batch_seeded(x, mean, std, seeds)
    return lambda x, seeds: normalise(x, mean, std)


def time_step(ctx, stage, batch: int) -> float:
    """Seconds of one optimisation step of `stage` on `batch` inputs, after one warm-up step, run by
    the engine's trainer (forward, loss, backward, optimiser and schedule)."""
    from engine.trainer import Trainer, TrainSettings

    c = ctx.config
    settings = TrainSettings(lr=stage.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps, total_steps=2,
                             min_lr=c.min_lr, seed=c.seed, device=ctx.device, precision=ctx.precision,
                             checkpoint_every=0)
    trainer = Trainer(stage.module, settings, None, "estimate", extra_loss=stage.extra_loss)
    times: list[float] = []
    trainer.fit(_synthetic_batches(ctx, stage, batch, times), _prepare(ctx, stage))
    return times[2] - times[1]  # batch 3 is asked for once step 2 has finished


def time_forward(ctx, batch: int) -> float:
    """Seconds per image of a frozen forward pass (feature extraction, evaluation), after a warm-up."""
    import torch

    from engine.augment import normalise
    from engine.trainer import autocast

    size = ctx.spec.input_size
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=ctx.device)
    ctx.spec.model.to(ctx.device).eval()
    seconds = []
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            with autocast(ctx.device, ctx.precision):
                ctx.spec.encode_image(normalise(x, ctx.mean, ctx.std))
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            seconds.append(time.perf_counter() - t0)
    return seconds[1] / batch


def measure(config: RunConfig, split, batches: dict[str, set[int]], startups: dict | None = None) -> Timing:
    """Build the run's model and plan as the engine does, then time each stage at each batch size.

    A model whose weights cannot be loaded here is timed with random initialisation (the same
    architecture computes at the same speed); a model or method that cannot be built or timed at
    all is reported in the timing, not raised.
    """
    from engine.trainer import TrainingInterrupted

    timing = Timing(label=f"{model_label(config)} {config.method}")
    try:
        with _quiet():
            ctx = _load(config, split, timing)
            _time_plan(ctx, batches, timing)
    except TrainingInterrupted:  # Ctrl-C while a step is timed: the trainer caught it, stop here
        raise KeyboardInterrupt from None
    except Exception as exc:  # noqa: BLE001 -- any failure of a model or method is reported, not raised
        timing.error = _short(exc)
    finally:
        _release()
    if startups is not None and not timing.error:
        # A run is a fresh process: its start-up is the model's first load here, imports included.
        model = (config.model_name, config.backbone, "random" if timing.note else config.weights)
        timing.startup_seconds = startups.setdefault(model, timing.startup_seconds)
    return timing


def _load(config: RunConfig, split, timing: Timing):
    """The run's context, from its own weights or, where they cannot be loaded here, random ones."""
    from engine.context import resolve_device

    resolve_device(config.device)  # a device missing here is no reason to try other weights
    try:
        ctx, timing.startup_seconds = _context(config, split)
    except Exception as exc:
        if config.weights == "random":
            raise
        timing.note = f"weights not loadable here ({_short(exc)}); timed with random init"
        ctx, timing.startup_seconds = _context(dataclasses.replace(config, weights="random"), split)
    timing.device = f"{ctx.device.type} ({ctx.precision})"
    return ctx


def _time_plan(ctx, batches: dict[str, set[int]], timing: Timing) -> None:
    from methods import get_method

    config = ctx.config
    method = get_method(config.method)
    plan = method.build(ctx, method.resolve(config.method_settings))
    plan.model.to(ctx.device)
    built = {stage.name for stage in plan.stages}
    if not set(batches) <= built:
        raise RuntimeError(f"its plan has the stages {sorted(built)}, the estimate expected {sorted(batches)}; "
                           "update utils/estimate.py")
    for stage in plan.stages:
        for batch in sorted(batches.get(stage.name, ()), reverse=True):
            timing.step_seconds[(stage.name, batch)] = time_step(ctx, stage, batch)
    timing.forward_seconds = time_forward(ctx, config.batch_size)


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the estimate ------------------------------------------------------------------------------
@dataclass
class RunCost:
    """One pending run: its stages and the images it forwards without training."""

    config: RunConfig
    stages: list[StageSteps]
    forward_keys: list[tuple[str, int]]  # (what, images): features are keyed so that shared ones count once
    eval_images: int  # val and test through the trained model (never cached)
    timing_key: tuple

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.stages)


@dataclass
class Estimate:
    """The cost of a sweep's pending runs; text() is what --estimate prints."""

    pending: int
    finished: int
    runs: list[RunCost] = field(default_factory=list)
    unknown: dict[str, int] = field(default_factory=dict)  # method -> runs whose budget is unknown
    timings: dict[tuple, Timing] = field(default_factory=dict)
    step_seconds: float | None = None
    workers: int = 1
    notes: list[str] = field(default_factory=list)

    # totals over the runs whose cost is known
    def steps(self, inputs: str | None = None) -> int:
        return sum(s.steps for r in self.runs for s in r.stages if inputs in (None, s.inputs))

    def images(self, inputs: str = "images") -> int:
        return sum(s.images for r in self.runs for s in r.stages if s.inputs == inputs)

    def forward_images(self) -> int:
        unique = {key: n for r in self.runs for key, n in r.forward_keys}
        return sum(unique.values()) + sum(r.eval_images for r in self.runs)

    def seconds(self) -> dict[str, float]:
        """Seconds of the runs that could be timed: training, forward passes and start-up (training only,
        on images, with --step_seconds)."""
        if self.step_seconds is not None:
            return {"training": self.steps("images") * self.step_seconds}
        out = {"training": 0.0, "forward passes": 0.0, "start-up": 0.0}
        seen: set = set()
        for r in self.timed_runs():
            t = self.timings[r.timing_key]
            out["training"] += sum(t.step(s) for s in r.stages)
            new = [(k, n) for k, n in r.forward_keys if k not in seen]
            seen.update(k for k, _ in new)
            out["forward passes"] += t.forward_seconds * (sum(n for _, n in new) + r.eval_images)
            out["start-up"] += t.startup_seconds
        return out

    def timed_runs(self) -> list[RunCost]:
        if self.step_seconds is not None:
            return list(self.runs)
        return [r for r in self.runs if r.timing_key in self.timings and not self.timings[r.timing_key].error]

    def text(self) -> str:
        known = len(self.runs)
        lines = [f"estimate: {self.pending} runs to run, {self.finished} finished (not counted)"]
        if not self.pending:
            return "\n".join(lines)
        lines.append(f"  training: {self.steps():,} steps; {self.steps('images'):,} on images "
                     f"({self.images('images'):,} images), {self.steps('features'):,} on cached features")
        lines.append(f"  forward passes without training: {self.forward_images():,} images "
                     "(feature extraction once per model and images, evaluation of val and test)")
        for method, n in sorted(self.unknown.items()):
            lines.append(f"  {n} {method} run(s) not counted: the estimate does not know the stages of "
                         f"--method {method}")
        seconds = self.seconds()
        if self.step_seconds is not None:
            lines.append(f"  wall time at {self.step_seconds:g} s per training step on images (--step_seconds; "
                         f"nothing timed): {duration(seconds['training'])} for {known} runs")
            lines.append("  not counted: steps on cached features, forward passes, start-up of each run")
        else:
            lines += self._timing_lines()
            timed = self.timed_runs()
            parts = ", ".join(f"{k} {duration(v)}" for k, v in seconds.items())
            device = next((t.device for t in self.timings.values() if t.device), "this machine")
            lines.append(f"  wall time on this device, {device}: {duration(sum(seconds.values()))} for "
                         f"{len(timed)} of {self.pending} runs ({parts})")
            lines.append("  start-up = each model's first load in this process (imports included); not counted: "
                         "starting each run's interpreter (a few seconds), decoding images, features cached by "
                         "earlier sweeps")
        if self.workers > 1:
            lines.append(f"  with {self.workers} workers (--gpus), if the runs spread evenly: about "
                         f"{duration(sum(seconds.values()) / self.workers)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)

    def _timing_lines(self) -> list[str]:
        lines = ["  timed here, one step after a warm-up step per model, method and batch size:"]
        for t in self.timings.values():
            if t.error:
                n = sum(1 for r in self.runs if self.timings.get(r.timing_key) is t)
                lines.append(f"    {t.label}: cannot be timed here ({t.error}); its {n} run(s) are left out "
                             "of the wall time")
                continue
            by_stage: dict[str, list[str]] = {}
            for (stage, b), s in t.step_seconds.items():
                by_stage.setdefault(stage, []).append(f"{s:.3g} s at batch {b}")
            steps = "; ".join(f"{stage} step {', '.join(v)}" for stage, v in by_stage.items())
            lines.append(f"    {t.label}: {steps or 'no training'}; forward {t.forward_seconds * 1000:.3g} "
                         f"ms/image; model built in {t.startup_seconds:.1f} s")
            if t.note:
                lines.append(f"      {t.note}")
        return lines


def duration(seconds: float) -> str:
    """1 h 05 min, 12 min 30 s, 4.2 s."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours / 24:.1f} days ({hours} h)"


def _data_key(c: RunConfig) -> tuple:
    return (c.root_path, c.dataset, c.shots, c.seed, c.level, c.percentage, c.protocol, c.level_fallback,
            c.label_map, c.num_classes, c.cv, c.fold, c.compat)


def _timing_key(c: RunConfig) -> tuple:
    """Runs that compute at the same speed: model architecture, method and its settings, device."""
    return (c.model_name, c.backbone, c.method, json.dumps(c.method_settings, sort_keys=True), c.device,
            c.precision)


def _paths_key(c: RunConfig, part: str, items: Sequence) -> tuple[str, int]:
    """Features are cached per model, weights and images: one key per such set."""
    digest = hashlib.sha256("\n".join(p for p, _ in items).encode()).hexdigest()[:16]
    return f"{model_label(c)}|{c.weights}|{part}|{digest}", len(items)


def _load_splits(configs: Iterable[RunConfig], notes: list[str]) -> dict[tuple, object]:
    """Each distinct split once (no model), with what the loader said kept as notes."""
    from engine.context import load_data

    splits: dict[tuple, object] = {}
    for c in configs:
        key = _data_key(c)
        if key not in splits:
            said = io.StringIO()
            with contextlib.redirect_stderr(said):
                splits[key] = load_data(c)
            notes += [line for line in said.getvalue().splitlines() if line.strip() and line not in notes]
    return splits


def estimate(jobs: Sequence, step_seconds: float | None = None, workers: int = 1, finished: int = 0) -> Estimate:
    """The cost of running `jobs` (sweep Jobs, or anything with a .config): steps, images, seconds."""
    configs = [getattr(j, "config", j) for j in jobs]
    result = Estimate(pending=len(configs), finished=finished, step_seconds=step_seconds, workers=workers)
    splits = _load_splits(configs, result.notes)
    batches: dict[tuple, dict[str, set[int]]] = {}
    first: dict[tuple, RunConfig] = {}
    for c in configs:
        shape = method_shape(c)
        if shape is None:
            result.unknown[c.method] = result.unknown.get(c.method, 0) + 1
            continue
        split = splits[_data_key(c)]
        stages = run_stages(c, split, shape)
        features = [_paths_key(c, part, split.items(part)) for part in shape.feature_parts]
        evals = len(split.val) + len(split.test) if shape.evaluates_on == "images" else 0
        key = _timing_key(c)
        result.runs.append(RunCost(c, stages, features, evals, key))
        first.setdefault(key, c)
        for s in stages:
            batches.setdefault(key, {}).setdefault(s.name, set()).add(s.batch)
    if step_seconds is None:
        startups: dict = {}
        for key, c in first.items():
            result.timings[key] = measure(c, splits[_data_key(c)], batches.get(key, {}), startups)
    return result
