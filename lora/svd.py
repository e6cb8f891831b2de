"""Singular-value tuning (CLIP-SVD): each adapted weight is W = U diag(s) V^T with only s trained.

The layers and attention kinds are LoRA's (``lora.inject`` finds them: q/k/v/o of nn.MultiheadAttention,
timm fused qkv (q/v-only included), Hugging Face separate projections, 1x1 convolutions), each q/k/v block
of a fused projection decomposed on its own. The weight is re-parametrised in place
(``torch.nn.utils.parametrize``), so every attention kind keeps its own forward:

    W' = W + U diag(delta) V^T,   delta (one per singular value) starts at zero,

which is U diag(s + delta) V^T exactly, and the model is unchanged at initialisation (no reconstruction
error from the decomposition). U and V come from a float64 SVD on the CPU, so reloading recomputes the same
ones. The update is formed as a dense matrix once per forward (r = min(out, in) is full rank: cheaper than
two extra matmuls per token). Merging writes W' into the plain weight and removes the parametrisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

from common.io import atomic_write
from lora.config import QKV_LETTERS, LoRASettings
from lora.errors import LoRAError
from lora.inject import _join, _targets, select_towers

FORMAT = "cytology-lora-svd"


def _decompose(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U, s, V^T of a 2-d weight in float64 on the CPU (deterministic), cast back to the weight's dtype."""
    u, s, vh = torch.linalg.svd(matrix.detach().to("cpu", torch.float64), full_matrices=False)
    cast = {"device": matrix.device, "dtype": matrix.dtype}
    return u.to(**cast), s.to(**cast), vh.to(**cast)


class SingularValueDelta(nn.Module):
    """A parametrisation W -> W + [U_g diag(delta_g) V_g^T for each row block g]; blocks not adapted stay W.

    ``blocks``: (letter, first row, rows) of each adapted block of the (out, in) matrix view of the weight.
    """

    def __init__(self, weight: Tensor, blocks: list[tuple[str, int, int]]):
        super().__init__()
        self.shape = tuple(weight.shape)
        matrix = weight.detach().reshape(weight.shape[0], -1)
        self.blocks = [(letter, start, rows) for letter, start, rows in blocks]
        for letter, start, rows in self.blocks:
            u, s, vh = _decompose(matrix[start:start + rows])
            self.register_buffer(f"u_{letter}", u, persistent=False)
            self.register_buffer(f"vh_{letter}", vh, persistent=False)
            self.register_buffer(f"s_{letter}", s, persistent=False)
            setattr(self, f"svd_delta_{letter}", nn.Parameter(torch.zeros_like(s)))

    def update(self) -> Tensor:
        """The dense (out, in) update of every adapted block."""
        ref = getattr(self, f"svd_delta_{self.blocks[0][0]}")
        out = torch.zeros(self.shape[0], int(torch.tensor(self.shape[1:]).prod()), dtype=ref.dtype, device=ref.device)
        for letter, start, rows in self.blocks:
            u, vh = getattr(self, f"u_{letter}"), getattr(self, f"vh_{letter}")
            out[start:start + rows] = (u * getattr(self, f"svd_delta_{letter}")) @ vh
        return out

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.update().reshape(self.shape).to(weight.dtype)

    def singular_values(self, letter: str) -> Tensor:
        """The current singular values s + delta of one block."""
        return getattr(self, f"s_{letter}") + getattr(self, f"svd_delta_{letter}")


def _weight_sites(model: nn.Module, path: str, kind: str, letters: tuple[str, ...]
                  ) -> list[tuple[nn.Module, str, list[tuple[str, int, int]]]]:
    """(module, weight attribute, blocks) of one LoRA target: what the singular values re-parametrise."""
    module = model.get_submodule(path)
    if kind == "mha":
        rows = module.embed_dim
        qkv = [(x, "qkv".index(x) * rows, rows) for x in letters if x in QKV_LETTERS]
        sites = [(module, "in_proj_weight", qkv)] if qkv else []
        if "o" in letters:
            sites.append((module.out_proj, "weight", [("o", 0, module.out_proj.out_features)]))
        return sites
    if kind == "fused":
        rows = module.out_features // 3
        return [(module, "weight", [(x, "qkv".index(x) * rows, rows) for x in letters])]
    return [(module, "weight", [(letters[0], 0, module.weight.shape[0])])]


def svd_layers(model: nn.Module) -> list[tuple[str, SingularValueDelta]]:
    """Every singular-value parametrisation of a model with the path of the module it re-parametrises."""
    out = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                out += [(_join(name, tensor_name), p) for p in plist if isinstance(p, SingularValueDelta)]
    return out


def apply_svd(model: nn.Module, params=("q", "v"), position: str = "all", encoder: str = "vision"
              ) -> list[SingularValueDelta]:
    """Singular-value deltas on the layers LoRA would adapt with these settings; everything else frozen.

    Raises LoRAError, before changing anything, when the model lacks what was asked for."""
    settings = LoRASettings(params=params, position=position, encoder=encoder)
    if svd_layers(model):
        raise LoRAError("the model already has singular-value layers; merge them (merge_svd) or start afresh")
    plan = []
    for tower in select_towers(model, settings.encoder):
        plan += [(_join(tower.path, path), kind, letters)
                 for path, kind, letters in _targets(tower, settings, type(model).__name__)]
    model.requires_grad_(False)
    added = []
    for path, kind, letters in plan:
        for module, attr, blocks in _weight_sites(model, path, kind, letters):
            delta = SingularValueDelta(getattr(module, attr), blocks)
            parametrize.register_parametrization(module, attr, delta, unsafe=True)
            added.append(delta)
    for delta in added:
        delta.requires_grad_(True)
    return added


def svd_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trained deltas by '<weight path>.<letter>'."""
    return {f"{path}.{letter}": getattr(p, f"svd_delta_{letter}") for path, p in svd_layers(model)
            for letter, _, _ in p.blocks}


@torch.no_grad()
def merge_svd(model: nn.Module) -> nn.Module:
    """Fold every singular-value update into its plain weight (the parametrisations removed); returns model."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations):
                if any(isinstance(p, SingularValueDelta) for p in module.parametrizations[tensor_name]):
                    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model


def save_svd(model: nn.Module, path: str | Path, settings: dict) -> None:
    """The deltas and the settings that place them, in one safetensors file (written atomically)."""
    state = {k: v.detach().cpu().contiguous() for k, v in svd_state_dict(model).items()}
    if not state:
        raise LoRAError("the model has no singular-value layers to save; call apply_svd first")
    metadata = {"format": FORMAT, "settings": json.dumps(settings, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=metadata))


def load_svd(model: nn.Module, path: str | Path) -> nn.Module:
    """Put singular-value layers on a fresh model as the file's settings say and load its deltas."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise LoRAError(f"{path} is not a singular-value adapter file (format {metadata.get('format')!r})")
        state = {k: f.get_tensor(k) for k in f.keys()}
    settings = json.loads(metadata["settings"])
    apply_svd(model, params=tuple(settings["params"]), position=settings["position"], encoder=settings["encoder"])
    own = svd_state_dict(model)
    if set(own) != set(state):
        raise LoRAError(f"{path} does not fit this model ({len(state)} saved deltas, {len(own)} expected): "
                        "load it into the model it was trained on")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
    return model
