"""LoRA settings: the accepted values, parsing of ``--params`` and one validated settings record."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from lora.errors import LoRAError

PARAM_LETTERS = ("q", "k", "v", "o", "pw")
ATTENTION_LETTERS = ("q", "k", "v", "o")
QKV_LETTERS = ("q", "k", "v")
POSITIONS = ("bottom", "mid", "up", "half-up", "half-bottom", "all", "top", "top3")
ENCODERS = ("vision", "text", "both")
SCALINGS = ("sqrt", "standard")
# Settings that decide what the adapter tensors mean; a saved adapter must match them to be loaded.
CHECKED_SETTINGS = ("r", "alpha", "scaling", "params", "position", "encoder", "dora", "model_key",
                    "original_attention")
SETTING_NAMES = ("r", "alpha", "scaling", "params", "position", "encoder", "dropout_rate", "dora", "model_key",
                 "original_attention")


def _split_token(token: str) -> list[str]:
    """Split one word such as 'qkvo', 'qvpw' or 'pw' into letters; LoRAError on anything else."""
    letters, i = [], 0
    while i < len(token):
        if token.startswith("pw", i):
            letters.append("pw")
            i += 2
        elif token[i] in "qkvo":
            letters.append(token[i])
            i += 1
        else:
            raise LoRAError(
                f"unknown LoRA parameter {token!r} in --params; use letters from {' '.join(PARAM_LETTERS)} "
                "(e.g. --params \"q v\" or --params pw)"
            )
    return letters


def parse_params(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Canonical ordered tuple of LoRA letters from "q v", ["q", "v"], ["q v"], "qv", "q,v", "qkvo", "pw"..."""
    if isinstance(spec, str):
        words = [spec]
    elif isinstance(spec, Sequence) and all(isinstance(w, str) for w in spec):
        words = list(spec)
    else:
        raise LoRAError(f"--params must be text such as \"q v\" or a list of letters, got {spec!r}")
    found: set[str] = set()
    for word in words:
        for token in re.split(r"[\s,;+]+", word.strip().lower()):
            if token:
                found.update(_split_token(token))
    if not found:
        raise LoRAError(f"no LoRA parameter given in --params {spec!r}; use letters from {' '.join(PARAM_LETTERS)}")
    return tuple(letter for letter in PARAM_LETTERS if letter in found)


def compute_scale(alpha: float, r: int, scaling: str) -> float:
    """The LoRA multiplier s: alpha/sqrt(r) (the paper, rsLoRA) or alpha/r (the original LoRA)."""
    return alpha / math.sqrt(r) if scaling == "sqrt" else alpha / r


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise LoRAError(f"unknown LoRA {name} {value!r}; choose one of {', '.join(allowed)}")
    return str(value)


@dataclass(frozen=True)
class LoRASettings:
    """Every setting that defines a LoRA adapter, validated on creation."""

    params: tuple[str, ...] = ("q", "v")
    r: int = 2
    alpha: float = 1.0
    dropout_rate: float = 0.25
    position: str = "all"
    encoder: str = "vision"
    scaling: str = "sqrt"
    model_key: str | None = field(default=None)
    dora: bool = False  # the DoRA variant: a learnable magnitude per adapted output row (lora.dora)
    # --compat seed: timm fused-qkv attention runs as the original code's LoRA attention (single head over the
    # full width, no output projection; lora.layers.OriginalAttentionLoRA); the model then differs from the
    # pretrained one even with LoRA at zero. Other attention kinds are unaffected.
    original_attention: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", parse_params(self.params))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoRAError(f"LoRA rank r must be a whole number >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise LoRAError(f"LoRA alpha must be a number > 0, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        rate = self.dropout_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise LoRAError(f"LoRA dropout_rate must be in [0, 1), got {rate!r}")
        object.__setattr__(self, "dropout_rate", float(rate))
        _choice("position", self.position, POSITIONS)
        _choice("encoder", self.encoder, ENCODERS)
        _choice("scaling", self.scaling, SCALINGS)
        if not isinstance(self.dora, bool):
            raise LoRAError(f"LoRA dora must be True or False, got {self.dora!r}")
        if not isinstance(self.original_attention, bool):
            raise LoRAError(f"LoRA original_attention must be True or False, got {self.original_attention!r}")

    @property
    def scale(self) -> float:
        """The multiplier s of the low-rank update."""
        return compute_scale(self.alpha, self.r, self.scaling)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (params as a list)."""
        d = asdict(self)
        d["params"] = list(self.params)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoRASettings:
        """Settings from a dict with keys among SETTING_NAMES (others, such as 'dtype', are ignored)."""
        return cls(**{k: d[k] for k in SETTING_NAMES if k in d})
