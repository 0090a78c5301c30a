"""MVTec 3D-AD (Bergmann et al., "The MVTec 3D-AD Dataset for Unsupervised 3D Anomaly Detection and
Localization", VISAPP 2022), RGB images and masks only (the ``xyz/`` point clouds are ignored).

Ten categories. Every sample folder holds ``rgb/`` (and ``xyz/``); test folders also hold ``gt/``
with a mask of the same file name. Besides ``train`` and ``test`` there is a ``validation`` split
of good images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from flowlib.data.base import (
    AnomalyDataset,
    DatasetNotFoundError,
    Record,
    check_split,
    defect_folder_records,
    missing_category_error,
    missing_root_error,
    resolve_root,
)

CATEGORIES = ("bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire")
DEFAULT_SUBDIR = "mvtec_3d"
SPLITS = ("train", "validation", "test")
URL = "https://www.mvtec.com/company/research/datasets/mvtec-3d-ad"

TREE = """\
<root>/                          (e.g. data/mvtec_3d)
    bagel/
        train/good/rgb/000.png ...           (xyz/ is not used)
        validation/good/rgb/000.png ...
        test/good/rgb/000.png ...
        test/crack/rgb/000.png ...           (one folder per defect type)
        test/crack/gt/000.png ...
    cable_gland/ ... tire/"""


def mvtec3d_records(root: Path, category: str, split: str) -> list[Record]:
    check_split(split, SPLITS)
    if not root.is_dir():
        raise missing_root_error("MVTec 3D-AD", root, DEFAULT_SUBDIR, TREE, URL)
    cat_dir = root / category
    if not cat_dir.is_dir():
        raise missing_category_error("MVTec 3D-AD", root, category, CATEGORIES, TREE)

    split_dir = cat_dir / split
    defect_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() else []
    records = defect_folder_records(((d.name, d / "rgb") for d in defect_dirs),
                                    lambda defect, path: split_dir / defect / "gt" / path.name, TREE)
    if not records:
        raise DatasetNotFoundError(f"No images in '{split_dir}/<type>/rgb/'.\nExpected layout:\n{TREE}")
    return records


def load_mvtec3d(category: str, split: str, root: str | os.PathLike | None = None,
                 image_size: int | Sequence[int] | None = 256) -> AnomalyDataset:
    """One MVTec 3D-AD category (RGB only); ``split`` = ``"train"``, ``"validation"`` or ``"test"``."""
    path = resolve_root(root, DEFAULT_SUBDIR, marker=category)
    records = mvtec3d_records(path, category, split)
    return AnomalyDataset(records, category, image_size, name="mvtec3d", split=split, root=path)
