"""Weights from local files and folders, any timm architecture, and the hub paths (with a local fake hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors.torch import save_file

import models
from models import ModelError, load_model, openclip_models, timm_models
from models.weights import parse_weights

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP_CFG = json.loads((REPO_ROOT / "models" / "configs" / "cytolora_tiny_clip.json").read_text())


def _response():
    return SimpleNamespace(headers={}, request=None, status_code=404)


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download, serving <root>/<repo id>/<file>."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple[str, str]] = []

    def repo(self, repo_id: str) -> Path:
        folder = self.root / repo_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def __call__(self, repo_id: str, filename: str, **kwargs) -> str:
        self.calls.append((repo_id, filename))
        if not (self.root / repo_id).is_dir():
            raise RepositoryNotFoundError(f"{repo_id} not found", response=_response())
        path = self.root / repo_id / filename
        if not path.is_file():
            raise RemoteEntryNotFoundError(f"{filename} not in {repo_id}", response=_response())
        return str(path)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    return hub


@pytest.fixture
def no_building(monkeypatch):
    """Fail the test if any library starts building a model."""
    import open_clip
    import timm
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the weights were found")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse)
    monkeypatch.setattr(timm, "create_model", refuse)
    monkeypatch.setattr(transformers.ViTModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.ViTModel, "__init__", refuse)


def _same_outputs(a: models.ModelSpec, b: models.ModelSpec, text: bool = False) -> bool:
    x = torch.randn(2, 3, a.input_size, a.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.allclose(a.encode_image(x), b.encode_image(x), atol=1e-6)
        if text:
            same = same and torch.allclose(a.encode_text(["a cell"]), b.encode_text(["a cell"]), atol=1e-6)
    return same


def _open_clip_folder(folder: Path, spec: models.ModelSpec, model_cfg: dict) -> Path:
    """The hub layout of an open_clip model: open_clip_config.json + open_clip_pytorch_model.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(spec.mean), "std": list(spec.std)}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(spec.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


# ---------------------------------------------------------------- local files and folders


def test_tiny_clip_round_trips_through_files_and_a_hub_layout_folder(tmp_path):
    source = load_model("tiny_clip", weights="random")  # not the built-in weights, so loading must happen
    builtin = load_model("tiny_clip")
    assert not _same_outputs(source, builtin)
    torch.save(source.model.state_dict(), tmp_path / "clip.pth")
    save_file(source.model.state_dict(), str(tmp_path / "clip.safetensors"))
    folder = _open_clip_folder(tmp_path / "folder", source, TINY_CLIP_CFG)
    for path in (tmp_path / "clip.pth", tmp_path / "clip.safetensors", folder):
        loaded = load_model("tiny_clip", weights=str(path))
        assert loaded.weights == str(path)
        assert _same_outputs(source, loaded, text=True), path
        assert (loaded.feature_dim, loaded.input_size, loaded.has_text) == (64, 64, True)


def test_tiny_vit_round_trips_nested_prefixed_files_and_timm_folders(tmp_path):
    source = load_model("tiny_vit", weights="random")
    state = source.model.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    torch.save({"model": state}, tmp_path / "nested.bin")
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file(state, str(plain / "model.safetensors"))
    timm_dir = tmp_path / "timm_dir"  # timm's hub layout: config.json drives timm's own local loader
    timm_dir.mkdir()
    save_file(state, str(timm_dir / "model.safetensors"))
    (timm_dir / "config.json").write_text(json.dumps({
        "architecture": "test_vit", "num_classes": 0, "model_args": {"img_size": 64},
        "pretrained_cfg": {"input_size": [3, 64, 64], "mean": [0.1, 0.2, 0.3], "std": [0.2, 0.2, 0.2],
                           "classifier": "head", "fixed_input_size": True},
    }))
    for path in (tmp_path / "ddp.pth", tmp_path / "nested.bin", plain, timm_dir):
        loaded = load_model("tiny_vit", weights=str(path))
        assert _same_outputs(source, loaded), path
    assert loaded.mean == (0.1, 0.2, 0.3)  # the folder's own preprocessing config wins


def test_hf_vit_round_trips_save_pretrained_folders_and_state_dict_files(tmp_path):
    from transformers import ViTImageProcessor

    source = load_model("tiny_hf_vit", weights="random")
    folder = tmp_path / "hf"
    source.model.save_pretrained(folder)
    ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.3, 0.3],
                      size={"height": 32, "width": 32}).save_pretrained(folder)
    from_folder = load_model("tiny_hf_vit", weights=str(folder))
    assert _same_outputs(source, from_folder)
    assert from_folder.mean == pytest.approx((0.1, 0.2, 0.3)) and from_folder.std == pytest.approx((0.3,) * 3)
    # vit_google reads the architecture from the folder too: a tiny one loads without any ViT-B
    assert _same_outputs(source, load_model("vit_google", weights=str(folder)))
    # a ViTForImageClassification-style file: encoder under "vit.", plus a classifier
    state = {f"vit.{k}": v for k, v in source.model.state_dict().items()}
    state["classifier.weight"] = torch.zeros(5, 32)
    torch.save(state, tmp_path / "classifier.bin")
    assert _same_outputs(source, load_model("tiny_hf_vit", weights=str(tmp_path / "classifier.bin")))


def test_weights_that_do_not_fit_fail_with_one_line(tmp_path):
    torch.save(load_model("tiny_vit").model.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ModelError) as info:
        load_model("timm:test_resnet", weights=str(tmp_path / "vit.pth"))
    assert "do not fit model timm:test_resnet" in str(info.value) and "\n" not in str(info.value)
    state = load_model("tiny_vit").model.state_dict()
    state["pos_embed"] = torch.zeros(1, 5, 64)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ModelError, match=r"1 with another shape \(e.g. pos_embed"):
        load_model("tiny_vit", weights=str(tmp_path / "shape.pth"))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights file .*junk.bin"):
        load_model("tiny_vit", weights=str(tmp_path / "junk.bin"))
    with pytest.raises(ModelError, match="cannot build model tiny_clip from .*junk.bin"):
        load_model("tiny_clip", weights=str(tmp_path / "junk.bin"))
    torch.save(state, tmp_path / "vit_for_clip.pth")
    with pytest.raises(ModelError, match="cannot build model tiny_clip from .*vit_for_clip.pth"):
        load_model("tiny_clip", weights=str(tmp_path / "vit_for_clip.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ModelError, match="holds no state_dict"):
        load_model("tiny_vit", weights=str(tmp_path / "list.pth"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no weights file in .*empty"):
        load_model("tiny_vit", weights=str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="not an open_clip folder"):
        load_model("tiny_clip", weights=str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        load_model("tiny_hf_vit", weights=str(tmp_path / "empty"))


# ---------------------------------------------------------------- timm:<architecture>


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet", "test_mambaout"])
def test_any_timm_architecture_with_random_weights(arch):
    spec = load_model(f"timm:{arch}", weights="random")
    again = load_model(f"timm:{arch}", weights="random")
    assert spec.weights == "random" and spec.architecture == f"timm:{arch}" and not spec.has_text
    assert spec.input_size == 160  # timm's data config for these test architectures
    x = torch.randn(2, 3, spec.input_size, spec.input_size)
    with torch.no_grad():
        features = spec.encode_image(x)
    assert features.shape == (2, spec.feature_dim)
    assert _same_outputs(spec, again)


def test_timm_architecture_loads_a_checkpoint_with_its_classifier(tmp_path):
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(7)
        trained = timm.create_model("test_resnet", num_classes=10)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "resnet.pth")
    spec = load_model("timm:test_resnet", weights=str(tmp_path / "resnet.pth"))
    x = torch.randn(2, 3, 160, 160)
    trained.eval()
    with torch.no_grad():
        expected = trained.forward_head(trained.forward_features(x), pre_logits=True)
        assert torch.allclose(spec.encode_image(x), expected, atol=1e-6)
    assert spec.weights == str(tmp_path / "resnet.pth")
    assert not _same_outputs(spec, load_model("timm:test_resnet", weights="random"))


def test_unknown_timm_architecture_suggests_close_names():
    with pytest.raises(ModelError, match="unknown timm architecture 'test_resnett'.*test_resnet"):
        load_model("timm:test_resnett", weights="random")


# ---------------------------------------------------------------- the hub paths


def test_a_folder_of_another_timm_architecture_is_refused(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "test_resnet"}))
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(ModelError, match="holds a timm 'test_resnet' model.*--model_name timm:test_resnet"):
        load_model("tiny_vit", weights=str(folder))


@pytest.mark.parametrize("key, repo", [
    ("uni", "MahmoodLab/UNI"),
    ("clip", "timm/vit_base_patch16_clip_224.openai"),
    ("quilt", "wisdomik/QuiltNet-B-32"),
    ("biomedclip", "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"),
    ("vit_google", "google/vit-base-patch16-224"),
])
def test_offline_hub_fails_before_building_and_says_how_to_get_the_weights(monkeypatch, no_building, key, repo):
    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub and the file is not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelError) as info:
        load_model(key)
    message = str(info.value)
    assert f"hf-hub:{repo}" in message and "\n" not in message
    assert "no internet" in message and "--weights PATH" in message


def test_gated_uni_says_to_accept_the_licence_and_log_in(monkeypatch, no_building):
    def gated(repo_id, filename, **kwargs):
        raise GatedRepoError("403 gated", response=_response())

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(ModelError) as info:
        load_model("uni")
    message = str(info.value)
    for part in ("hf-hub:MahmoodLab/UNI", "gated", "licence", "huggingface-cli login", "--weights PATH"):
        assert part in message


def test_uni_offline_in_a_real_subprocess_is_one_error_line_and_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "models", "show", "uni"], check=False, cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "hf-hub:MahmoodLab/UNI" in result.stderr and "huggingface-cli login" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 60  # nothing as large as ViT-L is built before the error


def test_uni_hub_path_loads_through_timms_own_loader(fake_hub, monkeypatch, tmp_path):
    tiny = timm_models.Recipe(
        "test_vit", {"img_size": 64, "init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0},
        repo=timm_models.UNI_REPO, hint=timm_models.UNI_HINT,
    )
    monkeypatch.setattr(timm_models, "UNI", tiny)  # the real recipe builds a ViT-L
    source = timm_models.build(models.Request("uni", "", None, parse_weights("random", "uni")), tiny)
    repo = fake_hub.repo("MahmoodLab/UNI")
    torch.save(source.model.state_dict(), repo / "pytorch_model.bin")  # no model.safetensors: the fallback
    (repo / "config.json").write_text(json.dumps({
        "architecture": "test_vit", "num_classes": 0, "model_args": {"img_size": 64},
        "pretrained_cfg": {"input_size": [3, 64, 64], "mean": [0.485, 0.456, 0.406],
                           "std": [0.229, 0.224, 0.225], "classifier": "head"},
    }))
    spec = load_model("uni")
    assert spec.weights == "hf-hub:MahmoodLab/UNI"
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406)) and spec.input_size == 64
    assert _same_outputs(source, spec)
    assert ("MahmoodLab/UNI", "model.safetensors") in fake_hub.calls


def test_quilt_hub_path_loads_the_open_clip_folder(fake_hub):
    source = load_model("tiny_clip", weights="random")
    _open_clip_folder(fake_hub.repo("wisdomik/QuiltNet-B-32"), source, TINY_CLIP_CFG)
    spec = load_model("quilt")
    assert spec.weights == "hf-hub:wisdomik/QuiltNet-B-32"
    assert _same_outputs(source, spec, text=True)


def test_clip_hub_path_uses_quick_gelu_and_the_openai_checkpoint(fake_hub, monkeypatch):
    import open_clip

    monkeypatch.setitem(openclip_models.CLIP_BACKBONES, "ViT-B/16", openclip_models.TINY_ARCH)
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda arch, tag: {"hf_hub": "timm/tiny.openai/"})
    reference = load_model("clip", weights="random")
    assert any(type(m).__name__ == "QuickGELU" for m in reference.model.modules())
    torch.save(reference.model.state_dict(), fake_hub.repo("timm/tiny.openai") / "open_clip_pytorch_model.bin")
    spec = load_model("clip")
    assert spec.weights == "hf-hub:timm/tiny.openai" and spec.backbone == "ViT-B/16"
    assert _same_outputs(reference, spec, text=True)


def test_vit_google_hub_path_reads_the_processor_config(fake_hub):
    from transformers import ViTImageProcessor

    source = load_model("tiny_hf_vit", weights="random")
    repo = fake_hub.repo("google/vit-base-patch16-224")
    source.model.save_pretrained(repo)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.4, 0.4]).save_pretrained(repo)
    spec = load_model("vit_google")
    assert spec.weights == "hf-hub:google/vit-base-patch16-224" and spec.mean == pytest.approx((0.4,) * 3)
    assert _same_outputs(source, spec)


def _tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertTokenizer

    folder.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "normal", "cell", "carcinoma"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=32).save_pretrained(folder)
    return folder


def test_biomedclip_style_model_with_timm_vision_and_hf_text_tower(fake_hub, tmp_path):
    import open_clip

    bert = str(_tiny_bert(tmp_path / "bert"))
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 64},
        "text_cfg": {"hf_model_name": bert, "hf_tokenizer_name": bert, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16},
    }
    repo = fake_hub.repo("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    (repo / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    torch.manual_seed(3)
    reference = open_clip.create_model(f"local-dir:{repo}", pretrained_text=False)
    torch.save(reference.state_dict(), repo / "open_clip_pytorch_model.bin")
    spec = load_model("biomedclip")  # the tokenizer comes from hf_tokenizer_name: the folder has none
    assert spec.weights.startswith("hf-hub:microsoft/BiomedCLIP") and spec.has_text
    assert type(spec.model).__name__ == "CustomTextCLIP" and spec.feature_dim == 16
    assert hasattr(spec.model.visual.trunk.blocks[0].attn, "qkv")
    x = torch.randn(2, 3, 64, 64)
    tokens = spec.tokenizer(["a normal cell"])
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(spec.encode_image(x), reference.encode_image(x), atol=1e-6)
        assert torch.allclose(spec.encode_text(["a normal cell"]), reference.encode_text(tokens), atol=1e-6)
    assert tokens.shape == (1, 16) and tokens[0, 0].item() == 2  # [CLS] first, padded to the context length
