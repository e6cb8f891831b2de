"""The model registry, the tiny built-in models, their preprocessing and their encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import models
from models import ModelError, load_model
from models.registry import Entry, register, resolve, resolve_backbone, unregister

TINY = ("tiny_clip", "tiny_vit", "tiny_hf_vit")
EXPECTED = {  # key: (input size, feature dim, mean) as the libraries' own configs give them
    "tiny_clip": (64, 64, (0.48145466, 0.4578275, 0.40821073)),
    "tiny_vit": (64, 64, (0.5, 0.5, 0.5)),
    "tiny_hf_vit": (32, 32, (0.5, 0.5, 0.5)),
}


@pytest.fixture(scope="module")
def specs() -> dict[str, models.ModelSpec]:
    return {key: load_model(key) for key in TINY}


def _state(spec: models.ModelSpec) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in spec.model.state_dict().items()}


def test_model_names_are_the_papers_keys_plus_the_test_models():
    assert set(models.MODEL_NAMES) == {
        "clip", "quilt", "biomedclip", "uni", "vit_google", "tiny_clip", "tiny_vit", "tiny_hf_vit",
        "efficientnet_lite0",
        # the cytology benchmark's other backbones
        "quilt_b16", "plip", "pubmedclip", "dinobloom_s", "dinobloom_b", "dinobloom_l", "dinobloom_g",
    }
    assert "timm:<architecture>" in [e.label for e in models.entries()]


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ModelError) as info:
        load_model("resnet")
    message = str(info.value)
    assert "'resnet'" in message and "\n" not in message
    for key in (*models.MODEL_NAMES, "timm:<architecture>"):
        assert key in message
    with pytest.raises(ModelError, match="unknown model 'timm:'"):
        load_model("timm:")
    with pytest.raises(ModelError, match="unknown model 'tiny_vit:x'"):
        load_model("tiny_vit:x")


def test_registering_a_taken_key_raises_and_a_new_key_works():
    with pytest.raises(ModelError, match="already registered"):
        register(Entry("clip", lambda req: None, "duplicate"))
    with pytest.raises(ModelError, match="already registered"):
        register(Entry("timm", lambda req: None, "duplicate namespace", namespace=True))
    calls = []
    register(Entry("my_model", lambda req: calls.append(req) or load_model("tiny_vit"), "plug-in"))
    try:
        assert "my_model" in models.model_names()
        entry, name = resolve("my_model")
        assert entry.key == "my_model" and name == ""
        load_model("my_model", weights="random")
        assert calls[0].weights.kind == "random"
    finally:
        unregister("my_model")
    assert "my_model" not in models.model_names()


def test_clip_backbones_resolve_and_unknown_ones_list_the_valid_ones():
    clip, _ = resolve("clip")
    assert resolve_backbone(clip, "clip", None) == "ViT-B/16"
    assert resolve_backbone(clip, "clip", "ViT-L/14") == "ViT-L/14"
    assert resolve_backbone(clip, "clip", "ViT-B-32") == "ViT-B/32"
    assert clip.backbones == {"ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-B/32": "ViT-B-32"}
    with pytest.raises(ModelError) as info:
        load_model("clip", backbone="RN50")
    assert "RN50" in str(info.value) and "ViT-B/16, ViT-L/14, ViT-B/32" in str(info.value)
    with pytest.raises(ModelError, match="fixed architecture"):
        load_model("tiny_vit", backbone="ViT-L/14")


@pytest.mark.parametrize("key", TINY)
def test_tiny_models_report_what_a_forward_pass_gives(specs, key):
    spec = specs[key]
    size, dim, mean = EXPECTED[key]
    assert (spec.input_size, spec.feature_dim) == (size, dim)
    assert spec.mean == pytest.approx(mean) and len(spec.std) == 3
    assert spec.weights == "builtin" and spec.key == key
    with torch.no_grad():
        features = spec.encode_image(torch.randn(3, 3, size, size))
    assert features.shape == (3, spec.feature_dim)
    assert torch.isfinite(features).all()
    info = models.describe(spec)
    assert info["feature_dim"] == dim and info["input_size"] == size and info["has_text"] == (key == "tiny_clip")
    trainable, total = models.count_parameters(spec.model)
    assert trainable == total == sum(p.numel() for p in spec.model.parameters()) > 0


def test_the_model_object_is_what_lora_walks(specs):
    from open_clip.model import CLIP
    from timm.models.vision_transformer import VisionTransformer
    from transformers import ViTModel

    clip = specs["tiny_clip"].model
    assert isinstance(clip, CLIP) and hasattr(clip, "visual") and hasattr(clip, "transformer")
    assert any(isinstance(m, torch.nn.MultiheadAttention) for m in clip.visual.modules())
    vit = specs["tiny_vit"].model
    assert isinstance(vit, VisionTransformer) and isinstance(vit.blocks[0].attn.qkv, torch.nn.Linear)
    hf = specs["tiny_hf_vit"].model
    assert isinstance(hf, ViTModel) and hf.pooler is None
    separate = [n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("q_proj", "query"))]
    assert len(separate) == hf.config.num_hidden_layers


def test_encode_image_follows_modules_replaced_after_loading():
    spec = load_model("tiny_vit")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = spec.encode_image(x)
        spec.model.norm = torch.nn.Identity()  # what an adapter injection does: swap a submodule in place
        after = spec.encode_image(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("key", TINY)
@pytest.mark.parametrize("shape_mode", [((50, 37), "RGB"), ((300, 120), "L"), ((8, 9), "RGBA")])
def test_transforms_resize_any_image_and_normalise_with_the_models_stats(specs, key, shape_mode):
    spec = specs[key]
    (width, height), mode = shape_mode
    level = 204  # 0.8 after ToTensor; a flat image stays flat through resizing, cropping and flipping
    image = Image.new(mode, (width, height), color=level if mode == "L" else (level,) * len(mode))
    for transform in (spec.eval_transform, spec.train_transform):
        x = transform(image)
        assert x.shape == (3, spec.input_size, spec.input_size)
        expected = (0.8 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
        assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-4)
        assert torch.allclose(x, expected[:, None, None].expand_as(x), atol=1e-4)


def test_train_transform_is_the_papers_augmentation(specs):
    spec = specs["tiny_vit"]
    steps = {type(t): t for t in spec.train_transform.transforms}
    crop = steps[T.RandomResizedCrop]
    assert crop.size == (64, 64) and crop.scale == (0.7, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert T.RandomHorizontalFlip in steps and T.ToTensor in steps
    resize = {type(t): t for t in spec.eval_transform.transforms}[T.Resize]
    assert resize.size == (64, 64) and resize.interpolation == T.InterpolationMode.BICUBIC
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (90, 70, 3), dtype=np.uint8))
    torch.manual_seed(0)
    views = [spec.train_transform(image) for _ in range(4)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(spec.eval_transform(image), spec.eval_transform(image))


def test_tiny_clip_encodes_text_and_the_others_have_no_text_tower(specs):
    clip = specs["tiny_clip"]
    assert clip.has_text
    with torch.no_grad():
        text = clip.encode_text(["a normal cell", "a carcinoma cell", "a normal cell"])
    assert text.shape == (3, 64)
    assert torch.allclose(text[0], text[2]) and not torch.allclose(text[0], text[1])
    assert clip.tokenizer(["a cell"]).shape == (1, 77)
    for key in ("tiny_vit", "tiny_hf_vit"):
        assert not specs[key].has_text
        with pytest.raises(ModelError, match=f"model '{key}' has no text tower"):
            specs[key].encode_text(["a cell"])


@pytest.mark.parametrize("key", TINY)
def test_random_init_is_deterministic_differs_from_builtin_and_spares_the_global_rng(specs, key):
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    first, second = load_model(key, weights="random"), load_model(key, weights="random")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert first.weights == "random"
    a, b, builtin = _state(first), _state(second), _state(specs[key])
    assert a.keys() == builtin.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    floats = [k for k in a if a[k].is_floating_point() and a[k].numel() > 1 and a[k].std() > 0]
    assert floats and all(not torch.equal(a[k], builtin[k]) for k in floats)
    again = load_model(key)
    assert all(torch.equal(v, builtin[k]) for k, v in _state(again).items())


def test_builtin_is_refused_where_there_are_no_builtin_weights():
    with pytest.raises(ModelError, match="no built-in weights"):
        load_model("vit_google", weights="builtin")
    with pytest.raises(ModelError, match="needs weights: pass --weights FILE .* or --weights random"):
        load_model("timm:test_resnet")


def test_a_missing_weights_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model.bin"
    for key in ("tiny_vit", "clip", "uni", "timm:resnet18"):
        with pytest.raises(ModelError) as info:
            load_model(key, weights=str(missing))
        assert str(info.value).startswith(f"weights not found: {missing}")
        assert "--weights" in str(info.value)
