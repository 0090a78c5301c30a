"""What every dataset shares: the sample format, image/mask reading, and clear errors.

Every dataset in :mod:`flowlib.data` is an :class:`AnomalyDataset`: a list of :class:`Record`
(image path, optional mask path, label, defect name) plus the code that turns one record into a
sample dict::

    {"image": (3, S, S) float32 in [0, 1], RGB,
     "mask": (1, S, S) float32 in {0, 1} (all zeros for good images),
     "label": 0 (good) or 1 (defective), "defect": "good" or the defect type,
     "path": image file, "category": category name, "class_id": int}

Images are resized with PIL's antialiased bilinear filter, masks with nearest neighbour, so a mask
stays binary. Grayscale, palette, 16-bit and RGBA files are all converted to 8-bit RGB (MVTec AD's
grid, screw and zipper are grayscale).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, Dataset

from flowlib.config import data_root

#: File suffixes read as images (compared in lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: Defect name of every normal sample, whatever the dataset calls its normal folder.
GOOD = "good"

SPLITS = ("train", "test")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset root, category folder, split file or listed image is missing."""


class ImageReadError(OSError):
    """An image or mask file exists but cannot be decoded."""


class MaskSizeError(ValueError):
    """A ground-truth mask does not have the size of its image."""


@dataclass(frozen=True)
class Record:
    """One sample on disk. ``mask`` is ``None`` for good images (and for unannotated defects)."""

    image: Path
    mask: Path | None
    label: int
    defect: str


def check_split(split: str, allowed: Sequence[str] = SPLITS) -> str:
    if split not in allowed:
        raise ValueError(f"split={split!r} is not valid here; use one of {tuple(allowed)}.")
    return split


def resolve_root(root: str | os.PathLike | None, subdir: str, marker: str | None = None) -> Path:
    """The folder that holds one dataset.

    ``root`` given: that folder. Also accepted is its parent (the folder holding ``subdir``) when
    ``root/marker`` is missing but ``root/subdir/marker`` exists, so ``--root data`` works too.
    ``root`` omitted: ``<data root>/<subdir>``, where the data root is ``$FLOWLIB_DATA`` or
    ``<repo>/data`` (:func:`flowlib.config.data_root`).
    """
    if root is None:
        return data_root() / subdir
    path = Path(root).expanduser()
    if marker and not (path / marker).exists() and (path / subdir / marker).exists():
        return path / subdir
    return path


def how_to_point(subdir: str) -> str:
    return (f"Pass root=<folder> (--root on the command line), or set FLOWLIB_DATA to the folder that "
            f"holds '{subdir}/'. Download links and layouts: data/README.md.")


def missing_root_error(title: str, root: Path, subdir: str, tree: str, url: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{title} not found: '{root}' does not exist.\n"
        f"Expected layout:\n{tree}\n"
        f"Download: {url}\n{how_to_point(subdir)}"
    )


def missing_category_error(title: str, root: Path, category: str, known: Sequence[str],
                           tree: str) -> DatasetNotFoundError:
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return DatasetNotFoundError(
        f"{title} category '{category}' not found: '{root / category}' does not exist.\n"
        f"Known categories: {', '.join(known) if known else '(any folder name)'}\n"
        f"Folders present in '{root}': {', '.join(present) if present else '(none)'}\n"
        f"Expected layout:\n{tree}"
    )


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def defect_folder_records(folders: Iterable[tuple[str, Path]], mask_of: Callable[[str, Path], Path],
                          tree: str) -> list[Record]:
    """Records of test images sorted into one folder per defect type, as MVTec AD and its kin keep them.

    Args:
        folders: ``(defect name, folder holding its images)`` pairs, in the order wanted; the defect
            ``"good"`` holds the normal images.
        mask_of: ``(defect, image path) -> mask path`` that a defective image must have.
        tree: the expected layout, quoted when a mask is missing.

    Returns:
        Good images as label 0 without a mask, the others as label 1 with theirs; images sorted by
        name within a folder.
    """
    records = []
    for defect, folder in folders:
        for path in list_images(folder):
            if defect == GOOD:
                records.append(Record(path, None, 0, GOOD))
                continue
            mask = mask_of(defect, path)
            if not mask.is_file():
                raise DatasetNotFoundError(f"Mask '{mask}' for defective image '{path}' is missing.\n"
                                           f"Expected layout:\n{tree}")
            records.append(Record(path, mask, 1, defect))
    return records


def find_mask(folder: Path, stem: str, suffixes: Sequence[str] = ("", "_mask")) -> Path | None:
    """The mask ``<folder>/<stem><suffix>.<any image extension>``, or ``None`` if there is none."""
    for suffix in suffixes:
        for ext in IMAGE_EXTENSIONS:
            for candidate in (folder / f"{stem}{suffix}{ext}", folder / f"{stem}{suffix}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def open_image(path: Path) -> Image.Image:
    """Decode an image file fully, turning decoder failures into an error that names the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError as err:
        raise DatasetNotFoundError(f"Image file '{path}' does not exist.") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"Cannot read image file '{path}' ({err}). The file is corrupt or not an "
                             f"image; re-download the dataset or delete this file.") from err


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode (gray, palette, RGBA, 16-bit gray)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # PIL's own I;16 -> RGB conversion clips at 255 instead of rescaling
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def size_tuple(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``(height, width)`` from an int (square) or a pair; ``None`` keeps the file's size."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        sizes = (image_size, image_size)
    else:
        sizes = tuple(int(s) for s in image_size)
    if len(sizes) != 2 or min(sizes) < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive int or (height, width).")
    return sizes[0], sizes[1]


def load_image_tensor(path: Path, size: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image ``(3, H, W)`` float32 in [0, 1] and the file's own size ``(width, height)``."""
    img = open_image(path)
    file_size = img.size
    img = to_rgb(img)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)  # PIL filters are antialiased
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), file_size


def load_mask_tensor(path: Path, size: tuple[int, int] | None, image_path: Path,
                     image_size: tuple[int, int]) -> torch.Tensor:
    """Binary mask ``(1, H, W)`` float32; any non-zero pixel is defective (VisA stores instance ids)."""
    img = open_image(path)
    if img.size != image_size:
        raise MaskSizeError(
            f"Mask '{path}' is {img.size[0]}x{img.size[1]} pixels but its image '{image_path}' is "
            f"{image_size[0]}x{image_size[1]}. A mask must have the size of its image; check that the "
            f"two files belong together.")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.NEAREST)
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1)  # colour masks: any channel; ignore an alpha channel
    return torch.from_numpy((arr > 0).astype(np.float32))[None]


class AnomalyDataset(Dataset):
    """A list of :class:`Record` read lazily into sample dicts (see the module docstring).

    Args:
        records: the samples, in a fixed order.
        category: category name written into every sample.
        image_size: output side ``S`` (int), ``(H, W)``, or ``None`` to keep each file's size.
        class_id: written into every sample (:class:`MultiCategoryDataset` overrides it).
        name: dataset name (``"mvtec"``, ``"demo"``, ...), split: ``"train"`` or ``"test"``.
        root: the dataset folder the records came from.

    ``has_masks`` is ``False`` when some defective sample has no mask file (a plain folder without
    ``ground_truth/``): its mask is all zeros then, and pixel-level metrics are meaningless.
    """

    def __init__(self, records: Sequence[Record], category: str, image_size: int | Sequence[int] | None = 256,
                 class_id: int = 0, name: str = "", split: str = "", root: Path | None = None):
        self.records = list(records)
        self.category = category
        self.size = size_tuple(image_size)
        self.class_id = int(class_id)
        self.name = name
        self.split = split
        self.root = root
        self.has_masks = all(r.mask is not None for r in self.records if r.label == 1)

    @property
    def image_size(self) -> tuple[int, int] | None:
        return self.size

    @property
    def categories(self) -> list[str]:
        return [self.category]

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    @property
    def defects(self) -> list[str]:
        return [r.defect for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image, file_size = load_image_tensor(rec.image, self.size)
        if rec.mask is None:
            mask = torch.zeros(1, image.shape[1], image.shape[2])
        else:
            mask = load_mask_tensor(rec.mask, self.size, rec.image, file_size)
        return {"image": image, "mask": mask, "label": rec.label, "defect": rec.defect,
                "path": str(rec.image), "category": self.category, "class_id": self.class_id}

    def __repr__(self) -> str:
        n_bad = sum(self.labels)
        return (f"{type(self).__name__}(name={self.name!r}, category={self.category!r}, "
                f"split={self.split!r}, n={len(self)}, good={len(self) - n_bad}, defective={n_bad}, "
                f"image_size={self.size})")


class MultiCategoryDataset(ConcatDataset):
    """Several datasets in one, with ``class_id`` = position of the source dataset in the list.

    This is the training set of a unified (one-model-for-all-classes) method such as HGAD, and the
    matching test set: ``sample["class_id"]`` says which category an image came from.

    Attributes:
        categories: one name per source dataset (``class_id`` indexes it). Names are qualified as
            ``"<dataset>/<category>"`` only when two sources share a category name.
        datasets: the source datasets.
    """

    def __init__(self, datasets: Sequence[AnomalyDataset]):
        datasets = list(datasets)
        if not datasets:
            raise ValueError("MultiCategoryDataset needs at least one dataset.")
        super().__init__(datasets)
        names = [getattr(d, "category", str(i)) for i, d in enumerate(datasets)]
        if len(set(names)) != len(names):
            names = [f"{getattr(d, 'name', '') or i}/{n}"
                     for i, (d, n) in enumerate(zip(datasets, names, strict=True))]
        if len(set(names)) != len(names):
            raise ValueError(f"Two source datasets have the same name: {names}.")
        self.categories = names
        self.has_masks = all(getattr(d, "has_masks", True) for d in datasets)

    @property
    def labels(self) -> list[int]:
        return [label for d in self.datasets for label in d.labels]

    @property
    def class_ids(self) -> list[int]:
        return [i for i, d in enumerate(self.datasets) for _ in range(len(d))]

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        source = int(np.searchsorted(self.cumulative_sizes, index, side="right"))
        start = self.cumulative_sizes[source - 1] if source > 0 else 0
        sample = dict(self.datasets[source][index - start])
        sample["class_id"] = source
        return sample

    def __repr__(self) -> str:
        return f"MultiCategoryDataset(n={len(self)}, categories={self.categories})"
