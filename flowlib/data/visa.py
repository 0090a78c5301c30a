"""VisA (Zou et al., "SPot-the-Difference Self-Supervised Pre-training for Anomaly Detection and
Segmentation", ECCV 2022): 12 objects, read through the official 1-class split file.

The images stay where the archive puts them; the split file ``split_csv/1cls.csv`` (columns
``object,split,label,image,mask``, labels ``normal``/``anomaly``, paths relative to the root)
says which image belongs to which split. VisA masks store one value per defect instance, so any
non-zero pixel counts as defective. Defect names come from ``<object>/image_anno.csv`` when it is
there (e.g. ``"chunk of wax missing"``), else ``"anomaly"``. Images are not square (about
1.5:1); they are resized to ``S x S`` like every other dataset here.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from flowlib.data.base import (
    GOOD,
    AnomalyDataset,
    DatasetNotFoundError,
    Record,
    check_split,
    missing_category_error,
    missing_root_error,
    resolve_root,
)

CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
              "pcb2", "pcb3", "pcb4", "pipe_fryum")
DEFAULT_SUBDIR = "visa"
SPLIT_FILE = "split_csv/1cls.csv"
URL = ("https://github.com/amazon-science/spot-diff (archive: "
       "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar)")

TREE = """\
<root>/                          (e.g. data/visa, the unpacked VisA_20220922.tar)
    split_csv/1cls.csv           object,split,label,image,mask
    candle/
        Data/Images/Normal/0000.JPG ...
        Data/Images/Anomaly/000.JPG ...
        Data/Masks/Anomaly/000.png ...
        image_anno.csv           (optional: defect names)
    capsules/ ... pipe_fryum/"""


def _defect_names(root: Path, category: str) -> dict[str, str]:
    anno = root / category / "image_anno.csv"
    if not anno.is_file():
        return {}
    with anno.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            return {}
        return {row["image"].strip(): row["label"].strip() for row in reader if row.get("label")}


def visa_records(root: Path, category: str, split: str, split_file: str = SPLIT_FILE) -> list[Record]:
    """Records of one VisA object and split, in the order of the split file."""
    check_split(split)
    if not root.is_dir():
        raise missing_root_error("VisA", root, DEFAULT_SUBDIR, TREE, URL)
    csv_path = root / split_file
    if not csv_path.is_file():
        raise DatasetNotFoundError(f"VisA split file '{csv_path}' not found.\nExpected layout:\n{TREE}\n"
                                   f"It ships with the official archive ({URL}).")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing_cols = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or [])
        if missing_cols:
            raise ValueError(f"VisA split file '{csv_path}' lacks column(s) {sorted(missing_cols)}; "
                             f"expected object,split,label,image,mask.")
        rows = list(reader)
    objects = sorted({r["object"].strip() for r in rows})
    if category not in objects or not (root / category).is_dir():
        raise missing_category_error("VisA", root, category, objects or CATEGORIES, TREE)

    names = _defect_names(root, category)
    records = []
    for row in rows:
        if row["object"].strip() != category or row["split"].strip() != split:
            continue
        label_text = row["label"].strip().lower()
        if label_text not in ("normal", "anomaly"):
            raise ValueError(f"VisA split file '{csv_path}': label {row['label']!r} for {row['image']} "
                             f"is neither 'normal' nor 'anomaly'.")
        rel_image = row["image"].strip()
        image = root / rel_image
        if label_text == "normal":
            records.append(Record(image, None, 0, GOOD))
            continue
        rel_mask = (row.get("mask") or "").strip()
        if not rel_mask:
            raise ValueError(f"VisA split file '{csv_path}': anomalous image {rel_image} has no mask entry.")
        records.append(Record(image, root / rel_mask, 1, names.get(rel_image, "anomaly")))

    if not records:
        raise DatasetNotFoundError(f"VisA split file '{csv_path}' lists no '{split}' images "
                                   f"for '{category}'.")
    missing = [p for r in records for p in (r.image, r.mask) if p is not None and not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{len(missing)} file(s) listed in '{csv_path}' are missing, e.g. '{missing[0]}'.\n"
            f"Expected layout:\n{TREE}")
    return records


def load_visa(category: str, split: str, root: str | os.PathLike | None = None,
              image_size: int | Sequence[int] | None = 256) -> AnomalyDataset:
    """One VisA object as an :class:`AnomalyDataset` (official 1-class split)."""
    path = resolve_root(root, DEFAULT_SUBDIR, marker="split_csv")
    records = visa_records(path, category, split)
    return AnomalyDataset(records, category, image_size, name="visa", split=split, root=path)
