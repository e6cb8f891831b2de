"""Every registry entry's declared capabilities match what its builder makes, and are read without building."""

from __future__ import annotations

import dataclasses

import pytest

import models
from models import ModelError, capabilities
from models.__main__ import main as models_main
from models.capabilities import ATTENTION_LAYOUTS, Capabilities
from models.registry import Entry, entries, register, unregister
from tests.model_builds import build_on_meta, tower_layouts


def declared() -> list[tuple[str, str | None]]:
    """(key, backbone) of every plain entry, every backbone of an entry that has several."""
    pairs = []
    for entry in entries():
        if not entry.namespace:
            pairs += [(entry.key, b) for b in entry.backbones] or [(entry.key, None)]
    return pairs


# Entries whose random-weight build still needs the hub (a Hugging Face text tower's config): their facts
# are checked against their architecture's own configuration in test_facts_without_an_offline_build.
NEEDS_HUB = {"biomedclip"}


def _check(facts: Capabilities, spec: models.ModelSpec) -> None:
    assert (spec.feature_dim, spec.input_size) == (facts.feature_dim, facts.input_size)
    assert spec.mean == pytest.approx(facts.mean) and spec.std == pytest.approx(facts.std)
    assert spec.has_text == facts.has_text
    assert spec.architecture == facts.architecture
    layouts = tower_layouts(spec.model)
    assert layouts["vision"] == {facts.attention}
    assert layouts.get("text") == ({facts.text_attention} if facts.has_text else None)


@pytest.mark.parametrize(("key", "backbone"), [p for p in declared() if p[0] not in NEEDS_HUB])
def test_declared_capabilities_match_the_built_model(key, backbone, monkeypatch):
    facts = capabilities(key, backbone)
    spec = build_on_meta(key, monkeypatch, backbone)
    _check(facts, spec)


def test_every_plain_entry_declares_its_capabilities():
    for key, backbone in declared():
        facts = capabilities(key, backbone)
        assert isinstance(facts, Capabilities) and facts.attention in ATTENTION_LAYOUTS
        assert facts.weights, f"{key} does not say where its weights come from"


def test_facts_without_an_offline_build():
    import open_clip

    from models import openclip_models

    facts = capabilities("biomedclip")
    openclip_models._register_configs()
    config = open_clip.get_model_config(openclip_models.BIOMEDCLIP_ARCH)
    assert facts.feature_dim == config["embed_dim"] and facts.input_size == config["vision_cfg"]["image_size"]
    assert "timm_model_name" in config["vision_cfg"] and facts.attention == "fused_qkv"
    assert "hf_model_name" in config["text_cfg"] and facts.text_attention == "separate_qkv"  # BERT query/key/value


@pytest.mark.parametrize("backbone", ["ViT-B/16", "ViT-L/14", "ViT-B/32"])
def test_clip_weights_are_the_hub_repository_open_clip_names(backbone):
    import open_clip

    from models import openclip_models

    arch = openclip_models.CLIP_BACKBONES[backbone]
    facts = capabilities("clip", backbone)
    assert facts.weights == "hf-hub:" + open_clip.get_pretrained_cfg(arch, "openai")["hf_hub"].rstrip("/")
    assert facts.architecture == f"open_clip:{arch}"


def test_timm_namespace_facts_come_from_the_architecture(monkeypatch):
    for arch, layout in (("test_vit", "fused_qkv"), ("resnet18", "pointwise_conv")):
        facts = capabilities(f"timm:{arch}")
        spec = build_on_meta(f"timm:{arch}", monkeypatch)
        assert (facts.feature_dim, facts.input_size, facts.attention) == (spec.feature_dim, spec.input_size, layout)
        assert facts.mean == pytest.approx(spec.mean) and not facts.has_text
    with pytest.raises(ModelError, match="unknown timm architecture"):
        capabilities("timm:no_such_net")


def test_capabilities_name_bad_requests_in_one_line():
    assert capabilities("clip") == capabilities("clip", "ViT-B/16")  # the default backbone
    assert capabilities("clip", "vit-l-14").feature_dim == 768
    with pytest.raises(ModelError, match="unknown backbone 'RN50'"):
        capabilities("clip", "RN50")
    with pytest.raises(ModelError, match="unknown model 'resnet'"):
        capabilities("resnet")
    register(Entry("undeclared_test", lambda req: None, "a plug-in that declares nothing"))
    try:
        with pytest.raises(ModelError, match="declares no capabilities") as info:
            capabilities("undeclared_test")
        assert "\n" not in str(info.value)
    finally:
        unregister("undeclared_test")


def test_register_refuses_capabilities_of_the_wrong_shape():
    facts = capabilities("tiny_vit")
    with pytest.raises(ModelError, match="one Capabilities per backbone"):
        register(Entry("shape_test", lambda req: None, "x", backbones={"a": "A", "b": "B"}, capabilities={"a": facts}))
    with pytest.raises(ModelError, match="a function of the architecture name"):
        register(Entry("shape_test", lambda req: None, "x", namespace=True, capabilities=facts))
    with pytest.raises(ValueError, match="unknown attention layout"):
        dataclasses.replace(facts, attention="grouped")
    assert "shape_test" not in models.model_names()


def test_models_list_prints_the_facts_without_building_anything(monkeypatch, capsys):
    import models.registry as registry

    def refuse(request):
        raise AssertionError(f"models list built {request.key}")

    monkeypatch.setattr(registry, "_ENTRIES", {k: dataclasses.replace(e, build=refuse)
                                               for k, e in registry._ENTRIES.items()})
    assert models_main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for key, backbone in declared():
        facts = capabilities(key, backbone)
        first = [key, backbone or str(facts.feature_dim)]
        row = next(line.split() for line in lines if line.split()[:2] == first)
        assert str(facts.feature_dim) in row and str(facts.input_size) in row
        assert facts.weights in row and ("yes" if facts.has_text else "no") in row
    assert any(line.startswith("timm:<architecture>") for line in lines)
