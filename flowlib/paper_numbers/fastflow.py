"""Published FastFlow numbers on MVTec AD (fractions; 99.4 % is stored as 0.994).

Sources:

* the paper (Yu et al., arXiv:2111.07677), CaiT-M48 backbone at 448 px: per-category image and pixel
  AUROC as quoted in the README of ``RistoranteRist/FastFlow`` (its means equal the abstract's 99.4 %
  image AUROC and the 98.5 % pixel AUROC that ``gathierry/FastFlow`` lists as "Paper CaiT");
* the paper's pixel-AUROC mean for each backbone, as listed in the README of ``gathierry/FastFlow``
  (commit ``2cf1f2f``);
* two open re-implementations, kept apart in :data:`REIMPLEMENTATIONS` (their labels say so):
  ``gathierry/FastFlow`` pixel AUROC at the last (500th) and at the best test epoch, and anomalib's
  (``openvinotoolkit/anomalib`` README, commit ``161bb36``, seed 0, early stopping with patience 3).

anomalib's image AUROC (94.4 % with CaiT) stays well below the paper's 99.4 %; gathierry/FastFlow
reports pixel AUROC only.
"""

from __future__ import annotations

from flowlib.results import PaperTable

CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
              "screw", "tile", "toothbrush", "transistor", "wood", "zipper")

_PAPER = "FastFlow paper (arXiv:2111.07677), per category as quoted in the RistoranteRist/FastFlow README"
_PAPER_MEANS = "FastFlow paper (arXiv:2111.07677), 'Paper' row of the gathierry/FastFlow README (2cf1f2f)"
_GATH = "gathierry/FastFlow README (commit 2cf1f2f), re-implementation"
_ALIB = "openvinotoolkit/anomalib FastFlow README (commit 161bb36), re-implementation"


def _row(values: tuple[float, ...], mean: float | None = None, scale: float = 100.0) -> dict[str, float]:
    out = {c: round(v / scale, 6) for c, v in zip(CATEGORIES, values, strict=True)}
    if mean is not None:
        out["mean"] = round(mean / scale, 6)
    return out


MVTEC_CAIT_IMAGE = PaperTable(
    method="fastflow", dataset="mvtec", metric="image_auroc", setting="CaiT-M48, 448 px", source=_PAPER,
    values=_row((100, 100, 100, 100, 99.7, 100, 100, 100, 99.4, 97.8, 100, 94.4, 99.8, 100, 99.5), 99.4),
)

MVTEC_CAIT_PIXEL = PaperTable(
    method="fastflow", dataset="mvtec", metric="pixel_auroc", setting="CaiT-M48, 448 px", source=_PAPER,
    values=_row((97.7, 98.4, 99.1, 99.4, 98.3, 99.1, 99.5, 98.5, 99.2, 99.4, 96.3, 98.9, 97.3, 97.0, 98.7),
                98.5),
)

#: the paper's mean pixel AUROC per backbone (no per-category values are public for these)
MVTEC_PIXEL_MEANS = [
    PaperTable(method="fastflow", dataset="mvtec", metric="pixel_auroc", setting=setting,
               source=_PAPER_MEANS, values={"mean": mean})
    for setting, mean in (("ResNet-18, 256 px", 0.972), ("WRN50, 256 px", 0.981),
                          ("DeiT-B distilled, 384 px", 0.981), ("CaiT-M48, 448 px", 0.985))
]

TABLES = [MVTEC_CAIT_IMAGE, MVTEC_CAIT_PIXEL, *MVTEC_PIXEL_MEANS]

# gathierry/FastFlow, pixel AUROC per category: (last epoch, best test epoch) for each backbone
_GATH_PIXEL = {
    "WRN50": ((0.987, 0.989), (0.950, 0.978), (0.987, 0.989), (0.988, 0.989), (0.991, 0.993),
              (0.957, 0.984), (0.995, 0.996), (0.968, 0.986), (0.968, 0.977), (0.969, 0.987),
              (0.955, 0.971), (0.985, 0.986), (0.956, 0.975), (0.948, 0.964), (0.980, 0.987),
              (0.972, 0.983)),
    "ResNet-18": ((0.975, 0.979), (0.942, 0.962), (0.979, 0.985), (0.986, 0.986), (0.973, 0.985),
                  (0.922, 0.963), (0.991, 0.996), (0.950, 0.966), (0.955, 0.968), (0.952, 0.957),
                  (0.916, 0.951), (0.967, 0.978), (0.970, 0.975), (0.894, 0.954), (0.969, 0.979),
                  (0.956, 0.972)),
    "DeiT": ((0.931, 0.959), (0.976, 0.979), (0.982, 0.988), (0.991, 0.994), (0.965, 0.980),
             (0.982, 0.990), (0.991, 0.994), (0.980, 0.988), (0.977, 0.989), (0.990, 0.990),
             (0.966, 0.966), (0.983, 0.988), (0.959, 0.970), (0.960, 0.963), (0.966, 0.974),
             (0.973, 0.981)),
    "CaiT": ((0.926, 0.976), (0.975, 0.981), (0.987, 0.990), (0.981, 0.993), (0.968, 0.970),
             (0.981, 0.992), (0.994, 0.996), (0.977, 0.984), (0.984, 0.990), (0.991, 0.993),
             (0.946, 0.972), (0.989, 0.992), (0.967, 0.969), (0.950, 0.959), (0.972, 0.984),
             (0.973, 0.983)),
}

# anomalib, per category then the average: image AUROC and pixel AUROC for R18 / WRN50 / DeiT / CaiT
_ALIB_IMAGE = {
    "ResNet-18": (1.000, 0.891, 0.900, 0.979, 0.988, 0.846, 1.000, 0.963, 0.916, 0.521, 0.967, 0.844, 0.938,
                  0.978, 0.878, 0.907),
    "WRN50": (1.000, 0.962, 0.963, 0.994, 1.000, 0.994, 0.999, 0.995, 0.942, 0.839, 1.000, 0.836, 0.979,
              0.992, 0.951, 0.963),
    "DeiT": (0.905, 0.942, 0.819, 0.999, 0.991, 0.900, 0.999, 0.911, 0.910, 0.705, 0.993, 0.850, 0.993,
             0.979, 0.981, 0.925),
    "CaiT": (0.986, 0.839, 0.913, 1.000, 0.979, 0.948, 0.991, 0.963, 0.916, 0.791, 0.998, 0.886, 0.983,
             0.989, 0.977, 0.944),
}
_ALIB_PIXEL = {
    "ResNet-18": (0.983, 0.954, 0.985, 0.983, 0.985, 0.953, 0.996, 0.972, 0.972, 0.926, 0.944, 0.979, 0.964,
                  0.956, 0.965, 0.968),
    "WRN50": (0.986, 0.972, 0.990, 0.991, 0.992, 0.980, 0.996, 0.988, 0.976, 0.966, 0.966, 0.980, 0.971,
              0.941, 0.985, 0.979),
    "DeiT": (0.991, 0.973, 0.979, 0.991, 0.980, 0.989, 0.995, 0.978, 0.985, 0.945, 0.951, 0.985, 0.949,
             0.952, 0.978, 0.975),
    "CaiT": (0.984, 0.981, 0.991, 0.992, 0.979, 0.993, 0.996, 0.973, 0.992, 0.979, 0.960, 0.992, 0.960,
             0.954, 0.979, 0.980),
}


class ReimplementationTable(PaperTable):
    """Published numbers of someone else's re-implementation; its row label says so (not "Paper")."""

    @property
    def label(self) -> str:
        return f"Re-implementation: {self.setting}"


def _reimpl(metric: str, setting: str, source: str, values: tuple[float, ...]) -> ReimplementationTable:
    return ReimplementationTable(method="fastflow", dataset="mvtec", metric=metric, setting=setting,
                                 source=source, values=_row(values[:-1], values[-1], scale=1.0))


#: numbers of the open re-implementations (not the paper's); the ``setting`` names who ran them
REIMPLEMENTATIONS = (
    [_reimpl("pixel_auroc", f"gathierry/FastFlow, {bb}, {which}", _GATH,
             tuple(pair[i] for pair in rows))
     for bb, rows in _GATH_PIXEL.items() for i, which in ((0, "last epoch"), (1, "best test epoch"))]
    + [_reimpl("image_auroc", f"anomalib, {bb}", _ALIB, v) for bb, v in _ALIB_IMAGE.items()]
    + [_reimpl("pixel_auroc", f"anomalib, {bb}", _ALIB, v) for bb, v in _ALIB_PIXEL.items()]
)
