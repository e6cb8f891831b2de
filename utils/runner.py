"""One run of an experiment: data, model, adaptation, training, evaluation, results."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import UserError
from common.io import write_json_atomic
from common.seeding import seed_everything
from utils import images as img
from utils.augment import augment_batch, normalise
from utils.cli import DEMO_BANNER
from utils.config import RESULTS_FILE, RunConfig, is_finished, model_label, run_dir
from utils.metrics import compute_metrics
from utils.results import SCHEMA_VERSION, environment
from utils.tracking import start_tracking
from utils.trainer import CHECKPOINT_FILE, Trainer, TrainSettings, TrainStats, batch_indices, predict

LORA_FILE = "lora.safetensors"
HEAD_FILE = "head.safetensors"
SPLIT_FILE = "split.json"
EVAL_FILE = "eval_results.json"
PROMPTS = {"sipakmed": "A cytological slide showing a {} cell", "hicervix": "A cytological slide showing a {} cell"}
DEFAULT_PROMPT = "A cytological slide showing {} cells"
# settings that do not change what a run computes; a checkpoint may be resumed across them
RUNTIME_FIELDS = {"output_dir", "device", "num_workers", "wandb", "overwrite", "eval_only", "lora_path",
                  "checkpoint_every", "root_path"}


# -- devices ------------------------------------------------------------------------------
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


# -- the parts of a run -------------------------------------------------------------------
def fingerprint(config: RunConfig) -> str:
    """Hash of the settings that define what a run computes (a checkpoint resumes only under the same)."""
    d = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def load_data(config: RunConfig):
    """The run's split, checked against --num_classes."""
    from datasets import load_split

    split = load_split(
        config.root_path or None, config.dataset, shots=config.shots, seed=config.seed,
        level=config.level, percentage=config.percentage,
    )
    if config.num_classes is not None and config.num_classes != len(split.classes):
        raise UserError(
            f"--num_classes {config.num_classes} disagrees with the data: {config.dataset} has "
            f"{len(split.classes)} classes ({', '.join(split.classes)}); drop the flag or fix it"
        )
    return split


def load_backbone(config: RunConfig):
    from models import load_model

    backbone = config.backbone if config.model_name == "clip" else None
    return load_model(config.model_name, backbone=backbone, weights=config.weights)


def class_prompts(dataset: str, classes: list[str]) -> list[str]:
    """The paper's prompts, with class names made readable."""
    template = PROMPTS.get(dataset, DEFAULT_PROMPT)
    return [template.format(c.replace("_", " ")) for c in classes]


def count_parameters(module: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())


class ImageClassifier(nn.Module):
    """Backbone image features followed by a linear head."""

    def __init__(self, spec, head: nn.Linear):
        super().__init__()
        self.backbone = spec.model
        self.head = head
        self._encode = spec.encode_image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._encode(x))


@dataclass
class Context:
    """What every run shares once data and model are known."""

    config: RunConfig
    out: Path
    split: object
    spec: object
    device: torch.device
    precision: str

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.spec.mean, device=self.device)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.spec.std, device=self.device)


def prepare_context(config: RunConfig) -> Context | None:
    """Everything that can fail because of a user mistake happens here, before anything is written."""
    out = run_dir(config)
    if config.dataset == "demo":
        print(DEMO_BANNER, file=sys.stderr)
    if not config.eval_only and is_finished(out) and not config.overwrite:
        print(f"already finished: {out / RESULTS_FILE} (add --overwrite to run it again)")
        return None
    seed_everything(config.seed)
    split = load_data(config)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    spec = load_backbone(config)
    if config.textual and not spec.has_text:
        raise UserError(
            f"--textual True needs a text encoder, and {config.model_name} has none: "
            "use a CLIP-family model (clip, quilt, biomedclip) or --textual False"
        )
    return Context(config, out, split, spec, device, precision)


def start_run(ctx: Context) -> None:
    """With --overwrite, training starts afresh: an earlier checkpoint is dropped, results stay until replaced.

    The run folder itself appears with the first checkpoint or the final results, so a run
    stopped by a user mistake leaves nothing behind.
    """
    if ctx.config.overwrite:
        (ctx.out / CHECKPOINT_FILE).unlink(missing_ok=True)


def evaluate(ctx: Context, module: nn.Module, samples, name: str) -> dict:
    """Metrics of a classifier on one part of the split."""
    if not samples:
        return {}
    batches = img.iterate_batches(samples, ctx.spec.input_size, ctx.config.batch_size, ctx.config.num_workers)
    mean, std = ctx.mean, ctx.std
    total = -(-len(samples) // ctx.config.batch_size)
    probs, labels = predict(module, batches, lambda x: normalise(x, mean, std), ctx.device, ctx.precision,
                            total, desc=f"eval {name}")
    return compute_metrics(probs.numpy(), labels.numpy(), ctx.split.classes)


def write_results(ctx: Context, metrics: dict, stats: TrainStats | None, trainable: int, total: int,
                  path: Path | None = None, extra: dict | None = None) -> Path:
    """The run's results.json, written atomically as the very last step."""
    c = ctx.config
    split = ctx.split
    record = {
        "schema_version": SCHEMA_VERSION,
        "experiment": c.experiment,
        "method": c.method,
        "dataset": c.dataset,
        "model_name": c.model_name,
        "model_label": model_label(c),
        "seed": c.seed,
        "shots": c.shots,
        "percentage": c.percentage,
        "level": split.level,
        "lr": c.lr,
        "synthetic_demo": c.dataset == "demo",
        "config": c.to_dict(),
        "model": {"key": ctx.spec.key, "weights": ctx.spec.weights, "feature_dim": ctx.spec.feature_dim,
                  "input_size": ctx.spec.input_size},
        "classes": list(split.classes),
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
        "left_out": getattr(split, "left_out", 0),
        "split_sha256": split.sha256,
        "trainable_params": trainable,
        "total_params": total,
        "metrics": metrics,
        "timing": {
            "train_seconds": round(stats.train_seconds, 3) if stats else 0.0,
            "images_per_second": round(stats.images_per_second, 2) if stats else 0.0,
            "train_steps": stats.steps if stats else 0,
            "resumed_from_step": stats.resumed_from if stats else 0,
        },
        "env": environment(str(ctx.device), ctx.precision),
    }
    record.update(extra or {})
    path = path or ctx.out / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name == RESULTS_FILE:
        split.write_manifest(ctx.out / SPLIT_FILE)
    write_json_atomic(path, record)
    return path


def report(ctx: Context, metrics: dict, path: Path, stats: TrainStats | None) -> None:
    """A short human summary on stdout."""
    for part in ("val", "test"):
        m = metrics.get(part)
        if m:
            print(f"{part:>4}: accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}  "
                  f"macro-F1 {m['macro_f1']:.4f}  (n={m['n']})")
    if stats and stats.steps:
        print(f"train: {stats.steps} steps in {stats.train_seconds:.1f} s ({stats.images_per_second:.1f} images/s)")
    print(f"results: {path}")
    if ctx.config.dataset == "demo":
        print(DEMO_BANNER)


def _save_head(head: nn.Linear, path: Path, classes: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp),
              metadata={"classes": json.dumps(list(classes))})
    tmp.replace(path)


def _load_head(head: nn.Linear, path: Path, classes: list[str]) -> None:
    if not path.is_file():
        raise UserError(f"no classifier head at {path}: point --lora_path at a finished LoRA run folder")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        saved = json.loads((f.metadata() or {}).get("classes", "[]"))
    if saved != list(classes):
        raise UserError(f"{path} was trained on classes {saved}, but this data has {list(classes)}")
    head.load_state_dict(load_file(str(path)))


def finish_run(ctx: Context, head: nn.Linear, trainer: Trainer, tracker, metrics: dict, stats: TrainStats,
               trainable: int, total: int) -> int:
    """Save the head, write results.json last, then drop the checkpoint and report."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    _save_head(head, ctx.out / HEAD_FILE, ctx.split.classes)
    path = write_results(ctx, metrics, stats, trainable, total)
    trainer.remove_checkpoint()
    tracker.summary(_flat_metrics(metrics))
    tracker.finish()
    report(ctx, metrics, path, stats)
    return 0


# -- experiment 1 -------------------------------------------------------------------------
def run_linear(config: RunConfig) -> int:
    """Frozen backbone features (cached) and a linear head trained on them."""
    from utils.features import extract_features

    ctx = prepare_context(config)
    if ctx is None:
        return 0
    spec, split, c = ctx.spec, ctx.split, ctx.config
    spec.model.to(ctx.device).eval()
    for p in spec.model.parameters():
        p.requires_grad_(False)
    backbone = c.backbone if c.model_name == "clip" else None
    feats = {}
    for part in ("train", "val", "test"):
        samples = getattr(split, part)
        if samples:
            feats[part] = extract_features(spec, samples, ctx.device, ctx.precision, c.batch_size,
                                           c.num_workers, backbone, desc=f"features {part}")
    head = nn.Linear(spec.feature_dim, len(split.classes))
    if c.textual:
        with torch.no_grad(), torch.autocast(ctx.device.type, enabled=False):
            text = spec.encode_text(class_prompts(c.dataset, split.classes)).float()
        head.weight.data.copy_(torch.nn.functional.normalize(text, dim=-1).cpu())
        head.bias.data.zero_()
    head.to(ctx.device)
    start_run(ctx)
    x_train, y_train = feats["train"]
    per_epoch = max(len(y_train) // c.batch_size, 1)
    settings = _settings(c, ctx, c.warmup_steps + c.n_iters * per_epoch)
    tracker = start_tracking(c.wandb, c.to_dict(), ctx.out, ctx.out.as_posix())
    trainer = Trainer(head, settings, ctx.out, fingerprint(c))
    trainer.try_resume()

    def batches(start: int):
        for idx in batch_indices(len(y_train), c.batch_size, c.seed, start):
            ids = torch.as_tensor(idx)
            yield x_train[ids], y_train[ids]

    stats = trainer.fit(batches, lambda x, g: x, log=tracker.log, desc="train head")
    metrics = {}
    for part in ("val", "test"):
        if part in feats:
            x, y = feats[part]
            probs, labels = predict(head, iter([(x, y)]), lambda t: t, ctx.device, "fp32", 1, desc=f"eval {part}")
            metrics[part] = compute_metrics(probs.numpy(), labels.numpy(), split.classes)
    trainable, _ = count_parameters(head)
    total = trainable + sum(p.numel() for p in spec.model.parameters())
    return finish_run(ctx, head, trainer, tracker, metrics, stats, trainable, total)


# -- experiments 2 and 3 ------------------------------------------------------------------
def _settings(c: RunConfig, ctx: Context, total_steps: int) -> TrainSettings:
    return TrainSettings(
        lr=c.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps, total_steps=total_steps,
        min_lr=c.min_lr, seed=c.seed, device=ctx.device, precision=ctx.precision,
        checkpoint_every=c.checkpoint_every,
    )


def lora_settings(c: RunConfig) -> dict:
    """What an adapter file records and checks when loaded back."""
    return {"r": c.r, "alpha": c.alpha, "scaling": c.scaling, "params": list(c.params), "position": c.position,
            "encoder": c.encoder, "dropout_rate": c.dropout_rate, "model_key": model_label(c)}


def lora_steps(c: RunConfig, n_train: int) -> int:
    """The paper's budget: n_iters x shots steps in few-shot mode, n_iters epochs otherwise."""
    if c.shots > 0:
        main = c.n_iters * c.shots
    else:
        main = c.n_iters * max(n_train // c.batch_size, 1)
    return c.warmup_steps + main


def run_lora(config: RunConfig) -> int:
    """LoRA in the backbone and a linear head, trained together on images."""
    from lora import apply_lora, load_lora, save_lora

    ctx = prepare_context(config)
    if ctx is None:
        return 0
    spec, split, c = ctx.spec, ctx.split, ctx.config
    apply_lora(spec.model, params=c.params, r=c.r, alpha=c.alpha, dropout_rate=c.dropout_rate,
               position=c.position, encoder=c.encoder, scaling=c.scaling)
    head = nn.Linear(spec.feature_dim, len(split.classes))
    module = ImageClassifier(spec, head).to(ctx.device)
    if c.eval_only:
        return _eval_only(ctx, module, load_lora)
    data = img.IndexedBatches(split.train, spec.input_size, c.num_workers)
    start_run(ctx)
    settings = _settings(c, ctx, lora_steps(c, len(split.train)))
    tracker = start_tracking(c.wandb, c.to_dict(), ctx.out, ctx.out.as_posix())
    trainer = Trainer(module, settings, ctx.out, fingerprint(c))
    if trainer.try_resume():
        print(f"resuming from step {trainer.step} of {settings.total_steps}", file=sys.stderr)
    mean, std = ctx.mean, ctx.std

    def batches(start: int):
        return data.stream(batch_indices(len(data), c.batch_size, c.seed, start))

    stats = trainer.fit(batches, lambda x, g: augment_batch(x, mean, std, g), log=tracker.log, desc="train LoRA")
    metrics = {part: evaluate(ctx, module, getattr(split, part), part) for part in ("val", "test")}
    metrics = {k: v for k, v in metrics.items() if v}
    ctx.out.mkdir(parents=True, exist_ok=True)
    save_lora(spec.model, ctx.out / LORA_FILE, lora_settings(c))
    trainable, total = count_parameters(module)
    return finish_run(ctx, head, trainer, tracker, metrics, stats, trainable, total)


def _eval_only(ctx: Context, module: ImageClassifier, load_lora) -> int:
    """Reload saved adapters and head, evaluate, and write eval_results.json beside them."""
    c = ctx.config
    source = Path(c.lora_path)
    folder = source if source.is_dir() else source.parent
    adapter = source / LORA_FILE if source.is_dir() else source
    if not adapter.is_file():
        raise UserError(f"no adapter at {adapter}: point --lora_path at a finished LoRA run folder")
    out = folder / EVAL_FILE
    if out.exists() and not c.overwrite:
        raise UserError(f"{out} exists: add --overwrite to replace it")
    load_lora(ctx.spec.model, adapter, lora_settings(c))
    _load_head(module.head, folder / HEAD_FILE, ctx.split.classes)
    module.to(ctx.device)
    t0 = time.perf_counter()
    metrics = {part: evaluate(ctx, module, getattr(ctx.split, part), part) for part in ("val", "test")}
    metrics = {k: v for k, v in metrics.items() if v}
    trainable, total = count_parameters(module)
    path = write_results(ctx, metrics, None, trainable, total, path=out,
                         extra={"eval_only": True, "lora_path": str(adapter), "eval_seconds": time.perf_counter() - t0})
    report(ctx, metrics, path, None)
    return 0


def _flat_metrics(metrics: dict) -> dict:
    return {f"{part}/{k}": v for part, m in metrics.items() for k, v in m.items() if isinstance(v, (int, float))}

