"""The cytology benchmark's backbones: DinoBloom S/B/L/G, PLIP, PubMedCLIP, QuiltNet B/16 and CLIP B/32 and L/14.

Each loads through its real code path from a hub layout (a stand-in hub) and from local files, fails offline
with one line, and takes LoRA exactly (B = 0 leaves its outputs unchanged). Full-size models are built only
where that is quick (DinoBloom-S, CLIP ViT-B/32); the others run the same builder on a tiny configuration of
the same architecture family. Their declared sizes are checked at full size in test_models_capabilities.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

import models
from lora import apply_lora, lora_state_dict
from lora.layers import LoRAFusedLinear, LoRALinear, LoRAMultiheadAttention
from models import ModelError, capabilities, dinobloom, load_model
from models.capabilities import OPENAI_MEAN, OPENAI_STD
from models.registry import Request
from models.weights import parse_weights
from tests.model_builds import build_on_meta
from tests.test_models_weights import TINY_CLIP_CFG, FakeHub, _open_clip_folder, _same_outputs

TINY_DINO = (("img_size", 28), ("embed_dim", 32), ("depth", 3), ("num_heads", 2))
# tiny stand-ins of the MLP (S/B/L) and SwiGLU (G) DINOv2 families, through DinoBloom's own builder
TINY_S = dinobloom.Variant("vit_small_patch14_dinov2", "pytorch_model_s.bin", 32, TINY_DINO)
TINY_G = dinobloom.Variant("vit_giant_patch14_dinov2", "pytorch_model_g.bin", 32, TINY_DINO)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    return hub


def _request(key: str, weights: str | None = "random") -> Request:
    return Request(key, "", None, parse_weights(weights, key))


def _images(spec: models.ModelSpec, n: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(5))


def lora_at_zero(spec: models.ModelSpec, encoder: str = "vision", params=("q", "v")) -> list[torch.nn.Module]:
    """Inject LoRA: the outputs stay the same with B = 0 and change once B is not zero; the injected layers."""

    def outputs() -> torch.Tensor:
        with torch.no_grad():
            parts = [spec.encode_image(_images(spec))]
            if encoder in ("text", "both"):
                parts.append(spec.encode_text(["a cell", "a carcinoma cell"]))
        return torch.cat([p.flatten() for p in parts])

    before = outputs()
    layers = apply_lora(spec.model, params=params, encoder=encoder)
    assert layers
    torch.testing.assert_close(outputs(), before, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # large B: DINOv2's layer scale (1e-5 at random init) shrinks every attention update
        for name, p in lora_state_dict(spec.model).items():
            if ".lora_B" in name:
                p.normal_(0, 5.0, generator=torch.Generator().manual_seed(1))
    assert (outputs() - before).abs().max() > 1e-4
    return layers


def dinov2_checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm DINOv2 model's tensors as torch.hub DINOv2 (and DinoBloom's files) store them."""
    from timm.layers import GluMlp

    swiglu = isinstance(model.blocks[0].mlp, GluMlp)  # ViT-G's SwiGLU: DINOv2 names its Linears w12 and w3
    state = {}
    for name, tensor in model.state_dict().items():
        state[name.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3") if swiglu else name] = tensor.clone()
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    return state


# ---------------------------------------------------------------- DinoBloom


def test_dinobloom_s_at_full_size_takes_qv_lora_on_its_fused_qkv_like_timms_vit():
    spec = load_model("dinobloom_s", weights="random")
    facts = capabilities("dinobloom_s")
    assert (spec.feature_dim, spec.input_size) == (facts.feature_dim, facts.input_size) == (384, 224)
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))
    layers = lora_at_zero(spec)
    assert len(layers) == 12 and all(isinstance(m, LoRAFusedLinear) and m.letters == ("q", "v") for m in layers)
    assert [id(m) for m in layers] == [id(b.attn.qkv) for b in spec.model.blocks]  # the qkv Linear of each block
    vit_layers = apply_lora(load_model("tiny_vit").model, params=("q", "v"))
    assert {(type(m), m.letters) for m in vit_layers} == {(type(m), m.letters) for m in layers}


@pytest.mark.parametrize("variant", [TINY_S, TINY_G], ids=["mlp", "swiglu"])
def test_dinobloom_loads_dinov2_checkpoints_from_the_hub_a_folder_and_a_file(variant, fake_hub, tmp_path):
    source = dinobloom.build(_request("dinobloom_x"), variant)
    state = dinov2_checkpoint(source.model)
    assert "mask_token" in state and any(".w12." in k for k in state) == (variant is TINY_G)
    torch.save(state, fake_hub.repo(dinobloom.REPO) / variant.file)
    from_hub = dinobloom.build(_request("dinobloom_x", None), variant)
    assert from_hub.weights == f"hf-hub:{dinobloom.REPO}/{variant.file}"
    assert fake_hub.calls == [(dinobloom.REPO, variant.file)]
    assert _same_outputs(source, from_hub)
    folder = tmp_path / "downloaded"
    folder.mkdir()
    torch.save(state, folder / variant.file)
    assert _same_outputs(source, dinobloom.build(_request("dinobloom_x", str(folder)), variant))
    assert _same_outputs(source, dinobloom.build(_request("dinobloom_x", str(folder / variant.file)), variant))
    lora_at_zero(from_hub)


def test_dinobloom_g_checkpoint_names_fit_the_full_size_architecture():
    """ViT-G's SwiGLU tensors (w12, w3) and the mask token map onto timm's ViT-G, on the meta device."""
    variant = dinobloom.VARIANTS["g"]
    with torch.device("meta"):
        model = dinobloom.timm_models.create(_request("dinobloom_g"), variant.recipe)
        state = dinov2_checkpoint(model)
    assert any(k.endswith("mlp.w12.weight") for k in state) and state["pos_embed"].shape[1] == 1 + 16 * 16
    dinobloom.fit(model, state, "dinobloom_g", "a DINOv2 ViT-G/14 checkpoint")
    del state["blocks.3.mlp.w3.weight"]
    with pytest.raises(ModelError, match=r"1 missing \(e.g. blocks.3.mlp.fc2.weight\)"):
        dinobloom.fit(model, state, "dinobloom_g", "a damaged checkpoint")


def test_dinobloom_refuses_builtin_and_a_folder_without_its_file(tmp_path):
    with pytest.raises(ModelError, match="no built-in weights"):
        load_model("dinobloom_b", weights="builtin")
    with pytest.raises(ModelError, match="expected one of pytorch_model_l.bin"):
        load_model("dinobloom_l", weights=str(tmp_path))


# ---------------------------------------------------------------- PLIP and PubMedCLIP (transformers CLIPModel)


def _tiny_hf_clip_folder(folder: Path) -> Path:
    """A save_pretrained CLIPModel folder of a tiny configuration with OpenAI's vocabulary, and its processor."""
    from transformers import CLIPConfig, CLIPModel

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(text_config=dict(tiny, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(tiny, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32},
                 "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD)}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


@pytest.mark.parametrize("key", ["plip", "pubmedclip"])
def test_hf_clip_models_load_from_the_hub_layout_and_take_lora_in_both_towers(key, fake_hub):
    repo = capabilities(key).weights.removeprefix("hf-hub:")
    _tiny_hf_clip_folder(fake_hub.repo(repo))
    spec = load_model(key)
    assert spec.weights == f"hf-hub:{repo}" and spec.has_text
    assert (spec.feature_dim, spec.input_size) == (16, 32) and spec.mean == pytest.approx(OPENAI_MEAN)
    with torch.no_grad():
        text = spec.encode_text(["a normal cell", "a carcinoma cell", "a normal cell"])
    assert text.shape == (3, 16) and torch.allclose(text[0], text[2]) and not torch.allclose(text[0], text[1])
    layers = lora_at_zero(spec, encoder="both")
    assert all(isinstance(m, LoRALinear) for m in layers) and len(layers) == 2 * 2 * 2  # q and v, 2 blocks, 2 towers


def test_hf_clip_file_and_folder_weights_and_a_processor_that_disagrees(tmp_path, monkeypatch):
    folder = _tiny_hf_clip_folder(tmp_path / "plip")
    spec = load_model("plip", weights=str(folder))
    assert spec.weights == str(folder) and spec.architecture == capabilities("plip").architecture
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "crop_size": 224}))
    with pytest.raises(ModelError, match="crops to 224 px but the model takes 32 px"):
        load_model("plip", weights=str(folder))
    with pytest.raises(ModelError, match="do not fit model pubmedclip"):  # the full-size B/32 architecture
        build_on_meta("pubmedclip", monkeypatch, weights=str(folder / "model.safetensors"))


# ---------------------------------------------------------------- QuiltNet B/16 and CLIP B/32, L/14 (open_clip)


def test_quilt_b16_loads_its_hub_folder_and_takes_lora(fake_hub):
    source = load_model("tiny_clip", weights="random")
    _open_clip_folder(fake_hub.repo("wisdomik/QuiltNet-B-16"), source, TINY_CLIP_CFG)
    spec = load_model("quilt_b16")
    assert spec.weights == "hf-hub:wisdomik/QuiltNet-B-16"
    assert ("wisdomik/QuiltNet-B-16", "open_clip_config.json") in fake_hub.calls
    assert _same_outputs(source, spec, text=True)
    layers = lora_at_zero(spec, encoder="both")
    assert all(isinstance(m, LoRAMultiheadAttention) for m in layers)


def test_clip_b32_at_full_size_takes_lora():
    spec = load_model("clip", backbone="ViT-B/32", weights="random")
    assert (spec.feature_dim, spec.input_size) == (capabilities("clip", "ViT-B/32").feature_dim, 224)
    layers = lora_at_zero(spec)
    assert len(layers) == 12 and all(isinstance(m, LoRAMultiheadAttention) for m in layers)


# ---------------------------------------------------------------- offline: one line, and how to get access


@pytest.mark.parametrize("key", ["dinobloom_s", "dinobloom_g", "plip", "pubmedclip", "quilt_b16"])
def test_offline_hub_is_one_line_naming_the_repository_and_the_way_out(key, monkeypatch):
    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub and the file is not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelError) as info:
        load_model(key)
    message = str(info.value)
    repo = capabilities(key).weights.removeprefix("hf-hub:").removesuffix(f"/{dinobloom.VARIANTS['s'].file}")
    assert repo.split("/pytorch_model")[0] in message and "\n" not in message
    assert "no internet" in message and "--weights PATH" in message
