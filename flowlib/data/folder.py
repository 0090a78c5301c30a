"""Your own images: a plain folder per category, with or without a test set and masks.

Layout (``<root>`` defaults to ``<data root>/folder``; ``category`` is a subfolder name, or ``None``
to use ``<root>`` itself)::

    <root>/<category>/
        train/                 good images (directly inside, or in train/good/)
        test/                  optional; needed only for split="test"
            good/              good test images
            <defect>/          defective test images, one folder per defect type (any names)
        ground_truth/          optional masks
            <defect>/<image stem>.png  or  <image stem>_mask.png  (any image extension)

Masks are any 8-bit image where non-zero pixels are defective, with the size of their image.
A defective image without a mask gets an all-zero mask and the dataset's ``has_masks`` is
``False``: image-level metrics are fine, pixel-level ones are not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from flowlib.data.base import (
    GOOD,
    AnomalyDataset,
    DatasetNotFoundError,
    Record,
    check_split,
    find_mask,
    list_images,
    missing_category_error,
    missing_root_error,
    resolve_root,
)

DEFAULT_SUBDIR = "folder"

TREE = """\
<root>/<category>/               (e.g. data/folder/my_part)
    train/good/*.png             (or directly train/*.png)
    test/good/*.png              (optional)
    test/<defect>/*.png          (optional, any folder names)
    ground_truth/<defect>/<stem>.png or <stem>_mask.png   (optional)"""

_HOW = "Put your own images in this layout (see data/README.md)."


def category_dir(root: Path, category: str | None) -> Path:
    if not root.is_dir():
        raise missing_root_error("Image folder", root, DEFAULT_SUBDIR, TREE, _HOW)
    if category is None:
        return root
    path = root / category
    if not path.is_dir():
        raise missing_category_error("Image folder", root, category, list_folder_categories(root), TREE)
    return path


def list_folder_categories(root: Path) -> list[str]:
    """Subfolders of ``root`` that have a ``train/`` folder."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())


def folder_records(path: Path, split: str) -> list[Record]:
    """Records of one category folder ``path`` (see the module docstring for the layout)."""
    check_split(split)
    if split == "train":
        folder = path / "train"
        images = list_images(folder) + list_images(folder / GOOD)
        if not images:
            raise DatasetNotFoundError(f"No training images in '{folder}' or '{folder / GOOD}'.\n"
                                       f"Expected layout:\n{TREE}")
        return [Record(p, None, 0, GOOD) for p in images]

    test_dir = path / "test"
    if not test_dir.is_dir():
        raise DatasetNotFoundError(f"No test folder '{test_dir}': split='test' needs test/good/ and/or "
                                   f"test/<defect>/.\nExpected layout:\n{TREE}")
    records = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image in list_images(defect_dir):
            if defect == GOOD:
                records.append(Record(image, None, 0, GOOD))
            else:
                mask = find_mask(path / "ground_truth" / defect, image.stem, suffixes=("", "_mask"))
                records.append(Record(image, mask, 1, defect))
    if not records:
        raise DatasetNotFoundError(f"No test images in '{test_dir}/<type>/'.\nExpected layout:\n{TREE}")
    return records


def load_folder(category: str | None, split: str, root: str | os.PathLike | None = None,
                image_size: int | Sequence[int] | None = 256) -> AnomalyDataset:
    """A plain image folder as an :class:`AnomalyDataset`."""
    base = resolve_root(root, DEFAULT_SUBDIR, marker=category)
    path = category_dir(base, category)
    name = category if category is not None else path.name
    records = folder_records(path, split)
    return AnomalyDataset(records, name, image_size, name="folder", split=split, root=base)
