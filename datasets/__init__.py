"""Data layer: readers for the cytology datasets, paper-exact few-shot and percentage splits,
preparation from raw downloads and a synthetic demo dataset.

This package shadows Hugging Face's ``datasets`` on purpose; nothing here needs that one.
Importing it loads neither torch, numpy nor PIL.
"""

from datasets.demo import demo_root
from datasets.errors import DatasetError
from datasets.images import load_image
from datasets.layouts import DATASET_NAMES, HICERVIX_LEVELS, SPLITS
from datasets.split import Split, list_dataset, load_split

__all__ = [
    "DATASET_NAMES",
    "HICERVIX_LEVELS",
    "SPLITS",
    "DatasetError",
    "Split",
    "demo_root",
    "list_dataset",
    "load_image",
    "load_split",
]
