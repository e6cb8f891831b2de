"""The --weights argument, seeded initialisation, and checked state_dict loading."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.errors import ModelError, one_line

RANDOM = "random"
BUILTIN = "builtin"
# Every model is built under a fixed seed, so that loading never disturbs the caller's random
# state and "random" weights are the same in every run. The built-in tiny models use another seed
# than "random", so that the two are different networks.
BUILTIN_SEED = 0
RANDOM_SEED = 1
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
NESTED_KEYS = ("state_dict", "model")


@dataclass(frozen=True)
class Weights:
    """What --weights asks for: the key's default, random init, its built-in weights, or a local path."""

    kind: str  # "default" | "random" | "builtin" | "file" | "folder"
    path: Path | None = None

    @property
    def seed(self) -> int:
        return RANDOM_SEED if self.kind == "random" else BUILTIN_SEED


def parse_weights(weights: str | None, key: str) -> Weights:
    """Interpret --weights: None = the usual source, "random", "builtin", or an existing file/folder."""
    if weights is None or str(weights).strip() == "":
        return Weights("default")
    text = str(weights).strip()
    if text in (RANDOM, BUILTIN):
        return Weights(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelError(
            f"weights not found: {text} (model {key}); pass an existing checkpoint file or folder to "
            "--weights, 'random' for random initialisation, or omit --weights for the default weights"
        )
    return Weights("folder" if path.is_dir() else "file", path.resolve())


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block under torch.manual_seed(seed) and restore the global CPU RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def find_file(folder: Path, names: Sequence[str], key: str) -> Path:
    """The first of `names` present in `folder`; ModelError listing them otherwise."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ModelError(
        f"no weights file in {folder} for model {key}: expected one of {', '.join(names)}; "
        "pass the checkpoint file itself to --weights"
    )


def read_state_dict(path: Path, key: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors/.pth/.bin checkpoint, unwrapped from 'state_dict'/'model' and 'module.'."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the user's to fix
        raise ModelError(
            f"cannot read weights file {path} for model {key}: {one_line(error)}; "
            f"pass a state_dict saved as {'/'.join(STATE_DICT_SUFFIXES)}"
        ) from error
    return _unwrap(data, path, key)


def _unwrap(data: object, path: Path, key: str) -> dict[str, torch.Tensor]:
    while isinstance(data, Mapping):
        nested = next((k for k in NESTED_KEYS if isinstance(data.get(k), Mapping)), None)
        if nested is None:
            break
        data = data[nested]
    if not isinstance(data, Mapping) or not data or not all(torch.is_tensor(v) for v in data.values()):
        raise ModelError(
            f"weights file {path} for model {key} holds no state_dict (a mapping of names to tensors, "
            "optionally under 'state_dict' or 'model')"
        )
    if all(k.startswith("module.") for k in data):  # saved from DataParallel / DDP
        data = {k[len("module."):]: v for k, v in data.items()}
    return dict(data)


def load_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], key: str, source: str,
    ignore: Sequence[str] = (),
) -> None:
    """Load every tensor of `model` from `state_dict`; ModelError on any missing, extra or misshapen one.

    Keys starting with a prefix in `ignore` (e.g. a classifier the model does not have) may be extra.
    """
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if k in own or not k.startswith(tuple(ignore))}
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with another shape (e.g. {k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)})"
            )
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        raise ModelError(
            f"weights {source} do not fit model {key}: {'; '.join(parts)}; "
            "pass a checkpoint of this exact architecture"
        )
    model.load_state_dict(state_dict, strict=True)
