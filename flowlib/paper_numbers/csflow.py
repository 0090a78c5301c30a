"""Published CS-Flow numbers on MVTec AD (fractions; 98.7 % is stored as 0.987).

Sources:

* the seed table: anomalib's CS-Flow README (openvinotoolkit/anomalib,
  ``src/anomalib/models/image/csflow/README.md``, commit 161bb36), EfficientNet-B5, seed 42, at 768 and
  256 px. Its anomaly maps are the **product of the three upsampled per-scale maps** (not the paper's
  largest-scale map), its pixel/image F1 use an adaptive threshold, and its training stops early on
  pixel AUROC measured on the test set;
* the paper's image AUROC per category (Rudolph et al., WACV 2022, arXiv:2110.02855, Table 1), as quoted
  in the PatchFlow README's "CS-Flow" column; its mean 98.7 is the figure other papers cite. The paper
  reports no localisation numbers.
"""

from __future__ import annotations

from flowlib.results import PaperTable

_ANOMALIB = "anomalib CS-Flow README (openvinotoolkit/anomalib, commit 161bb36), seed 42"
_PAPER = "Rudolph et al., WACV 2022 (arXiv:2110.02855), Table 1, as quoted in the PatchFlow README"

#: The 15 MVTec AD categories in the order of the seed table's columns.
CATEGORIES = ("carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut",
              "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper")


def _row(mean: float, *values: float) -> dict[str, float]:
    if len(values) != len(CATEGORIES):
        raise ValueError(f"expected {len(CATEGORIES)} values, got {len(values)}")
    return {**dict(zip(CATEGORIES, values)), "mean": mean}


# --- anomalib, 768 px ------------------------------------------------------------------------------------
IMAGE_AUROC_768 = PaperTable(
    method="csflow", dataset="mvtec", metric="image_auroc", setting="anomalib, EfficientNet-B5, 768 px",
    source=_ANOMALIB,
    values=_row(0.987, 1, 0.989, 1, 0.998, 0.998, 1, 0.996, 0.981, 0.994, 1, 0.98, 0.95, 0.919, 1, 0.999))
PIXEL_AUROC_768 = PaperTable(
    method="csflow", dataset="mvtec", metric="pixel_auroc", setting="anomalib, EfficientNet-B5, 768 px",
    source=_ANOMALIB,
    values=_row(0.921, 0.936, 0.878, 0.917, 0.872, 0.782, 0.889, 0.935, 0.961, 0.957, 0.953, 0.95, 0.947,
                0.951, 0.974, 0.919))
PIXEL_F1_768 = PaperTable(
    method="csflow", dataset="mvtec", metric="pixel_f1", setting="anomalib, EfficientNet-B5, 768 px",
    source=_ANOMALIB,
    values=_row(0.33, 0.219, 0.104, 0.144, 0.41, 0.211, 0.357, 0.375, 0.333, 0.375, 0.689, 0.458, 0.094,
                0.342, 0.597, 0.238))
IMAGE_F1_768 = PaperTable(
    method="csflow", dataset="mvtec", metric="image_f1", setting="anomalib, EfficientNet-B5, 768 px",
    source=_ANOMALIB,
    values=_row(0.985, 1, 0.991, 1, 0.988, 0.992, 1, 0.973, 0.977, 0.979, 0.995, 0.975, 0.975, 0.952,
                0.988, 0.996))

# --- anomalib, 256 px ------------------------------------------------------------------------------------
IMAGE_AUROC_256 = PaperTable(
    method="csflow", dataset="mvtec", metric="image_auroc", setting="anomalib, EfficientNet-B5, 256 px",
    source=_ANOMALIB,
    values=_row(0.972, 0.995, 0.982, 1, 0.972, 0.988, 1, 0.97, 0.907, 0.995, 0.972, 0.953, 0.896, 0.969,
                0.987, 0.987))
PIXEL_AUROC_256 = PaperTable(
    method="csflow", dataset="mvtec", metric="pixel_auroc", setting="anomalib, EfficientNet-B5, 256 px",
    source=_ANOMALIB,
    values=_row(0.845, 0.847, 0.746, 0.851, 0.775, 0.677, 0.853, 0.863, 0.882, 0.895, 0.932, 0.92, 0.779,
                0.892, 0.96, 0.803))
PIXEL_F1_256 = PaperTable(
    method="csflow", dataset="mvtec", metric="pixel_f1", setting="anomalib, EfficientNet-B5, 256 px",
    source=_ANOMALIB,
    values=_row(0.231, 0.108, 0.069, 0.048, 0.306, 0.127, 0.303, 0.21, 0.165, 0.215, 0.659, 0.412, 0.017,
                0.214, 0.513, 0.106))
IMAGE_F1_256 = PaperTable(
    method="csflow", dataset="mvtec", metric="image_f1", setting="anomalib, EfficientNet-B5, 256 px",
    source=_ANOMALIB,
    values=_row(0.965, 0.983, 0.982, 1, 0.957, 0.966, 1, 0.945, 0.944, 0.986, 0.963, 0.965, 0.906, 0.949,
                0.938, 0.987))

# --- the paper, 768 px -----------------------------------------------------------------------------------
PAPER_IMAGE_AUROC = PaperTable(
    method="csflow", dataset="mvtec", metric="image_auroc", setting="paper, EfficientNet-B5, 768 px",
    source=_PAPER,
    values=_row(0.987, 1.0, 0.990, 1.0, 1.0, 1.0, 0.998, 0.991, 0.971, 0.996, 0.991, 0.986, 0.976, 0.919,
                0.993, 0.997))

#: Tables at 768 px (the ``paper`` preset) and 256 px (the ``paper-256`` preset), by metric.
TABLES_768 = [IMAGE_AUROC_768, PIXEL_AUROC_768, PIXEL_F1_768, IMAGE_F1_768]
TABLES_256 = [IMAGE_AUROC_256, PIXEL_AUROC_256, PIXEL_F1_256, IMAGE_F1_256]
TABLES = [PAPER_IMAGE_AUROC, *TABLES_768, *TABLES_256]
