"""One entry point for every dataset: :func:`load_dataset`, :func:`list_categories`, :func:`load_union`.

Dataset names: ``demo`` (built in), ``mvtec``, ``visa``, ``btad``, ``mvtec3d``, ``folder``.
Each has a default folder under the data root (``$FLOWLIB_DATA``, else ``<repo>/data``):
``demo``, ``mvtec_ad``, ``visa``, ``btad``, ``mvtec_3d``, ``folder``; ``root=`` overrides it.

``union`` is HGAD's 40-class setting: the categories of MVTec AD, BTAD, MVTec 3D-AD and VisA under one
name (no category name occurs in two of them); its root is the folder that holds the four dataset folders.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from flowlib.data import btad, demo, folder, mvtec, mvtec3d, visa
from flowlib.data.base import AnomalyDataset, MultiCategoryDataset, resolve_root


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows about one dataset."""

    title: str
    subdir: str
    categories: tuple[str, ...]
    loader: Callable[..., AnomalyDataset]
    tree: str
    url: str


DATASETS: dict[str, DatasetInfo] = {
    "demo": DatasetInfo("Demo benchmark (built in)", demo.DEFAULT_SUBDIR, demo.DEMO_CATEGORIES,
                        demo.load_demo, demo.TREE, "generated on first use"),
    "mvtec": DatasetInfo("MVTec AD", mvtec.DEFAULT_SUBDIR, mvtec.CATEGORIES, mvtec.load_mvtec, mvtec.TREE,
                         mvtec.URL),
    "visa": DatasetInfo("VisA", visa.DEFAULT_SUBDIR, visa.CATEGORIES, visa.load_visa, visa.TREE, visa.URL),
    "btad": DatasetInfo("BTAD", btad.DEFAULT_SUBDIR, btad.CATEGORIES, btad.load_btad, btad.TREE, btad.URL),
    "mvtec3d": DatasetInfo("MVTec 3D-AD (RGB)", mvtec3d.DEFAULT_SUBDIR, mvtec3d.CATEGORIES,
                           mvtec3d.load_mvtec3d, mvtec3d.TREE, mvtec3d.URL),
    "folder": DatasetInfo("Image folder", folder.DEFAULT_SUBDIR, (), folder.load_folder, folder.TREE,
                          "your own images"),
}

#: The datasets of the ``union`` setting, in HGAD's order.
UNION_DATASETS = ("mvtec", "btad", "mvtec3d", "visa")


def _union_owner(category: str) -> str:
    for name in UNION_DATASETS:
        if category in DATASETS[name].categories:
            return name
    known = [c for n in UNION_DATASETS for c in DATASETS[n].categories]
    raise ValueError(f"Unknown union category {category!r}; use one of {known}.")


def _load_union_category(category: str, split: str, root: str | os.PathLike | None = None,
                         image_size: int | Sequence[int] | None = 256) -> AnomalyDataset:
    """One category of the union: loaded by the dataset that owns it, from ``root/<its folder>``."""
    name = _union_owner(category)
    return DATASETS[name].loader(category, split, root=root, image_size=image_size)


DATASETS["union"] = DatasetInfo(
    "Union of MVTec AD, BTAD, MVTec 3D-AD and VisA (HGAD's 40 classes)", "",
    tuple(c for n in UNION_DATASETS for c in DATASETS[n].categories), _load_union_category,
    "<root>/  the four dataset folders side by side:\n"
    "  mvtec_ad/  btad/  mvtec_3d/  visa/   (each in its own layout, see data/README.md)",
    "the four datasets' own download pages (data/README.md)")

_ALIASES = {"mvtec_ad": "mvtec", "mvtecad": "mvtec", "mvtec_3d": "mvtec3d", "mvtec-3d": "mvtec3d",
            "mvtec3d_ad": "mvtec3d", "btech": "btad"}


def dataset_info(name: str) -> DatasetInfo:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; use one of {sorted(DATASETS)}.")
    return DATASETS[key]


def canonical_name(name: str) -> str:
    """``"mvtec_ad"`` -> ``"mvtec"`` etc.; raises for unknown names."""
    info = dataset_info(name)
    return next(k for k, v in DATASETS.items() if v is info)


def load_dataset(name: str, category: str | None, split: str, root: str | os.PathLike | None = None,
                 image_size: int | Sequence[int] | None = 256) -> AnomalyDataset:
    """One category of one dataset as an :class:`~flowlib.data.base.AnomalyDataset`.

    Args:
        name: ``demo``, ``mvtec``, ``visa``, ``btad``, ``mvtec3d`` or ``folder``.
        category: e.g. ``"bottle"``; for ``folder`` a subfolder name, or ``None`` for ``root`` itself.
        split: ``"train"`` (good images only) or ``"test"`` (``mvtec3d`` also has ``"validation"``).
        root: the dataset's folder (or the folder holding it); default ``<data root>/<subdir>``.
        image_size: side ``S`` of the square output, ``(H, W)``, or ``None`` for the file size.

    Returns:
        A dataset of dicts ``{"image": (3, S, S), "mask": (1, S, S), "label", "defect", "path",
        "category", "class_id"}``. ``"demo"`` generates its images on first use.

    Example::

        >>> ds = load_dataset("demo", "gravel", "test", image_size=64)
        >>> sum(ds.labels), len(ds) - sum(ds.labels)
        (40, 20)
    """
    info = dataset_info(name)
    if category is None and info is not DATASETS["folder"]:
        raise ValueError(f"{info.title} needs a category; use one of {info.categories}.")
    return info.loader(category, split, root=root, image_size=image_size)


def list_categories(name: str, root: str | os.PathLike | None = None,
                    present_only: bool = False) -> list[str]:
    """The categories of a dataset: the official list, or with ``present_only`` those found on disk.

    ``folder`` always lists the subfolders of its root that contain ``train/``.
    """
    info = dataset_info(name)
    if info is DATASETS["union"]:
        return [c for n in UNION_DATASETS for c in list_categories(n, root, present_only)]
    if info is DATASETS["folder"]:
        return folder.list_folder_categories(resolve_root(root, info.subdir))
    if info is DATASETS["demo"] and present_only:
        return [c for c in info.categories if (demo.demo_root(root) / c).is_dir()]
    if not present_only:
        return list(info.categories)
    if info is DATASETS["visa"]:
        path = resolve_root(root, info.subdir, marker="split_csv")
    else:
        path = resolve_root(root, info.subdir, marker=info.categories[0])
    return [c for c in info.categories if (path / c).is_dir()]


Source = str | tuple[str, str | None]


def parse_sources(sources: str | Sequence[Source]) -> list[tuple[str, str | None]]:
    """``"mvtec,btad:01"`` or ``["mvtec", ("btad", "01")]`` -> ``[("mvtec", None), ("btad", "01")]``."""
    if isinstance(sources, str):
        sources = [s for s in sources.split(",") if s.strip()]
    out = []
    for src in sources:
        if isinstance(src, str):
            name, _, category = src.strip().partition(":")
            out.append((canonical_name(name), category or None))
        else:
            name, category = src
            out.append((canonical_name(name), category))
    if not out:
        raise ValueError("No dataset sources given.")
    return out


def load_union(sources: str | Sequence[Source], split: str,
               roots: Mapping[str, str | os.PathLike] | None = None,
               image_size: int | Sequence[int] | None = 256) -> MultiCategoryDataset:
    """Several categories (of one or several datasets) as one :class:`MultiCategoryDataset`.

    This is the training and test set of a unified model (HGAD trains one model on all MVTec AD
    classes, or on MVTec AD + BTAD + MVTec 3D-AD + VisA). ``class_id`` follows the order of the
    sources, whole datasets expanded in their official category order.

    Args:
        sources: dataset names, optionally ``name:category``: ``"mvtec"`` (all 15 classes),
            ``"mvtec,btad,mvtec3d,visa"``, ``["demo:brick", "demo:coffee"]`` or ``[("btad", "01")]``.
        split: ``"train"`` or ``"test"``.
        roots: optional folder per dataset name, e.g. ``{"mvtec": "/data/mvtec_anomaly_detection"}``.
        image_size: as in :func:`load_dataset`.

    Example::

        >>> union = load_union("demo", "train", image_size=32)
        >>> union.categories, len(union)
        (['brick', 'grass', 'gravel', 'coffee'], 240)
    """
    roots = {canonical_name(k): v for k, v in (roots or {}).items()}
    datasets = []
    for name, category in parse_sources(sources):
        root = roots.get(name)
        categories = [category] if category is not None else list_categories(name, root)
        if not categories:
            raise ValueError(f"No categories found for dataset {name!r} (root={root}).")
        datasets += [load_dataset(name, c, split, root=root, image_size=image_size) for c in categories]
    return MultiCategoryDataset(datasets)


def make_dataloader(dataset: Dataset, batch_size: int = 16, shuffle: bool = False, seed: int = 0,
                    num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A ``DataLoader`` over sample dicts with a seeded shuffle (same order for the same seed).

    Batches are dicts: ``image`` ``(B, 3, S, S)``, ``mask`` ``(B, 1, S, S)``, ``label`` and ``class_id``
    ``(B,)`` int64 tensors, ``defect``/``path``/``category`` lists of strings.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      drop_last=drop_last, generator=generator, persistent_workers=False)
