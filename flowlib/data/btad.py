"""BTAD, the beanTech Anomaly Detection dataset (Mishra et al., "VT-ADL: A Vision Transformer Network
for Image Anomaly Detection and Localization", ISIE 2021): three industrial products ``01``-``03``.

Normal images live in ``ok/`` folders and defective ones in ``test/ko/``. Extensions differ per
product in the original archive (``01`` and ``03`` images are BMP, ``02`` PNG; ``03`` masks are BMP,
the others PNG), so a mask is looked up as ``ground_truth/ko/<image stem>.<any image extension>``.
Normal samples get the defect name ``"good"``, defective ones ``"ko"``.
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

CATEGORIES = ("01", "02", "03")
DEFAULT_SUBDIR = "btad"
URL = "https://avires.dimi.uniud.it/papers/btad/btad.zip (unpacks to BTech_Dataset_transformed/)"

TREE = """\
<root>/                          (e.g. data/btad, the renamed BTech_Dataset_transformed/)
    01/
        train/ok/0000.bmp ...
        test/ok/0000.bmp ...
        test/ko/0000.bmp ...
        ground_truth/ko/0000.png ...   (same stem as the image; .png or .bmp)
    02/ ... 03/"""


def btad_records(root: Path, category: str, split: str) -> list[Record]:
    check_split(split)
    if not root.is_dir():
        raise missing_root_error("BTAD", root, DEFAULT_SUBDIR, TREE, URL)
    cat_dir = root / category
    if not cat_dir.is_dir():
        raise missing_category_error("BTAD", root, category, CATEGORIES, TREE)

    if split == "train":
        folder = cat_dir / "train" / "ok"
        records = [Record(p, None, 0, GOOD) for p in list_images(folder)]
        if not records:
            raise DatasetNotFoundError(f"No training images in '{folder}'.\nExpected layout:\n{TREE}")
        return records

    records = [Record(p, None, 0, GOOD) for p in list_images(cat_dir / "test" / "ok")]
    gt_dir = cat_dir / "ground_truth" / "ko"
    for path in list_images(cat_dir / "test" / "ko"):
        mask = find_mask(gt_dir, path.stem)
        if mask is None:
            raise DatasetNotFoundError(f"Mask '{gt_dir / path.stem}.png' (or .bmp) for defective image "
                                       f"'{path}' is missing.\nExpected layout:\n{TREE}")
        records.append(Record(path, mask, 1, "ko"))
    if not records:
        raise DatasetNotFoundError(f"No test images in '{cat_dir / 'test'}/{{ok,ko}}/'.\n"
                                   f"Expected layout:\n{TREE}")
    return records


def load_btad(category: str, split: str, root: str | os.PathLike | None = None,
              image_size: int | Sequence[int] | None = 256) -> AnomalyDataset:
    """One BTAD product (``"01"``, ``"02"`` or ``"03"``) as an :class:`AnomalyDataset`."""
    path = resolve_root(root, DEFAULT_SUBDIR, marker=category)
    records = btad_records(path, category, split)
    return AnomalyDataset(records, category, image_size, name="btad", split=split, root=path)
