"""Hand-written LoRA (and its DoRA variant) for vision and text towers: injection, merging, adapter files."""

from lora.config import (
    ENCODERS,
    PARAM_LETTERS,
    POSITIONS,
    SCALINGS,
    LoRASettings,
    compute_scale,
    parse_params,
)
from lora.errors import LoRAError
from lora.inject import apply_lora, block_indices, find_towers, lora_disabled, lora_layers
from lora.io import load_lora, lora_parameters, lora_state_dict, read_lora_settings, save_lora
from lora.layers import (
    LoRAConv2d,
    LoRAFusedLinear,
    LoRALinear,
    LoRAModule,
    LoRAMultiheadAttention,
    OriginalAttentionLoRA,
)
from lora.merge import merge_lora
from lora.svd import SingularValueDelta, apply_svd, load_svd, merge_svd, save_svd, svd_layers, svd_state_dict

__all__ = [
    "ENCODERS",
    "PARAM_LETTERS",
    "POSITIONS",
    "SCALINGS",
    "LoRAConv2d",
    "LoRAError",
    "LoRAFusedLinear",
    "LoRALinear",
    "LoRAModule",
    "LoRAMultiheadAttention",
    "LoRASettings",
    "OriginalAttentionLoRA",
    "apply_lora",
    "block_indices",
    "compute_scale",
    "find_towers",
    "load_lora",
    "lora_disabled",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "parse_params",
    "read_lora_settings",
    "save_lora",
    "SingularValueDelta",
    "apply_svd",
    "load_svd",
    "merge_svd",
    "save_svd",
    "svd_layers",
    "svd_state_dict",
]
