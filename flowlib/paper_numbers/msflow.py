"""Published MSFlow numbers (fractions; 99.7 % is stored as 0.997).

Sources:

* the official repository's README (cool-xuan/msflow, commit e239755): MVTec AD detection and
  localisation AUROC per category with Wide-ResNet-50, 512 px (transistor 256 px). Its averages equal,
  to rounding, the mean of each category's **best test epoch** (the repository evaluates on the test set
  after every 4 epochs and keeps the best), not a fixed-schedule result;
* the authors' training logs in the same repository (``log_mvtec.txt``, ``log_visa.txt``): the value at
  the last evaluation and the best over the 25 evaluations, per category. The README table probably
  comes from a different run than the log (some categories differ, e.g. carpet detection 100.0 vs 99.84).

Paper (arXiv:2308.15300) abstract: PRO 97.1 on MVTec AD (no per-category PRO is public).
"""

from __future__ import annotations

from flowlib.results import PaperTable

_README = "cool-xuan/msflow README (MVTec AD table), commit e239755"
_LOG_MVTEC = "cool-xuan/msflow log_mvtec.txt, commit e239755"
_LOG_VISA = "cool-xuan/msflow log_visa.txt, commit e239755"
_SETTING = "WRN50, 512 px (transistor 256 px)"


def _fractions(percent: dict[str, float]) -> dict[str, float]:
    return {k: round(v / 100.0, 6) for k, v in percent.items()}


MVTEC_DETECTION = PaperTable(
    method="msflow", dataset="mvtec", metric="image_auroc",
    setting=f"{_SETTING}, best test epoch", source=_README,
    values=_fractions({
        "carpet": 100.0, "grid": 99.8, "leather": 100.0, "tile": 100.0, "wood": 100.0,
        "bottle": 100.0, "cable": 99.5, "capsule": 99.2, "hazelnut": 100.0, "metal_nut": 100.0,
        "pill": 99.6, "screw": 97.8, "toothbrush": 100.0, "transistor": 100.0, "zipper": 100.0,
        "mean": 99.7,
    }),
)

MVTEC_LOCALISATION = PaperTable(
    method="msflow", dataset="mvtec", metric="pixel_auroc",
    setting=f"{_SETTING}, best test epoch", source=_README,
    values=_fractions({
        "carpet": 99.4, "grid": 99.4, "leather": 99.7, "tile": 98.2, "wood": 97.1,
        "bottle": 99.0, "cable": 98.5, "capsule": 99.1, "hazelnut": 98.7, "metal_nut": 99.3,
        "pill": 98.8, "screw": 99.1, "toothbrush": 98.5, "transistor": 98.3, "zipper": 99.2,
        "mean": 98.8,
    }),
)

# log_mvtec.txt: (last evaluation, best of the 25 evaluations) per category, detection then localisation
_LOG = {
    "bottle": ((100.00, 100.00), (98.43, 98.89)),
    "cable": ((99.03, 99.59), (98.44, 98.44)),
    "capsule": ((99.04, 99.04), (99.21, 99.22)),
    "carpet": ((99.32, 99.84), (98.70, 99.33)),
    "grid": ((99.25, 99.67), (99.34, 99.38)),
    "hazelnut": ((100.00, 100.00), (98.59, 98.68)),
    "leather": ((99.73, 100.00), (99.32, 99.66)),
    "metal_nut": ((100.00, 100.00), (99.16, 99.16)),
    "pill": ((99.65, 99.73), (98.79, 98.87)),
    "screw": ((97.27, 97.95), (99.38, 99.39)),
    "tile": ((99.68, 100.00), (97.89, 97.99)),
    "toothbrush": ((100.00, 100.00), (98.76, 98.76)),
    "transistor": ((99.92, 100.00), (97.02, 98.31)),
    "wood": ((99.21, 99.82), (96.23, 96.39)),
    "zipper": ((99.40, 100.00), (98.82, 99.15)),
}


def _log_table(metric: str, index: int, which: int, label: str) -> PaperTable:
    return PaperTable(
        method="msflow", dataset="mvtec", metric=metric, setting=f"{_SETTING}, log, {label}",
        source=_LOG_MVTEC, values=_fractions({k: v[index][which] for k, v in _LOG.items()}),
    )


MVTEC_LOG_DETECTION_LAST = _log_table("image_auroc", 0, 0, "last epoch")
MVTEC_LOG_DETECTION_BEST = _log_table("image_auroc", 0, 1, "best test epoch")
MVTEC_LOG_LOCALISATION_LAST = _log_table("pixel_auroc", 1, 0, "last epoch")
MVTEC_LOG_LOCALISATION_BEST = _log_table("pixel_auroc", 1, 1, "best test epoch")

# log_visa.txt, best of the evaluations per category: (detection, localisation, PRO); means of last/best
_VISA_BEST = {
    "candle": (98.34, 99.46, 97.69), "capsules": (96.00, 99.72, 97.98), "cashew": (98.68, 99.13, 94.92),
    "chewinggum": (99.62, 99.42, 93.57), "fryum": (99.62, 92.70, 88.18),
    "macaroni1": (97.63, 99.79, 97.58), "macaroni2": (89.46, 99.64, 98.01), "pcb1": (99.00, 99.83, 96.03),
    "pcb2": (97.82, 99.17, 93.52), "pcb3": (98.87, 99.35, 94.40), "pcb4": (99.41, 99.10, 92.97),
    "pipe_fryum": (98.88, 99.11, 96.99),
}
_VISA_MEAN_BEST = (97.78, 98.87, 95.15)


def _visa_table(metric: str, index: int) -> PaperTable:
    values = {k: v[index] for k, v in _VISA_BEST.items()}
    values["mean"] = _VISA_MEAN_BEST[index]
    return PaperTable(method="msflow", dataset="visa", metric=metric,
                      setting="WRN50, 512 px, 1cls split, log, best test epoch", source=_LOG_VISA,
                      values=_fractions(values))


VISA_DETECTION_BEST = _visa_table("image_auroc", 0)
VISA_LOCALISATION_BEST = _visa_table("pixel_auroc", 1)
VISA_PRO_BEST = _visa_table("aupro", 2)

#: Every table of this module, found by :func:`flowlib.results.paper_tables`.
TABLES = [
    MVTEC_DETECTION, MVTEC_LOCALISATION,
    MVTEC_LOG_DETECTION_LAST, MVTEC_LOG_DETECTION_BEST,
    MVTEC_LOG_LOCALISATION_LAST, MVTEC_LOG_LOCALISATION_BEST,
    VISA_DETECTION_BEST, VISA_LOCALISATION_BEST, VISA_PRO_BEST,
]
