"""Find towers, blocks and projections in a model and put LoRA layers on the chosen ones.

Towers: open_clip CLIP (``visual``; text = ``transformer``, or ``text`` for CustomTextCLIP), Hugging Face
CLIPModel (``vision_model`` / ``text_model``); any other model is one vision tower.

Blocks: the attention modules of a tower that live inside a block list (an ``nn.ModuleList`` or
``nn.Sequential``), in forward order; attention pools outside the block list are left alone.
Recognised attention kinds: ``nn.MultiheadAttention`` with a fused ``in_proj_weight`` (open_clip),
a fused ``qkv`` Linear with a ``proj`` Linear (timm), separate ``q_proj/k_proj/v_proj`` with
``o_proj`` or ``out_proj`` (Hugging Face), separate ``query/key/value`` with the output projection at
``<parent>.output.dense`` (Hugging Face BERT-style).

Pointwise (``pw``): every 1x1 convolution with ``groups == 1`` in the tower. Positions select among
the blocks holding them (thirds and halves of that list), separately from attention blocks; for
EfficientNet-Lite0 these are its 16 blocks and then ``conv_head`` as a 17th unit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from lora.config import ATTENTION_LETTERS, QKV_LETTERS, LoRASettings
from lora.errors import LoRAError
from lora.layers import (
    LoRAConv2d,
    LoRAFusedLinear,
    LoRALinear,
    LoRAModule,
    LoRAMultiheadAttention,
    OriginalAttentionLoRA,
    original_attention_problem,
)

CONTAINERS = (nn.ModuleList, nn.Sequential)


@dataclass
class Tower:
    """One encoder of a model: its name ('vision' or 'text'), its path in the model and the module."""

    name: str
    path: str
    module: nn.Module


@dataclass
class AttentionSite:
    """One attention module and the paths (relative to the tower) of its projections."""

    kind: str  # "mha", "fused", "separate"
    path: str
    module: nn.Module
    projections: dict[str, str]  # letter -> path of its Linear (fused: "qkv" -> the fused Linear)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def find_towers(model: nn.Module) -> dict[str, Tower]:
    """The vision tower and, where there is one, the text tower of a model."""
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module):  # open_clip CLIP, CustomTextCLIP, CoCa
        towers = {"vision": Tower("vision", "visual", visual)}
        for attr in ("text", "transformer"):
            text = getattr(model, attr, None)
            if isinstance(text, nn.Module):
                towers["text"] = Tower("text", attr, text)
                break
        return towers
    towers = {}
    for name, attr in (("vision", "vision_model"), ("text", "text_model")):  # Hugging Face CLIPModel
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module):
            towers[name] = Tower(name, attr, sub)
    return towers or {"vision": Tower("vision", "", model)}


def select_towers(model: nn.Module, encoder: str) -> list[Tower]:
    """The towers named by ``encoder`` ('vision', 'text' or 'both'); LoRAError when one is missing."""
    towers = find_towers(model)
    wanted = ("vision", "text") if encoder == "both" else (encoder,)
    missing = [w for w in wanted if w not in towers]
    if missing:
        raise LoRAError(
            f"--encoder {encoder}: {type(model).__name__} has no {missing[0]} tower "
            f"(it has: {', '.join(towers)}); use --encoder vision"
        )
    return [towers[w] for w in wanted]


def _linear(module: nn.Module, attr: str) -> bool:
    return isinstance(getattr(module, attr, None), nn.Linear)


def _attention_kind(module: nn.Module) -> str | None:
    """Which supported attention layout a module has, if any."""
    if isinstance(module, nn.MultiheadAttention):
        ok = (module._qkv_same_embed_dim and module.in_proj_weight is not None and module.bias_k is None
              and not module.add_zero_attn)
        return "mha" if ok else None
    # A fused qkv whose bias lives elsewhere (q_bias/v_bias, BEiT/EVA style) is used through
    # F.linear(x, qkv.weight, ...), not through the Linear: wrapping it would silently do nothing.
    if (_linear(module, "qkv") and _linear(module, "proj") and module.qkv.out_features % 3 == 0
            and not any(isinstance(getattr(module, b, None), Tensor) for b in ("q_bias", "v_bias", "qkv_bias"))):
        return "fused"
    if all(_linear(module, a) for a in ("q_proj", "k_proj", "v_proj")):
        return "separate"
    if all(_linear(module, a) for a in ("query", "key", "value")):
        return "separate"
    return None


def _projections(kind: str, path: str, module: nn.Module, parent: nn.Module | None, parent_path: str
                 ) -> dict[str, str]:
    if kind == "mha":
        return {letter: path for letter in ATTENTION_LETTERS}
    if kind == "fused":
        return {"qkv": _join(path, "qkv"), "o": _join(path, "proj")}
    if _linear(module, "q_proj"):
        found = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}
        out = "o_proj" if _linear(module, "o_proj") else "out_proj" if _linear(module, "out_proj") else None
        found = {k: _join(path, v) for k, v in found.items()}
        if out:
            found["o"] = _join(path, out)
        return found
    found = {k: _join(path, v) for k, v in (("q", "query"), ("k", "key"), ("v", "value"))}
    output = getattr(parent, "output", None) if parent is not None else None
    if output is not None and _linear(output, "dense"):
        found["o"] = _join(parent_path, "output.dense")
    return found


def _inside_block_lists(root: nn.Module) -> set[str]:
    """Paths of every module that sits (at any depth) inside an nn.ModuleList or nn.Sequential."""
    inside: set[str] = set()
    for name, module in root.named_modules():
        if isinstance(module, CONTAINERS):
            inside.update(_join(name, sub) for sub, _ in module.named_modules() if sub)
    return inside


def _parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def find_attention_sites(tower: nn.Module) -> list[AttentionSite]:
    """The tower's attention modules inside its block list, in forward order (one per block)."""
    modules = dict(tower.named_modules())
    inside = _inside_block_lists(tower)
    sites = []
    for path, module in modules.items():
        kind = _attention_kind(module)
        if kind is None or path not in inside:
            continue
        parent_path = _parent_path(path)
        parent = modules.get(parent_path)
        sites.append(AttentionSite(kind, path, module, _projections(kind, path, module, parent, parent_path)))
    return sites


def _block_of(path: str, modules: dict[str, nn.Module]) -> str:
    """The nearest ancestor of ``path`` that is an element of a block list (the tower itself if none)."""
    owner = _parent_path(path)
    while owner:
        parent = _parent_path(owner)
        if isinstance(modules.get(parent), CONTAINERS) and not isinstance(modules[owner], CONTAINERS):
            return owner
        owner = parent
    return ""


def _pointwise(module: nn.Module) -> bool:
    """A 1x1 channel-mixing convolution (zero padding, if any, so the low-rank path can mirror it)."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
            and (module.padding_mode == "zeros" or module.padding in ((0, 0), 0)))


def find_pointwise_units(tower: nn.Module) -> list[list[str]]:
    """Paths of the tower's 1x1 channel-mixing convolutions grouped by block, in forward order.

    A block is the nearest ancestor that is an element of a block list (e.g. an EfficientNet or
    ResNet block, whatever wraps the convolution inside it); convolutions outside any block list
    (EfficientNet's ``conv_head``) form one last unit of their own.
    """
    modules = dict(tower.named_modules())
    units: dict[str, list[str]] = {}
    for path, module in modules.items():
        if _pointwise(module):
            units.setdefault(_block_of(path, modules), []).append(path)
    return list(units.values())


def block_indices(n: int, position: str) -> list[int]:
    """Indices of the blocks a position selects in a stack of ``n`` blocks, scaled to the depth.

    bottom/up are the first/last ceil(n/3) blocks and mid the rest (12 blocks: 0-3, 4-7, 8-11; 24: 0-7,
    8-15, 16-23); half-bottom/half-up the first/last ceil(n/2). Every position selects at least one
    block: in very shallow towers bottom and up (or the halves) may share one, and mid falls back to
    the middle block.
    """
    third, half = math.ceil(n / 3), math.ceil(n / 2)
    ranges = {
        "bottom": range(third),
        "mid": range(third, n - third) or range(n // 2, n // 2 + 1),
        "up": range(n - third, n),
        "half-bottom": range(half),
        "half-up": range(n - half, n),
        "all": range(n),
        "top": range(n - 1, n),
        "top3": range(max(n - 3, 0), n),
    }
    return list(ranges[position]) if n > 0 else []


def _unsupported_attention(tower: nn.Module) -> str:
    names = sorted({type(m).__name__ for m in tower.modules() if "attention" in type(m).__name__.lower()})
    return f" (found unsupported attention modules: {', '.join(names)})" if names else ""


def _offers(sites: list[AttentionSite], units: list[list[str]]) -> str:
    found = {letter for s in sites for key in s.projections for letter in (QKV_LETTERS if key == "qkv" else (key,))}
    offers = [x for x in ATTENTION_LETTERS if x in found] + (["pw"] if units else [])
    return " ".join(offers) if offers else "nothing LoRA can adapt"


def _targets(tower: Tower, settings: LoRASettings, model_name: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(path in the tower, kind, letters) of every layer to adapt; raises before anything is changed."""
    sites, units = find_attention_sites(tower.module), find_pointwise_units(tower.module)
    letters = [x for x in settings.params if x in ATTENTION_LETTERS]
    where = f"the {tower.name} tower of {model_name}"
    if letters and not sites:
        raise LoRAError(
            f"--params {' '.join(settings.params)}: {where} has no attention blocks LoRA can adapt"
            f"{_unsupported_attention(tower.module)}; it offers: {_offers(sites, units)}"
        )
    if "pw" in settings.params and not units:
        raise LoRAError(
            f"--params pw: {where} has no 1x1 (pointwise) convolutions; it offers: {_offers(sites, units)}"
        )
    targets: list[tuple[str, str, tuple[str, ...]]] = []
    if letters:
        for i in block_indices(len(sites), settings.position):
            targets += _site_targets(sites[i], letters, where, settings.original_attention)
    if "pw" in settings.params:
        targets += [(path, "pw", ("pw",)) for i in block_indices(len(units), settings.position) for path in units[i]]
    return targets


def _site_targets(site: AttentionSite, letters: list[str], where: str, original_attention: bool = False
                  ) -> list[tuple[str, str, tuple[str, ...]]]:
    if site.kind == "mha":
        return [(site.path, "mha", tuple(letters))]
    offered = set(site.projections) | (set(QKV_LETTERS) if site.kind == "fused" else set())
    missing = [x for x in letters if x not in offered]
    if missing:
        raise LoRAError(f"--params {' '.join(letters)}: the attention at {site.path} in {where} has no "
                        f"'{missing[0]}' projection; drop '{missing[0]}' from --params")
    if site.kind == "fused" and original_attention:  # the whole attention, as the original code replaces it
        problem = original_attention_problem(site.module)
        if problem:
            raise LoRAError(f"--compat seed: the attention at {site.path} in {where} cannot run as the original "
                            f"code's LoRA attention: {problem}; run without --compat seed")
        return [(site.path, "original", tuple(letters))]
    if site.kind == "fused":
        qkv = tuple(x for x in letters if x in QKV_LETTERS)
        out = [(site.projections["qkv"], "fused", qkv)] if qkv else []
        return out + ([(site.projections["o"], "linear", ("o",))] if "o" in letters else [])
    return [(site.projections[x], "linear", (x,)) for x in letters]


def _make_layer(module: nn.Module, kind: str, letters: tuple[str, ...], settings: LoRASettings) -> nn.Module:
    r, scale, p, dora = settings.r, settings.scale, settings.dropout_rate, settings.dora
    if kind == "original":  # --compat seed: timm attention replaced by the original code's (lora.layers)
        qkv_letters = tuple(x for x in letters if x in QKV_LETTERS)
        qkv = LoRAFusedLinear(module.qkv, qkv_letters, r, scale, p, dora) if qkv_letters else module.qkv
        proj = LoRALinear(module.proj, "o", r, scale, p, dora) if "o" in letters else module.proj
        return OriginalAttentionLoRA(module, qkv, proj)
    if kind == "mha":
        return LoRAMultiheadAttention(module, letters, r, scale, p, dora)
    if kind == "fused":
        return LoRAFusedLinear(module, letters, r, scale, p, dora)
    if kind == "pw":
        return LoRAConv2d(module, r, scale, p, dora)
    return LoRALinear(module, letters[0], r, scale, p, dora)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRAModule]]:
    """Every LoRA layer of a model with its path (a q/k/v attention layer and its inner 'o' both count)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRAModule)]


def original_attention_modes(model: nn.Module) -> set[bool]:
    """How the model's adapted timm fused-qkv attentions run: True for the original code's attention
    (OriginalAttentionLoRA), False for timm's own with LoRA on its qkv or proj; empty when it has neither."""
    modes = set()
    for m in model.modules():
        if isinstance(m, OriginalAttentionLoRA):
            modes.add(True)
        elif hasattr(m, "qkv") and any(isinstance(getattr(m, a, None), LoRAModule) for a in ("qkv", "proj")):
            modes.add(False)
    return modes


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every LoRA layer of ``model`` computes its original module's output (no update).

    The layers keep their own kernels, so this is also the frozen model as our layers run it (e.g. the
    floor of a speed comparison), equal to the original up to float rounding. An attention replaced by
    ``original_attention`` stays the original code's (only its LoRA updates are switched off).
    """
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before, strict=True):
            layer.enabled = enabled


def apply_lora(model: nn.Module, params: str | tuple[str, ...] | list[str] | None = None, *,
               settings: LoRASettings | None = None, **fields) -> list[nn.Module]:
    """Put LoRA (or, with ``dora=True``, DoRA) on the chosen projections of the chosen blocks and towers,
    freeze everything else.

    Settings come whole (``settings=LoRASettings(...)``) or as LoRASettings fields (``params``, ``r=``,
    ``alpha=``, ``dropout_rate=``, ``position=``, ``encoder=``, ``scaling=``, ``dora=``,
    ``original_attention=``), whose defaults are LoRASettings' own: one definition of LoRA's defaults.

    ``original_attention=True`` (``--compat seed``) replaces each chosen timm fused-qkv attention by the
    original code's LoRA attention (:class:`lora.layers.OriginalAttentionLoRA`: one head over the full
    width, no output projection), which changes the model even with LoRA at zero; other attention kinds
    are adapted as usual.

    Returns the injected layers. Raises LoRAError, before changing anything, on a bad setting or when
    the model lacks a tower, block or projection that was asked for.
    """
    if settings is None:
        settings = LoRASettings(**({"params": params} if params is not None else {}), **fields)
    elif params is not None or fields:
        raise LoRAError("give apply_lora either settings=LoRASettings(...) or its fields, not both")
    if lora_layers(model):
        raise LoRAError("the model already has LoRA layers; merge them (merge_lora) or start from a fresh model")
    plan = []
    for tower in select_towers(model, settings.encoder):
        plan += [(_join(tower.path, path), kind, letters)
                 for path, kind, letters in _targets(tower, settings, type(model).__name__)]
    model.requires_grad_(False)
    injected = []
    for path, kind, letters in plan:
        original = model.get_submodule(path)
        layer = _make_layer(original, kind, letters, settings)
        layer.train(original.training)  # a new module defaults to training mode; keep the model's mode
        _replace(model, path, layer)
        injected.append(layer)
    for layer in injected:
        for name, param in layer.named_parameters():
            param.requires_grad_("lora_" in name)
    return injected
