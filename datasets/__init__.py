"""Data layer: a registry of datasets, their readers, paper-exact few-shot and percentage splits,
preparation from raw downloads and a synthetic demo dataset.

This package shadows Hugging Face's ``datasets`` on purpose; nothing here needs that one.
Importing it loads neither torch, numpy nor PIL.
"""

from datasets import catalog  # noqa: F401  (registers the built-in datasets)
from datasets.demo import demo_root
from datasets.errors import DatasetError
from datasets.hicervix import hicervix_tree, hierarchical_distance
from datasets.images import load_image
from datasets.labelmap import parse_label_map
from datasets.layouts import HICERVIX_LEVELS, SPLITS
from datasets.registry import (
    DatasetInfo,
    class_prompts,
    dataset_names,
    get_dataset,
    register,
    resolve_level,
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
    "unregister",
]
