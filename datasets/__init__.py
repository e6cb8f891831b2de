"""Data layer: a registry of datasets, their readers, paper-exact few-shot and percentage splits,
preparation from raw downloads and a synthetic demo dataset.

One module per dataset kind (its reader, its ``prepare`` from the raw download, its settings and its
registration), imported below one line each; shared records, the registry and helpers live in modules
that import no kind. This package shadows Hugging Face's ``datasets`` on purpose; nothing here needs that
one. Importing it loads neither torch, numpy nor PIL.
"""

# The dataset kinds, one line each, in the order --dataset lists them (each registers itself on import;
# the order is the registry's, so the import sorter must leave these lines alone).
# isort: off
from datasets import paper  # noqa: F401  mlcc, bcfc, sipakmed
from datasets import hicervix  # noqa: F401
from datasets import apacc  # noqa: F401
from datasets import bloodmnist  # noqa: F401
from datasets import bmcd  # noqa: F401
from datasets import bmt  # noqa: F401
from datasets import fnac2019  # noqa: F401
from datasets import folder  # noqa: F401
from datasets import tabular  # noqa: F401  csv
from datasets import demo  # noqa: F401  demo, demo_captions
# isort: on
from datasets.demo import demo_root
from datasets.errors import DatasetError
from datasets.hicervix import HICERVIX_LEVELS, hicervix_tree, hierarchical_distance
from datasets.images import load_image
from datasets.labelmap import parse_label_map
from datasets.layouts import SPLITS
from datasets.registry import (
    DatasetInfo,
    class_prompts,
    dataset_names,
    dataset_task,
    get_dataset,
    register,
    resolve_level,
    resolve_level_fallback,
    resolve_protocol,
    unregister,
)
from datasets.split import Split, list_dataset, load_split


def __getattr__(name: str):
    # DATASET_NAMES follows the registry, datasets registered later included
    if name == "DATASET_NAMES":
        return dataset_names()
    raise AttributeError(f"module 'datasets' has no attribute '{name}'")


__all__ = [
    "DATASET_NAMES",
    "HICERVIX_LEVELS",
    "SPLITS",
    "DatasetError",
    "DatasetInfo",
    "Split",
    "class_prompts",
    "dataset_names",
    "dataset_task",
    "demo_root",
    "get_dataset",
    "hicervix_tree",
    "hierarchical_distance",
    "list_dataset",
    "load_image",
    "load_split",
    "parse_label_map",
    "register",
    "resolve_level",
    "resolve_level_fallback",
    "resolve_protocol",
    "unregister",
]
