"""Export a finished run's classifier as one self-contained model: backbone (LoRA merged) plus head.

    python -m utils.export --run results/runs/folder/.../seed1-ab12cd34 --out exported/
    module, info = load_exported("exported/")     # normalised images -> logits; no hub download

The folder holds `model.safetensors` (the state dict of ``methods.heads.ImageClassifier``: the
backbone under ``backbone.``, the head under ``head.``) and `model.json` (model key, backbone,
weights source, classes, preprocessing, method and settings, the head's architecture, and what the outputs
mean: the run's task, the activation to apply and, for multi-label runs, the thresholds chosen on validation).
`load_exported` rebuilds the architecture with ``models.load_model(key, backbone=..., weights="random")``
and loads the state dict into it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from common.errors import UserError, exit_status
from common.io import atomic_write, write_json_atomic
from engine.results import RESULTS_FILE, read_results
from lora.merge import has_adapters, merge_adapters
from methods import get_method
from methods.heads import LINEAR_HEAD, ImageClassifier
from models import load_model as load_backbone
from tasks import get_task
from utils.cli import open_run
from utils.predict import require_run, run_overrides

MODEL_FILE = "model.safetensors"
INFO_FILE = "model.json"
FORMAT = "cytology-lora-export"
FORMAT_VERSION = 1


# -- heads: described and rebuilt by the method that made them -----------------------------------
def head_codec(method_name: str):
    """The head codec of a registered method (methods.heads.HeadCodec; a linear head when it declares none)."""
    return get_method(method_name).head_codec or LINEAR_HEAD


def describe_head(method_name: str, head: nn.Module) -> dict:
    """What rebuilds `head` (before its state dict is loaded): its kind and the facts its method needs."""
    codec = head_codec(method_name)
    return {"kind": codec.kind, **codec.describe(head)}


def build_head(method_name: str, info: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """The head `describe_head` described; `state` (the head's tensors) gives buffers their shapes."""
    codec = head_codec(method_name)
    if info.get("kind") != codec.kind:
        raise UserError(f"{INFO_FILE} describes a {info.get('kind')!r} head, and method {method_name} builds "
                        f"{codec.kind!r} heads: export the run again with this version of the toolkit")
    return codec.rebuild(info, state)


# -- export ------------------------------------------------------------------------------------
def exported_classifier(ctx, plan) -> tuple[nn.Module, bool]:
    """The run's classifier as images -> logits, with its adapters (LoRA, DoRA, singular values) merged into the
    backbone (in place).

    Returns the module (``ImageClassifier``: ``backbone`` = the model spec's module, ``head``) and
    whether LoRA layers were merged. `ctx, plan` come from ``utils.cli.open_run``.
    """
    if plan.inputs == "features":
        return ImageClassifier(ctx.spec, plan.model), False
    if not isinstance(plan.model, ImageClassifier) or plan.model.backbone is not ctx.spec.model:
        raise UserError(f"cannot export the {type(plan.model).__name__} of method {ctx.config.method}: export "
                        "knows image methods built as methods.heads.ImageClassifier")
    merged = has_adapters(ctx.spec.model)
    ctx.spec.model = merge_adapters(ctx.spec.model)
    plan.model.backbone = ctx.spec.model
    return plan.model, merged


def export_info(ctx, plan, merged: bool, head: dict) -> dict:
    """model.json: what the exported module is, how to feed it, what its outputs mean (the run's task:
    activation, thresholds) and where it came from."""
    spec, config = ctx.spec, ctx.config
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "inputs": "images (B, 3, S, S): RGB in [0, 1], then (x - mean) / std",
        "model": {"key": spec.key, "backbone": spec.backbone, "weights": spec.weights,
                  "architecture": spec.architecture, "feature_dim": spec.feature_dim},
        "classes": list(ctx.split.classes),
        "preprocessing": {"input_size": spec.input_size, "mean": list(spec.mean), "std": list(spec.std),
                          "resize": "whole image to input_size x input_size, bicubic, no crop"},
        "method": config.method, "method_settings": config.method_settings, "method_inputs": plan.inputs,
        "lora_merged": merged,
        "head": head,
        "run": str(Path(ctx.out).resolve()), "dataset": config.dataset, "seed": config.seed,
        "split_sha256": getattr(ctx.split, "sha256", None),
    }


def task_facts(ctx) -> dict:
    """What the run's task says about the classifier's outputs (task, activation, thresholds); refuses tasks
    whose runs have no classifier to export."""
    task = get_task(ctx.split.task)
    record = read_results(Path(ctx.out) / RESULTS_FILE) if (Path(ctx.out) / RESULTS_FILE).is_file() else {}
    return task.export_info(record)


def export_run(ctx, plan, out: str | Path) -> Path:
    """Write model.safetensors, then model.json (last: its presence means a complete export); the folder."""
    out = Path(out).expanduser()
    facts = task_facts(ctx)  # before anything is merged or written: a task without a classifier is refused here
    module, merged = exported_classifier(ctx, plan)
    head = describe_head(ctx.config.method, module.head)
    module.to("cpu").eval()
    (out / INFO_FILE).unlink(missing_ok=True)  # an overwritten export is never half old, half new
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    atomic_write(out / MODEL_FILE, lambda tmp: save_model(module, str(tmp), metadata=metadata))
    write_json_atomic(out / INFO_FILE, {**export_info(ctx, plan, merged, head), **facts})
    return out


# -- loading -------------------------------------------------------------------------------------
def load_exported(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(module, info) of an export: the module maps normalised images to logits, in eval mode; info is model.json.

    The architecture comes from ``models.load_model(key, backbone=..., weights="random")``, so nothing is
    downloaded; every tensor of the module must be in model.safetensors.
    """


    info = read_info(folder)
    path = Path(folder).expanduser() / MODEL_FILE
    if not path.is_file():
        raise UserError(f"no {MODEL_FILE} in {folder}: export the run again with python -m utils.export")
    state = load_file(str(path))
    head_state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    model = info["model"]
    spec = load_backbone(model["key"], backbone=model.get("backbone"), weights="random")
    module = ImageClassifier(spec, build_head(info.get("method", ""), info["head"], head_state))
    missing, unexpected = load_model(module, str(path), strict=False)
    if missing or unexpected:
        what = f"{len(missing)} missing (e.g. {sorted(missing)[0]})" if missing else ""
        what += ("; " if missing and unexpected else "") + (
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[0]})" if unexpected else "")
        raise UserError(f"{path} does not fit model {model['key']} rebuilt from {INFO_FILE}: {what}; export the run "
                        "again with this version of the toolkit")
    return module.to(device).eval(), info


def read_info(folder: str | Path) -> dict:
    """model.json of an export, checked to be one."""
    path = Path(folder).expanduser() / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no {INFO_FILE} in {folder}: point at a folder written by python -m utils.export") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({type(exc).__name__}): export the run again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} file: point at a folder written by python -m utils.export")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has format version {info['format_version']}, newer than this toolkit's "
                        f"{FORMAT_VERSION}: update the toolkit")
    return info


# -- command line ------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run folder (results.json and its weights)")
    p.add_argument("--out", required=True, help="the folder to write model.safetensors and model.json into")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    p.add_argument("--root_path", default=None, help="where the run's dataset lives on this machine, if it moved")
    p.add_argument("--device", default="cpu", help="where to load and merge the model (default cpu)")
    return p


def run(args: argparse.Namespace) -> int:
    """Check the folders, load the run, merge, write."""
    folder = require_run(args.run)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    existing = [name for name in (MODEL_FILE, INFO_FILE) if (out / name).exists()]
    if existing and not args.overwrite:
        raise UserError(f"{out} already holds an export ({', '.join(existing)}): add --overwrite to replace it")
    ctx, plan = open_run(folder, run_overrides(args))
    export_run(ctx, plan, out)
    print(f"exported {ctx.config.method} on {ctx.spec.key} ({len(ctx.split.classes)} classes): "
          f"{out / MODEL_FILE}, {out / INFO_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print `error: ...` and return 2."""
    args = _parser().parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
