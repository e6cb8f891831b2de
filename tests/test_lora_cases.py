"""Tiny models of every attention kind LoRA supports (shared by the test_lora* files; holds no tests).

Built directly from the libraries (open_clip, timm, transformers) with random weights, offline.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

IMAGE = 32
CONTEXT = 16
VOCAB = 100


def _cached_model(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``build`` run once, in float32 whatever the default dtype of the test that asks first (a float64
    test would otherwise hand every later test of its process a float64 model)."""

    @functools.cache
    @functools.wraps(build)
    def cached() -> nn.Module:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            return build()
        finally:
            torch.set_default_dtype(previous)

    return cached


@_cached_model
def open_clip_model() -> nn.Module:
    """open_clip CLIP: nn.MultiheadAttention towers, 6 vision blocks, 3 text blocks."""
    import open_clip

    torch.manual_seed(0)
    vision = {"image_size": IMAGE, "layers": 6, "width": 64, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0}
    text = {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 48, "heads": 4, "layers": 3}
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


@_cached_model
def custom_text_clip() -> nn.Module:
    """open_clip CustomTextCLIP: a timm ViT image tower (fused qkv) and a ``text`` tower (MHA)."""
    import open_clip

    torch.manual_seed(1)
    vision = {"timm_model_name": "test_vit", "timm_model_pretrained": False, "image_size": IMAGE, "timm_pool": "token",
                  "timm_proj": "linear"}
    text = {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 48, "heads": 4, "layers": 2}
    return open_clip.CustomTextCLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


@_cached_model
def timm_vit() -> nn.Module:
    """timm test_vit: fused qkv Linear, 6 blocks."""
    import timm

    torch.manual_seed(2)
    return timm.create_model("test_vit", img_size=IMAGE, pretrained=False, num_classes=0).eval()


@_cached_model
def hf_vit() -> nn.Module:
    """transformers ViTModel: q_proj/k_proj/v_proj/o_proj, 3 blocks."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(3)
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                       image_size=IMAGE, patch_size=8)
    return ViTModel(config, add_pooling_layer=False).eval()


@_cached_model
def hf_clip() -> nn.Module:
    """transformers CLIPModel: q_proj/k_proj/v_proj/out_proj in both towers, 3 blocks each."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(4)
    tiny = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}
    config = CLIPConfig(text_config=dict(tiny, vocab_size=VOCAB, max_position_embeddings=CONTEXT),
                        vision_config=dict(tiny, image_size=IMAGE, patch_size=8), projection_dim=16)
    return CLIPModel(config).eval()


@_cached_model
def hf_bert() -> nn.Module:
    """transformers BertModel: query/key/value with the output projection at attention.output.dense."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(5)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=CONTEXT)
    return BertModel(config, add_pooling_layer=False).eval()


@_cached_model
def efficientnet() -> nn.Module:
    """timm tf_efficientnet_lite0, random init: 1x1 convolutions, no attention."""
    import timm

    torch.manual_seed(6)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()


@_cached_model
def mobilevit() -> nn.Module:
    """timm mobilevit_xxs: 1x1 convolutions and transformer blocks (fused qkv) in one model."""
    import timm

    torch.manual_seed(7)
    return timm.create_model("mobilevit_xxs", pretrained=False, num_classes=0).eval()


def images(n: int = 2, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(11))


def tokens(n: int = 2) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(12))
    ids[:, -3:] = 0  # some padding at the end
    return ids


def run_open_clip(model: nn.Module, encoder: str) -> torch.Tensor:
    outs = []
    if encoder in ("vision", "both"):
        outs.append(model.encode_image(images()))
    if encoder in ("text", "both"):
        outs.append(model.encode_text(tokens()))
    return torch.cat([o.flatten() for o in outs])


def run_hf_clip(model: nn.Module, encoder: str) -> torch.Tensor:
    outs = []
    if encoder in ("vision", "both"):
        outs.append(model.vision_model(pixel_values=images()).last_hidden_state)
    if encoder in ("text", "both"):
        ids = tokens()
        outs.append(model.text_model(input_ids=ids, attention_mask=(ids > 0).long()).last_hidden_state)
    return torch.cat([o.flatten() for o in outs])


def run_image_model(model: nn.Module, encoder: str, size: int = IMAGE) -> torch.Tensor:
    out = model(pixel_values=images(size=size)) if "transformers" in type(model).__module__ else model(
        images(size=size))
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out).flatten()


def run_bert(model: nn.Module, encoder: str) -> torch.Tensor:
    ids = tokens()
    return model(input_ids=ids, attention_mask=(ids > 0).long()).last_hidden_state.flatten()


# Where each letter's weight lives: state_dict key relative to the block prefix, and which third
# of a fused q/k/v matrix it occupies (None: the whole matrix).
MHA = {"q": ("in_proj_weight", 0), "k": ("in_proj_weight", 1), "v": ("in_proj_weight", 2),
       "o": ("out_proj.weight", None)}
FUSED = {"q": ("qkv.weight", 0), "k": ("qkv.weight", 1), "v": ("qkv.weight", 2), "o": ("proj.weight", None)}
HF_VIT = {"q": ("q_proj.weight", None), "k": ("k_proj.weight", None), "v": ("v_proj.weight", None),
          "o": ("o_proj.weight", None)}
HF_CLIP = {**HF_VIT, "o": ("out_proj.weight", None)}
BERT = {"q": ("self.query.weight", None), "k": ("self.key.weight", None), "v": ("self.value.weight", None),
        "o": ("output.dense.weight", None)}


@dataclass(frozen=True)
class TowerLayout:
    """The blocks of one tower: their state_dict prefix (with {i}), depth and letter locations."""

    prefix: str | tuple[str, ...]  # a template with {i}, or every block's prefix written out
    depth: int
    letters: dict = field(hash=False)

    def block(self, i: int) -> str:
        return self.prefix.format(i=i) if isinstance(self.prefix, str) else self.prefix[i]


MOBILEVIT_BLOCKS = tuple(f"stages.{s}.1.transformer.{b}.attn." for s, n in ((2, 2), (3, 4), (4, 3)) for b in range(n))


LAYOUTS = {
    "oc_vision": TowerLayout("visual.transformer.resblocks.{i}.attn.", 6, MHA),
    "oc_text": TowerLayout("transformer.resblocks.{i}.attn.", 3, MHA),
    "ct_vision": TowerLayout("visual.trunk.blocks.{i}.attn.", 6, FUSED),
    "ct_text": TowerLayout("text.transformer.resblocks.{i}.attn.", 2, MHA),
    "timm": TowerLayout("blocks.{i}.attn.", 6, FUSED),
    "hf_vit": TowerLayout("layers.{i}.attention.", 3, HF_VIT),
    "hf_clip_vision": TowerLayout("vision_model.encoder.layers.{i}.self_attn.", 3, HF_CLIP),
    "hf_clip_text": TowerLayout("text_model.encoder.layers.{i}.self_attn.", 3, HF_CLIP),
    "bert": TowerLayout("encoder.layer.{i}.attention.", 3, BERT),
    "mobilevit": TowerLayout(MOBILEVIT_BLOCKS, 9, FUSED),
}

# The paper's positions, written out by hand for the depths used here.
POSITION_BLOCKS = {
    2: {"all": [0, 1], "top": [1], "top3": [0, 1], "bottom": [0], "mid": [1], "up": [1], "half-up": [1],
        "half-bottom": [0]},
    3: {"all": [0, 1, 2], "top": [2], "top3": [0, 1, 2], "bottom": [0], "mid": [1], "up": [2], "half-up": [1, 2],
        "half-bottom": [0, 1]},
    6: {"all": [0, 1, 2, 3, 4, 5], "top": [5], "top3": [3, 4, 5], "bottom": [0, 1], "mid": [2, 3], "up": [4, 5],
        "half-up": [3, 4, 5], "half-bottom": [0, 1, 2]},
    9: {"all": list(range(9)), "top3": [6, 7, 8]},
}


@dataclass(frozen=True)
class Case:
    """One model x LoRA placement, with the state_dict rows its merge may change."""

    name: str
    build: Callable[[], nn.Module]
    run: Callable[[nn.Module, str], torch.Tensor]
    towers: tuple[str, ...]  # keys of LAYOUTS touched by `encoder`
    params: tuple[str, ...]
    position: str = "all"
    encoder: str = "vision"
    pw_owners: tuple[str, ...] = ()  # module prefixes whose 1x1 convs get LoRA (pw cases); "*": all
    size: int = IMAGE  # input image side

    def fresh(self) -> nn.Module:
        """A private deep copy of the cached tiny model."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return copy.deepcopy(self.build())

    def output(self, model: nn.Module, grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            if self.size != IMAGE:
                return self.run(model, self.encoder, self.size)
            return self.run(model, self.encoder)

    def expected_rows(self) -> dict[str, list[int]]:
        """state_dict key -> the q/k/v thirds that may change ([] meaning the whole matrix)."""
        rows: dict[str, list[int]] = {}
        for tower in self.towers:
            layout = LAYOUTS[tower]
            for i in POSITION_BLOCKS[layout.depth][self.position]:
                for letter in self.params:
                    if letter == "pw":
                        continue
                    key, third = layout.letters[letter]
                    entry = rows.setdefault(layout.block(i) + key, [])
                    if third is not None:
                        entry.append(third)
        return rows


def _effnet_pw_owners(blocks: list[str], head: bool) -> tuple[str, ...]:
    return tuple(blocks) + (("conv_head",) if head else ())


EFFNET_BLOCKS = ["blocks.0.0", "blocks.1.0", "blocks.1.1", "blocks.2.0", "blocks.2.1", "blocks.3.0", "blocks.3.1",
                 "blocks.3.2", "blocks.4.0", "blocks.4.1", "blocks.4.2", "blocks.5.0", "blocks.5.1", "blocks.5.2",
                 "blocks.5.3", "blocks.6.0"]

CASES = [
    Case("open_clip-vision-qv-all", open_clip_model, run_open_clip, ("oc_vision",), ("q", "v")),
    Case("open_clip-vision-o-top", open_clip_model, run_open_clip, ("oc_vision",), ("o",), "top"),
    Case("open_clip-vision-qkvo-half-up", open_clip_model, run_open_clip, ("oc_vision",), ("q", "k", "v", "o"),
         "half-up"),
    Case("open_clip-text-qkvo-bottom", open_clip_model, run_open_clip, ("oc_text",), ("q", "k", "v", "o"),
         "bottom", "text"),
    Case("open_clip-both-ko-top3", open_clip_model, run_open_clip, ("oc_vision", "oc_text"), ("k", "o"),
         "top3", "both"),
    Case("custom_text_clip-both-qv-all", custom_text_clip, run_open_clip, ("ct_vision", "ct_text"), ("q", "v"),
         "all", "both"),
    Case("timm-qv-all", timm_vit, run_image_model, ("timm",), ("q", "v")),
    Case("timm-ko-bottom", timm_vit, run_image_model, ("timm",), ("k", "o"), "bottom"),
    Case("timm-qkvo-top", timm_vit, run_image_model, ("timm",), ("q", "k", "v", "o"), "top"),
    Case("hf_vit-qv-all", hf_vit, run_image_model, ("hf_vit",), ("q", "v")),
    Case("hf_vit-qkvo-mid", hf_vit, run_image_model, ("hf_vit",), ("q", "k", "v", "o"), "mid"),
    Case("hf_clip-both-qv-all", hf_clip, run_hf_clip, ("hf_clip_vision", "hf_clip_text"), ("q", "v"), "all",
         "both"),
    Case("hf_clip-text-o-top3", hf_clip, run_hf_clip, ("hf_clip_text",), ("o",), "top3", "text"),
    Case("bert-qkvo-all", hf_bert, run_bert, ("bert",), ("q", "k", "v", "o")),
    Case("efficientnet-pw-all", efficientnet, run_image_model, (), ("pw",),
         pw_owners=_effnet_pw_owners(EFFNET_BLOCKS, head=True)),
    # 17 units (16 blocks + the head): bottom = the first 6, top = the head alone
    Case("efficientnet-pw-bottom", efficientnet, run_image_model, (), ("pw",), "bottom",
         pw_owners=_effnet_pw_owners(EFFNET_BLOCKS[:6], head=False)),
    Case("efficientnet-pw-top", efficientnet, run_image_model, (), ("pw",), "top", pw_owners=("conv_head",)),
    Case("mobilevit-pw+qv-top3", mobilevit, run_image_model, ("mobilevit",), ("q", "v", "pw"), "top3",
         pw_owners=("stages.4.0", "stages.4.1", "final_conv"), size=64),
]
