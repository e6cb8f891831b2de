"""Save and load LoRA (and DoRA) adapters as safetensors files that carry their settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from common.io import atomic_write
from lora.config import CHECKED_SETTINGS, LoRASettings, parse_params
from lora.errors import LoRAError
from lora.inject import apply_lora, lora_layers, original_attention_modes

FORMAT = "cytology-lora"


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The LoRA tensors (A, B and DoRA magnitudes) of a model by their full parameter names (all contain 'lora_')."""
    return {
        f"{name}.{pname}": param
        for name, layer in lora_layers(model)
        for pname, param in layer.named_parameters(recurse=False)
        if pname.startswith("lora_")
    }


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of a model (what the optimiser trains, besides a head)."""
    return list(lora_state_dict(model).values())


def _settings(settings: dict | LoRASettings) -> LoRASettings:
    return settings if isinstance(settings, LoRASettings) else LoRASettings.from_dict(settings)


def _variant(dora: bool) -> str:
    return "DoRA" if dora else "plain LoRA"


def _attention(original: bool) -> str:
    return "the original code's attention (--compat seed)" if original else "the model's own attention"


def _check_layers_match(model: nn.Module, settings: LoRASettings, what: str) -> None:
    """The model's LoRA layers must have the rank, scale and letters the settings describe."""
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise LoRAError(f"{what}: the model has no LoRA layers; call apply_lora first")
    letters = {x for layer in layers for x in layer.letters}
    if tuple(x for x in settings.params if x in letters) != settings.params or letters - set(settings.params):
        raise LoRAError(f"{what}: the model's LoRA layers adapt {' '.join(sorted(letters))} "
                        f"but the settings say params={' '.join(settings.params)}")
    variants = {layer.dora for layer in layers}
    if variants != {settings.dora}:
        have = " and ".join(sorted(_variant(v) for v in variants))
        raise LoRAError(f"{what}: the model's layers are {have} but the adapter settings are "
                        f"{_variant(settings.dora)}; use settings (or an adapter file) with "
                        f"dora={layers[0].dora}, or a model made by apply_lora(..., dora={settings.dora})")
    modes = original_attention_modes(model)
    if modes and modes != {settings.original_attention}:
        have = " and ".join(sorted(_attention(m) for m in modes))
        raise LoRAError(f"{what}: the model's timm attention runs as {have} but the adapter settings say "
                        f"{_attention(settings.original_attention)}; use the --compat setting the adapter was "
                        "made with")
    for layer in layers:
        if layer.r != settings.r:
            raise LoRAError(f"{what}: the model's LoRA layers have r={layer.r} but the settings say r={settings.r}")
        if abs(layer.scale - settings.scale) > 1e-9 * max(1.0, abs(settings.scale)):
            raise LoRAError(f"{what}: the model's LoRA scale is {layer.scale:g} but alpha={settings.alpha:g} with "
                            f"scaling={settings.scaling} gives {settings.scale:g}")


def save_lora(model: nn.Module, path: str | os.PathLike, settings: dict | LoRASettings) -> None:
    """Write the LoRA tensors and their settings to a safetensors file (atomically)."""
    cfg = _settings(settings)
    _check_layers_match(model, cfg, f"save_lora({path})")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    metadata = {"format": FORMAT, "settings": json.dumps(cfg.to_dict(), sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_lora_settings(path: str | os.PathLike) -> dict:
    """The settings stored in an adapter file, as a dict (params as a list)."""
    if not Path(path).is_file():
        raise LoRAError(f"LoRA adapter file {path} not found; give the path of a file written by save_lora")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoRAError(f"{path} is not a readable safetensors adapter file ({e})") from None
    if metadata.get("format") != FORMAT or "settings" not in metadata:
        raise LoRAError(f"{path} carries no cytology-lora settings; use an adapter file written by save_lora")
    return json.loads(metadata["settings"])


def _normalise(key: str, value: object) -> object:
    if key == "params":
        return parse_params(value)
    if key == "alpha":
        return float(value)
    if key == "dora":
        return _variant(bool(value))
    if key == "original_attention":
        return _attention(bool(value))
    return value


def _show(value: object) -> object:
    return " ".join(value) if isinstance(value, tuple) else value


def check_settings(saved: dict, expected: dict, path: str | os.PathLike) -> None:
    """LoRAError naming the first setting where ``expected`` differs from what the file was saved with."""
    # files written before DoRA (or --compat) existed hold plain LoRA on the model's own attention
    saved = {"dora": False, "original_attention": False} | saved
    for key in CHECKED_SETTINGS:
        if expected.get(key) is None or saved.get(key) is None:
            continue
        want, got = _normalise(key, expected[key]), _normalise(key, saved[key])
        if want != got and key == "original_attention":
            raise LoRAError(f"adapter {path} was saved for {got} but this run uses {want}; load it with the "
                            "--compat setting it was saved with")
        if want != got and key == "dora":
            raise LoRAError(f"adapter {path} was saved as {got} (dora={saved[key]}) but this run uses {want}; "
                            f"load it with the variant it was saved with (--method dora for DoRA)")
        if want != got:
            raise LoRAError(f"adapter {path} was saved with {key}={_show(got)!r} but this run uses "
                            f"{key}={_show(want)!r}; use the same --{key} or another adapter")


def load_lora(model: nn.Module, path: str | os.PathLike, expected: dict | None = None) -> dict:
    """Load an adapter into ``model`` after checking its settings; returns the saved settings.

    ``expected`` holds the current run's settings (r, alpha, scaling, params, position, encoder, dora,
    model_key, original_attention; dropout_rate only matters for training and is not compared). A model without LoRA
    layers is first injected with the file's settings (files written before DoRA existed are plain LoRA).
    """
    saved = read_lora_settings(path)
    check_settings(saved, expected or {}, path)
    cfg = LoRASettings.from_dict(saved)
    if not lora_layers(model):
        apply_lora(model, settings=cfg)
    _check_layers_match(model, cfg, f"load_lora({path})")
    own = lora_state_dict(model)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        missing, extra = sorted(set(own) - keys), sorted(keys - set(own))
        if missing or extra:
            detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
            raise LoRAError(f"adapter {path} does not fit this model ({len(missing)} tensors missing, "
                            f"{len(extra)} unexpected; {detail}); was it saved for another model or --position?")
        with torch.no_grad():
            for key, param in own.items():
                tensor = f.get_tensor(key)
                if tensor.shape != param.shape:
                    raise LoRAError(f"adapter {path}: {key} has shape {tuple(tensor.shape)} but the model "
                                    f"expects {tuple(param.shape)}; was it saved for another model?")
                param.copy_(tensor)
    return saved
