"""The toolkit's models, registered under the paper's keys, each with its capabilities as data.

The facts below are what the default weights give once built; tests/test_models_capabilities.py builds
every entry that builds offline (with random weights, on the meta device) and checks them against it.
"""

from models import dinobloom, efficientnet, hf_clip, hf_models, openclip_models, timm_models
from models.capabilities import (
    BUILTIN_WEIGHTS,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_MEAN,
    OPENAI_STD,
    Capabilities,
)
from models.registry import Entry, register


def _clip(arch: str, dim: int, hub: str, text: str = "mha", attention: str = "mha", size: int = 224) -> Capabilities:
    """An image-text model with OpenAI CLIP's preprocessing."""
    return Capabilities(arch, dim, size, OPENAI_MEAN, OPENAI_STD, hub, attention, text)


register(Entry(
    "clip", openclip_models.build_clip, "OpenAI CLIP via open_clip (--backbone ViT-B/16, ViT-L/14, ViT-B/32)",
    backbones=openclip_models.CLIP_BACKBONES,
    capabilities={
        "ViT-B/16": _clip("open_clip:ViT-B-16", 512, "hf-hub:timm/vit_base_patch16_clip_224.openai"),
        "ViT-L/14": _clip("open_clip:ViT-L-14", 768, "hf-hub:timm/vit_large_patch14_clip_224.openai"),
        "ViT-B/32": _clip("open_clip:ViT-B-32", 512, "hf-hub:timm/vit_base_patch32_clip_224.openai"),
    },
))
register(Entry(
    "quilt", openclip_models.build_quilt, f"QuiltNet-B-32 (hf-hub:{openclip_models.QUILT_REPO})",
    capabilities=_clip(f"open_clip:{openclip_models.QUILT_ARCH}", 512, f"hf-hub:{openclip_models.QUILT_REPO}"),
))
register(Entry(
    "quilt_b16", openclip_models.build_quilt_b16, f"QuiltNet-B-16 (hf-hub:{openclip_models.QUILT_B16_REPO})",
    capabilities=_clip(f"open_clip:{openclip_models.QUILT_B16_ARCH}", 512,
                       f"hf-hub:{openclip_models.QUILT_B16_REPO}"),
))
register(Entry(
    "plip", hf_clip.builder(hf_clip.PLIP_REPO), f"PLIP, pathology CLIP ViT-B/32 via transformers ({hf_clip.PLIP_REPO})",
    capabilities=_clip("transformers:CLIPModel", 512, f"hf-hub:{hf_clip.PLIP_REPO}", "separate_qkv", "separate_qkv"),
))
register(Entry(
    "pubmedclip", hf_clip.builder(hf_clip.PUBMEDCLIP_REPO),
    f"PubMedCLIP, medical CLIP ViT-B/32 via transformers ({hf_clip.PUBMEDCLIP_REPO})",
    capabilities=_clip("transformers:CLIPModel", 512, f"hf-hub:{hf_clip.PUBMEDCLIP_REPO}", "separate_qkv",
                       "separate_qkv"),
))
register(Entry(
    "biomedclip", openclip_models.build_biomedclip, f"BiomedCLIP (hf-hub:{openclip_models.BIOMEDCLIP_REPO})",
    capabilities=_clip(f"open_clip:{openclip_models.BIOMEDCLIP_ARCH}", 512, f"hf-hub:{openclip_models.BIOMEDCLIP_REPO}",
                       text="separate_qkv", attention="fused_qkv"),
))
register(Entry(
    "uni", timm_models.build_uni, f"UNI ViT-L/16 via timm (hf-hub:{timm_models.UNI_REPO}, gated)",
    capabilities=Capabilities(f"timm:{timm_models.UNI.arch}", 1024, 224, IMAGENET_MEAN, IMAGENET_STD,
                              f"hf-hub:{timm_models.UNI_REPO}", "fused_qkv", gated=True),
))
for _size, _variant in dinobloom.VARIANTS.items():
    register(Entry(
        f"dinobloom_{_size}", dinobloom.builder(_size),
        f"DinoBloom-{_size.upper()}, DINOv2 ViT-{_size.upper()}/14 on blood cells via timm (hf-hub:{dinobloom.REPO})",
        capabilities=Capabilities(
            f"timm:{_variant.arch}", _variant.feature_dim, dinobloom.INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD,
            f"hf-hub:{dinobloom.REPO}/{_variant.file}", "fused_qkv",
        ),
    ))
register(Entry(
    "vit_google", hf_models.build_vit_google, f"ViT-B/16 via transformers ({hf_models.VIT_GOOGLE_REPO})",
    capabilities=Capabilities("transformers:ViTModel", 768, 224, HALF, HALF, f"hf-hub:{hf_models.VIT_GOOGLE_REPO}",
                              "separate_qkv"),
))
register(Entry(
    "tiny_clip", openclip_models.build_tiny_clip, "tiny open_clip CLIP with a text tower (built in)",
    capabilities=_clip(f"open_clip:{openclip_models.TINY_ARCH}", 64, BUILTIN_WEIGHTS, size=64),
))
register(Entry(
    "tiny_vit", timm_models.build_tiny_vit, "tiny timm ViT with fused qkv (built in)",
    capabilities=Capabilities(f"timm:{timm_models.TINY_VIT.arch}", 64, 64, HALF, HALF, BUILTIN_WEIGHTS, "fused_qkv"),
))
register(Entry(
    "tiny_hf_vit", hf_models.build_tiny_hf_vit, "tiny transformers ViT with separate q/k/v (built in)",
    capabilities=Capabilities("transformers:ViTModel", 32, 32, HALF, HALF, BUILTIN_WEIGHTS, "separate_qkv"),
))
register(Entry(
    "efficientnet_lite0", efficientnet.build_efficientnet_lite0,
    f"EfficientNet-Lite0 via timm, ImageNet weights from pip package {efficientnet.PIP_NAME}",
    capabilities=Capabilities(f"timm:{efficientnet.ARCH}", 1280, 224, HALF, HALF, efficientnet.LABEL,
                              "pointwise_conv"),
))
register(Entry(
    "timm", timm_models.build_any, "any timm architecture; needs --weights FILE or random", namespace=True,
    capabilities=timm_models.describe_any,
))
