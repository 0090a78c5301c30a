"""Published HGAD numbers (fractions; 98.4 % is stored as 0.984), unified setting: one model per dataset.

Source: the README of the official repository (github.com/xcyao00/HGAD, README at commit fb935ef),
Yao et al., "Hierarchical Gaussian Mixture Normalizing Flows Modeling for Unified Anomaly Detection",
ECCV 2024, arXiv:2403.13349. The README gives image and pixel AUROC per category for MVTec AD, BTAD,
MVTec 3D-AD (RGB images only), VisA, and a "union" model trained on all 40 classes of the four datasets
at once; the means are the README's own. Per §5.7 of the research notes the official script keeps the
best image AUROC and the best pixel AUROC over 200 test-set evaluations, selected independently.

Category keys are those of :mod:`flowlib.data` (BTAD ``"01"``, VisA ``"pipe_fryum"``, ...). The union
table uses the same keys; BTAD, MVTec 3D-AD and VisA have no category names in common with MVTec AD.
"""

from __future__ import annotations

from flowlib.results import PaperTable

_SOURCE = "HGAD README (github.com/xcyao00/HGAD, commit fb935ef), ECCV 2024, arXiv:2403.13349"
_SETTING = "unified, tf_efficientnet_b6, 1024 px"

# category → (image AUROC, pixel AUROC), in the README's order
MVTEC = {
    "carpet": (1.000, 0.994), "grid": (0.997, 0.991), "leather": (1.000, 0.996), "tile": (1.000, 0.961),
    "wood": (0.996, 0.959), "bottle": (1.000, 0.986), "cable": (0.970, 0.959), "capsule": (0.988, 0.992),
    "hazelnut": (0.998, 0.988), "metal_nut": (1.000, 0.981), "pill": (0.966, 0.988),
    "screw": (0.961, 0.993), "toothbrush": (0.911, 0.990), "transistor": (0.977, 0.913),
    "zipper": (0.999, 0.990), "mean": (0.984, 0.979),
}
BTAD = {"01": (1.000, 0.976), "02": (0.859, 0.973), "03": (0.987, 0.990), "mean": (0.949, 0.980)}
MVTEC3D = {
    "bagel": (0.977, 0.988), "cable_gland": (0.963, 0.995), "carrot": (0.889, 0.988),
    "cookie": (0.734, 0.966), "dowel": (0.960, 0.992), "foam": (0.811, 0.917), "peach": (0.829, 0.994),
    "potato": (0.690, 0.950), "rope": (0.976, 0.992), "tire": (0.876, 0.986), "mean": (0.871, 0.977),
}
VISA = {
    "candle": (0.988, 0.995), "capsules": (0.956, 0.990), "cashew": (0.910, 0.991),
    "chewinggum": (0.999, 0.996), "fryum": (0.984, 0.949), "macaroni1": (0.991, 0.998),
    "macaroni2": (0.926, 0.997), "pcb1": (0.976, 0.995), "pcb2": (0.956, 0.983), "pcb3": (0.986, 0.994),
    "pcb4": (0.979, 0.987), "pipe_fryum": (0.996, 0.993), "mean": (0.971, 0.989),
}
UNION = {
    "bottle": (1.000, 0.982), "cable": (0.951, 0.860), "capsule": (0.934, 0.990), "carpet": (1.000, 0.993),
    "grid": (0.986, 0.983), "hazelnut": (1.000, 0.985), "leather": (1.000, 0.995),
    "metal_nut": (0.997, 0.981), "pill": (0.969, 0.984), "screw": (0.812, 0.986), "tile": (0.999, 0.936),
    "toothbrush": (0.961, 0.992), "transistor": (0.996, 0.901), "wood": (0.994, 0.957),
    "zipper": (0.999, 0.992),
    "01": (0.997, 0.974), "02": (0.838, 0.969), "03": (0.995, 0.997),
    "bagel": (0.983, 0.991), "cable_gland": (0.886, 0.990), "carrot": (0.815, 0.990),
    "cookie": (0.792, 0.972), "dowel": (0.896, 0.978), "foam": (0.798, 0.913), "peach": (0.856, 0.993),
    "potato": (0.625, 0.958), "rope": (0.929, 0.994), "tire": (0.835, 0.965),
    "candle": (0.989, 0.996), "capsules": (0.939, 0.975), "cashew": (0.928, 0.987),
    "chewinggum": (0.996, 0.996), "fryum": (0.976, 0.938), "macaroni1": (0.975, 0.997),
    "macaroni2": (0.903, 0.995), "pcb1": (0.964, 0.992), "pcb2": (0.966, 0.972), "pcb3": (0.964, 0.990),
    "pcb4": (0.981, 0.981), "pipe_fryum": (0.991, 0.992),
    "mean": (0.935, 0.975),
}

#: dataset key → (per-category numbers, number of classes in the one unified model)
DATASETS = {"mvtec": (MVTEC, 15), "btad": (BTAD, 3), "mvtec3d": (MVTEC3D, 10), "visa": (VISA, 12),
            "union": (UNION, 40)}


def _tables() -> list[PaperTable]:
    tables = []
    for dataset, (numbers, n_classes) in DATASETS.items():
        for i, metric in enumerate(("image_auroc", "pixel_auroc")):
            tables.append(PaperTable(method="hgad", dataset=dataset, metric=metric,
                                     setting=f"{_SETTING}, {n_classes} classes in one model", source=_SOURCE,
                                     values={c: v[i] for c, v in numbers.items()}))
    return tables


TABLES = _tables()
