"""The toolkit's models, registered under the paper's keys."""

from models import efficientnet, hf_models, openclip_models, timm_models
from models.registry import Entry, register

register(Entry(
    "clip", openclip_models.build_clip, "OpenAI CLIP via open_clip (--backbone ViT-B/16, ViT-L/14, ViT-B/32)",
    backbones=openclip_models.CLIP_BACKBONES,
))
register(Entry("quilt", openclip_models.build_quilt, f"QuiltNet-B-32 (hf-hub:{openclip_models.QUILT_REPO})"))
register(Entry(
    "biomedclip", openclip_models.build_biomedclip, f"BiomedCLIP (hf-hub:{openclip_models.BIOMEDCLIP_REPO})",
))
register(Entry("uni", timm_models.build_uni, f"UNI ViT-L/16 via timm (hf-hub:{timm_models.UNI_REPO}, gated)"))
register(Entry(
    "vit_google", hf_models.build_vit_google, f"ViT-B/16 via transformers ({hf_models.VIT_GOOGLE_REPO})",
))
register(Entry("tiny_clip", openclip_models.build_tiny_clip, "tiny open_clip CLIP with a text tower (built in)"))
register(Entry("tiny_vit", timm_models.build_tiny_vit, "tiny timm ViT with fused qkv (built in)"))
register(Entry("tiny_hf_vit", hf_models.build_tiny_hf_vit, "tiny transformers ViT with separate q/k/v (built in)"))
register(Entry(
    "efficientnet_lite0", efficientnet.build_efficientnet_lite0,
    f"EfficientNet-Lite0 via timm, ImageNet weights from pip package {efficientnet.PIP_NAME}",
))
register(Entry("timm", timm_models.build_any, "any timm architecture; needs --weights FILE or random", namespace=True))
