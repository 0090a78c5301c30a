"""MVTec AD (Bergmann et al., "MVTec AD - A Comprehensive Real-World Dataset for Unsupervised Anomaly
Detection", CVPR 2019): 15 categories, defect-free training images, pixel masks for every defect.

The same folder layout is used by the built-in demo benchmark (:mod:`flowlib.data.demo`).

Example::

    >>> from flowlib.data import load_dataset
    >>> test = load_dataset("mvtec", "bottle", "test", image_size=256)   # doctest: +SKIP
    >>> test[0]["image"].shape, test[0]["mask"].shape                     # doctest: +SKIP
    (torch.Size([3, 256, 256]), torch.Size([1, 256, 256]))
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
    defect_folder_records,
    list_images,
    missing_category_error,
    missing_root_error,
    resolve_root,
)

CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
              "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
DEFAULT_SUBDIR = "mvtec_ad"
URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

TREE = """\
<root>/                          (e.g. data/mvtec_ad)
    bottle/
        train/good/000.png ...
        test/good/000.png ...
        test/broken_large/000.png ...          (one folder per defect type)
        ground_truth/broken_large/000_mask.png ...
    cable/ ... zipper/"""


def mvtec_layout_records(root: Path, category: str, split: str, title: str = "MVTec AD",
                         known: Sequence[str] = CATEGORIES, tree: str = TREE, url: str = URL,
                         subdir: str = DEFAULT_SUBDIR) -> list[Record]:
    """Records of ``<root>/<category>/{train,test}`` in the MVTec AD layout.

    Test order: defect folders alphabetically, files by name inside each. A defective image
    ``test/<defect>/<name>.png`` must have ``ground_truth/<defect>/<name>_mask.png``.
    """
    check_split(split)
    if not root.is_dir():
        raise missing_root_error(title, root, subdir, tree, url)
    cat_dir = root / category
    if not cat_dir.is_dir():
        raise missing_category_error(title, root, category, known, tree)

    if split == "train":
        folder = cat_dir / "train" / GOOD
        records = [Record(p, None, 0, GOOD) for p in list_images(folder)]
        if not records:
            raise DatasetNotFoundError(f"No training images in '{folder}'.\nExpected layout:\n{tree}")
        return records

    test_dir = cat_dir / "test"
    defect_dirs = sorted(p for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    gt_dir = cat_dir / "ground_truth"
    records = defect_folder_records(((d.name, d) for d in defect_dirs),
                                    lambda defect, path: gt_dir / defect / f"{path.stem}_mask.png", tree)
    if not records:
        raise DatasetNotFoundError(f"No test images in '{test_dir}/<type>/'.\nExpected layout:\n{tree}")
    return records


def load_mvtec(category: str, split: str, root: str | os.PathLike | None = None,
               image_size: int | Sequence[int] | None = 256) -> AnomalyDataset:
    """One MVTec AD category as an :class:`AnomalyDataset` (``split`` = ``"train"`` or ``"test"``)."""
    path = resolve_root(root, DEFAULT_SUBDIR, marker=category)
    records = mvtec_layout_records(path, category, split)
    return AnomalyDataset(records, category, image_size, name="mvtec", split=split, root=path)
