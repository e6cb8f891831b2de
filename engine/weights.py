"""The trained state of a run: saved with what it belongs to, and reloaded only into the same run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import UserError
from common.io import atomic_write
from engine.config import model_label
from engine.context import RunContext
from methods.registry import Plan

WEIGHTS_FILE = "weights.safetensors"

def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

def _identity(ctx: RunContext) -> dict:
    c = ctx.config
    return {"method": c.method, "method_settings": json.dumps(c.method_settings, sort_keys=True),
            "classes": json.dumps(list(ctx.split.classes)), "model": model_label(c), "compat": c.compat}

def save_weights(ctx: RunContext, plan: Plan, folder: Path) -> None:
    """The trained parameters of the plan's classifier, with what they belong to, in weights.safetensors."""
    state = trained_state(plan.model)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata=_identity(ctx)))
    if plan.export is not None:
        plan.export(folder)

def load_weights(ctx: RunContext, plan: Plan, folder: Path) -> None:
    """Load what save_weights wrote; a file of another method, settings, model or classes is refused."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"no trained weights at {path}: point --run at a finished run folder of a trained method")
    try:
        with safe_open(str(path), "pt") as f:
            saved = {"compat": "none"} | (f.metadata() or {})  # files written before --compat existed: none
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is not a readable safetensors file ({exc}): rerun the run with --overwrite to "
                        "train it again") from None
    for key, value in _identity(ctx).items():
        if saved.get(key) != value:
            raise UserError(f"{path} was saved with {key} {saved.get(key)}, but this run has {value}: "
                            "give the same method, settings, model and data as the saved run")
    state = load_file(str(path))
    expected = set(trained_state(plan.model))
    if set(state) != expected:
        raise UserError(f"{path} does not match the model built for this run ({len(state)} saved tensors, "
                        f"{len(expected)} expected): give the same settings as the saved run")
    plan.model.load_state_dict(state, strict=False)
