"""Foundation-model registry: load a model by key with its preprocessing, feature size and encoders.

    spec = load_model("clip", backbone="ViT-B/16")          # hub weights
    spec = load_model("uni", weights="/data/uni")             # a local file or folder
    spec = load_model("timm:resnet50", weights="random")      # any timm architecture
    facts = capabilities("clip", backbone="ViT-L/14")          # feature size, input, mean/std, text tower,
                                                               # weights source, attention layout: nothing built
"""

from models import catalog  # noqa: F401  (registers the built-in keys)
from models.capabilities import ATTENTION_LAYOUTS, Capabilities
from models.errors import ModelError
from models.registry import Entry, Request, capabilities, entries, load_model, model_names, register, unregister
from models.spec import ModelSpec, count_parameters, describe
from models.weights import BUILTIN, RANDOM

MODEL_NAMES: tuple[str, ...] = model_names()
TIMM_PREFIX = "timm:"

__all__ = [
    "ATTENTION_LAYOUTS", "BUILTIN", "MODEL_NAMES", "RANDOM", "TIMM_PREFIX", "Capabilities", "Entry", "ModelError",
    "ModelSpec", "Request", "capabilities", "count_parameters", "describe", "entries", "load_model", "model_names",
    "register", "unregister",
]
