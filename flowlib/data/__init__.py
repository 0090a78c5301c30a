"""Datasets for anomaly detection: MVTec AD, VisA, BTAD, MVTec 3D-AD (RGB), plain folders, and a
built-in offline benchmark made from real photographs (:mod:`flowlib.data.demo`).

Every dataset returns dict samples::

    {"image": (3, S, S) float in [0, 1] RGB, "mask": (1, S, S) float in {0, 1},
     "label": 0 good / 1 defective, "defect": "good" or the defect type,
     "path": str, "category": str, "class_id": int}

Where the data lives and how to get it: ``data/README.md``.

Example::

    >>> from flowlib.data import load_dataset, DEMO_CATEGORIES
    >>> train = load_dataset("demo", DEMO_CATEGORIES[0], "train", image_size=128)
    >>> sample = train[0]
    >>> tuple(sample["image"].shape), sample["label"], sample["defect"]
    ((3, 128, 128), 0, 'good')
"""

from flowlib.data.base import (
    GOOD,
    IMAGE_EXTENSIONS,
    AnomalyDataset,
    DatasetNotFoundError,
    ImageReadError,
    MaskSizeError,
    MultiCategoryDataset,
    Record,
)
from flowlib.data.demo import DEFECT_KINDS, DEMO_CATEGORIES, ensure_demo_data, plot_demo_overview
from flowlib.data.registry import (
    DATASETS,
    dataset_info,
    list_categories,
    load_dataset,
    load_union,
    make_dataloader,
)

__all__ = [
    "DATASETS",
    "DEFECT_KINDS",
    "DEMO_CATEGORIES",
    "GOOD",
    "IMAGE_EXTENSIONS",
    "AnomalyDataset",
    "DatasetNotFoundError",
    "ImageReadError",
    "MaskSizeError",
    "MultiCategoryDataset",
    "Record",
    "dataset_info",
    "ensure_demo_data",
    "list_categories",
    "load_dataset",
    "load_union",
    "make_dataloader",
    "plot_demo_overview",
]
