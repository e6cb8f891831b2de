"""Command-line parsing shared by main.py and main_lora.py, and the error boundary of both."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from common.errors import UserError, exit_status
from utils.config import RunConfig

DEMO_BANNER = (
    "SYNTHETIC DEMO: generated cell images and a small randomly initialised model, run offline. "
    "The numbers show that the pipeline learns; they are not a medical result."
)


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


def build_parser(lora: bool) -> argparse.ArgumentParser:
    """The paper's flags, plus ours; `lora` adds the LoRA and percentage flags."""
    d = RunConfig()
    prog = "main_lora.py" if lora else "main.py"
    what = "LoRA fine-tuning (experiments 2 and 3)" if lora else "frozen backbone + linear head (experiment 1)"
    p = _Parser(prog=prog, description=f"cytology-lora: {what}. With no arguments, runs the offline demo.")
    g = p.add_argument_group("data")
    g.add_argument("--root_path", default=d.root_path, help="folder holding the datasets")
    g.add_argument("--dataset", default=d.dataset, help="mlcc, bcfc, sipakmed, hicervix, folder or demo")
    g.add_argument("--level", default=None, help="HiCervix labels: level_1, level_2, level_3 (default), class_name")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--shots", type=int, default=d.shots, help="images per class; -1 = all; 0 with --pourcentage")
    g.add_argument("--num_classes", type=int, default=None, help="optional; checked against the data")
    g = p.add_argument_group("model")
    g.add_argument("--model_name", default=d.model_name, help="clip, quilt, biomedclip, uni, vit_google, ...")
    g.add_argument("--backbone", default=d.backbone, help="CLIP backbone: ViT-B/16, ViT-B/32 or ViT-L/14")
    g.add_argument("--weights", default=None, help="local weights file or folder, or 'random'")
    g.add_argument("--textual", type=_bool, default=d.textual, help="True: start the head from text embeddings")
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--n_iters", type=int, default=d.n_iters)
    g.add_argument("--batch_size", type=int, default=d.batch_size)
    g.add_argument("--checkpoint_every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    if lora:
        g.add_argument(
            "--pourcentage", "--percentage", dest="percentage", type=float, default=None,
            help="with --shots 0: percent of each class used for train and val",
        )
        g = p.add_argument_group("LoRA")
        g.add_argument("--position", default=d.position, help="bottom, mid, up, half-up, half-bottom, all, top, top3")
        g.add_argument("--encoder", default=d.encoder, help="vision, text or both")
        g.add_argument("--params", nargs="+", default=list(d.params), help='q k v o and/or pw; "q v", q v or qv')
        g.add_argument("--r", type=int, default=d.r)
        g.add_argument("--alpha", type=float, default=d.alpha)
        g.add_argument("--dropout_rate", type=float, default=d.dropout_rate)
        g.add_argument("--scaling", default=d.scaling, help="sqrt: alpha/sqrt(r) (the paper); standard: alpha/r")
        g.add_argument("--eval_only", action="store_true", help="evaluate saved adapters (needs --lora_path)")
        g.add_argument("--lora_path", default=None, help="run folder or lora.safetensors to evaluate")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=d.output_dir)
    g.add_argument("--device", default=d.device, help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps, cpu")
    g.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--num_workers", type=int, default=d.num_workers)
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline without a login)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in the same folder")
    return p


def _demo_overrides(lora: bool) -> dict:
    """The settings of the no-argument demo: small, offline, a few minutes on two CPU cores."""
    return dict(dataset="demo", model_name="tiny_clip", shots=16, n_iters=25 if lora else 100,
                lr=1e-3 if lora else 1e-2, batch_size=32, demo=True, output_dir=os.path.join("results", "demo"))


def parse_config(argv: Sequence[str] | None, lora: bool) -> RunConfig:
    """Parse arguments into a RunConfig; no arguments at all means the demo."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(lora).parse_args(argv)
    values = vars(args)
    config = RunConfig(**{k: v for k, v in values.items() if k in RunConfig.__dataclass_fields__})
    if not argv:
        for key, value in _demo_overrides(lora).items():
            setattr(config, key, value)
    if config.percentage == 0 and config.shots != 0:
        config.percentage = None  # the paper's scripts pass --pourcentage 0 to mean "not used"
    if lora:
        from lora import parse_params

        config.params = tuple(parse_params(args.params))
        config.experiment = 3 if config.shots == 0 else 2
    else:
        config.experiment = 1
        config.params = ()
    _validate(config, lora)
    return config


def _validate(config: RunConfig, lora: bool) -> None:
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
        if getattr(config, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if config.lr <= 0:
        raise UserError(f"--lr must be positive, got {config.lr:g}")
    if lora and config.r < 1:
        raise UserError(f"--r {config.r} is invalid: the LoRA rank must be at least 1")
    if lora and not 0 <= config.dropout_rate < 1:
        raise UserError(f"--dropout_rate {config.dropout_rate:g} must be in [0, 1)")
    if config.eval_only and not config.lora_path:
        raise UserError("--eval_only needs --lora_path (a run folder or its lora.safetensors)")
    if config.weights and config.weights != "random" and not os.path.exists(config.weights):
        raise UserError(f"--weights {config.weights} does not exist: give a local weights file or folder, or 'random'")


def run_cli(main: Callable[[], int]) -> int:
    """Run an entry point: user mistakes become one line on stderr and exit status 2."""
    from utils.trainer import TrainingInterrupted

    try:
        return exit_status(main)
    except TrainingInterrupted as exc:
        where = f"; checkpoint saved to {exc.path}" if exc.path else ""
        print(f"interrupted at step {exc.step}{where}: rerun the same command to resume", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
