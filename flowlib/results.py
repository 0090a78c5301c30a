"""The one results format: a JSON file per (method, dataset, category, preset, seed), and tables from them.

Files live at ``<results>/<method>/<dataset>/<category>/<preset>_seed<seed>.json`` and hold::

    {"method", "dataset", "category", "preset", "seed", "metrics": {...}, "history": [...],
     "timing": {...}, "device": str, "config": {...}, "versions": {...}, "created": ISO time}

Tables are shaped like the papers': one row per run (or per labelled paper row), an ``Average``
column, then one column per category. Paper numbers live in :mod:`flowlib.paper_numbers` as
:class:`PaperTable` objects and are always labelled as the paper's in a table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowlib.checkpoint import atomic_write_bytes
from flowlib.config import REPO_ROOT, results_dir

METRIC_NAMES = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "aupro": "AUPRO",
    "image_f1": "Image F1",
    "pixel_f1": "Pixel F1",
}


@dataclass
class PaperTable:
    """Published numbers for one (method, dataset, metric, setting), per category.

    Values are fractions in [0, 1] (a paper's 99.4 % is stored as 0.994) so they sit beside ours.

    Attributes:
        method: registry name, e.g. ``"fastflow"``.
        dataset: ``"mvtec"``, ``"visa"``, ``"btad"``, ``"mvtec3d"`` or ``"union"``.
        metric: a key of :data:`METRIC_NAMES`.
        setting: what was run, e.g. ``"CaiT, 448 px"``.
        source: where the numbers come from (paper / README).
        values: category → value; may include ``"mean"`` when the source gives it.
    """

    method: str
    dataset: str
    metric: str
    setting: str
    source: str
    values: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"Paper: {self.method} ({self.setting})"


def result_path(out: str | os.PathLike | None, method: str, dataset: str, category: str, preset: str,
                seed: int) -> Path:
    return results_dir(out) / method / dataset / category / f"{preset}_seed{seed}.json"


def write_result(record: dict[str, Any], out: str | os.PathLike | None = None) -> Path:
    """Write one run's record atomically (a failed run never replaces an existing good file)."""
    path = result_path(out, record["method"], record["dataset"], record["category"], record["preset"],
                       record["seed"])
    data = json.dumps(record, indent=2, sort_keys=True, default=_json_default).encode()
    return atomic_write_bytes(path, lambda f: f.write(data))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def load_results(root: str | os.PathLike | None = None, **filters: Any) -> list[dict[str, Any]]:
    """All result records under ``root`` whose fields equal the given filters (e.g. ``method="fastflow"``)."""
    base = results_dir(root)
    records = []
    for path in sorted(base.glob("*/*/*/*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"Result file {path} is not valid JSON ({err}); delete or re-run it.") from err
        if all(record.get(k) == v for k, v in filters.items() if v is not None):
            record["_path"] = str(path)
            records.append(record)
    return records


def _fmt(value: float | None, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _mean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def category_table(records: Sequence[dict[str, Any]], metric: str = "image_auroc",
                   paper: Sequence[PaperTable] = (), categories: Sequence[str] | None = None,
                   percent: bool = True) -> str:
    """Markdown table shaped like the papers': rows = runs (+ paper rows), columns = Average + categories.

    Runs are grouped by (method, dataset, preset, seed, device); the Average is over the shown
    categories a row has. Paper rows use the paper's own mean when it gives one.
    """
    groups: dict[tuple, dict[str, float]] = {}
    for r in records:
        key = (r["method"], r["dataset"], r["preset"], r["seed"], r.get("device", "?"))
        groups.setdefault(key, {})[r["category"]] = r["metrics"].get(metric)
    if categories is None:
        seen: list[str] = []
        for values in list(groups.values()) + [p.values for p in paper]:
            seen += [c for c in values if c not in seen and c != "mean"]
        categories = seen
    head = f"| {METRIC_NAMES.get(metric, metric)} | Average | " + " | ".join(categories) + " |"
    lines = [head, "|" + "---|" * (len(categories) + 2)]
    for p in paper:
        avg = p.values.get("mean", _mean(p.values.get(c) for c in categories))
        cells = [_fmt(p.values.get(c), percent) for c in categories]
        lines.append(f"| {p.label} | {_fmt(avg, percent)} | " + " | ".join(cells) + " |")
    for (method, dataset, preset, seed, device), values in groups.items():
        label = f"Ours: {method} ({dataset}, {preset}, seed {seed}, {device})"
        cells = [_fmt(values.get(c), percent) for c in categories]
        avg = _mean(values.get(c) for c in categories)
        lines.append(f"| {label} | {_fmt(avg, percent)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_table(records: Sequence[dict[str, Any]],
                  metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1"),
                  percent: bool = True) -> str:
    """Markdown table: one row per (method, category) with one column per metric, plus a mean row."""
    head = "| Method | Category | " + " | ".join(METRIC_NAMES.get(m, m) for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    for method, rows in by_method.items():
        for r in sorted(rows, key=lambda r: r["category"]):
            cells = [_fmt(r["metrics"].get(m), percent) for m in metrics]
            lines.append(f"| {method} | {r['category']} | " + " | ".join(cells) + " |")
        means = [_fmt(_mean(r["metrics"].get(m) for r in rows), percent) for m in metrics]
        lines.append(f"| {method} | **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines)


def paper_tables(method: str | None = None, dataset: str | None = None,
                 metric: str | None = None) -> list[PaperTable]:
    """Published tables registered in :mod:`flowlib.paper_numbers`, filtered."""
    import importlib
    import pkgutil

    import flowlib.paper_numbers as pkg

    tables: list[PaperTable] = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"flowlib.paper_numbers.{info.name}")
        tables += list(getattr(module, "TABLES", []))
    return [t for t in tables
            if (method is None or t.method == method) and (dataset is None or t.dataset == dataset)
            and (metric is None or t.metric == metric)]


def examples_path(result_json: str | os.PathLike) -> Path:
    """The ``.examples.npz`` file that sits beside a result JSON."""
    path = Path(result_json)
    return path.with_name(path.stem + ".examples.npz")


def pick_examples(labels: Sequence[int], defects: Sequence[str], n_defective: int = 3) -> list[int]:
    """Fixed test indices to show: the first good image, then the first defective image of each defect kind
    in order of appearance (then further defective ones) until ``n_defective`` are chosen."""
    labels = [int(v) for v in labels]
    good = [i for i, y in enumerate(labels) if y == 0][:1]
    defective = [i for i, y in enumerate(labels) if y == 1]
    firsts, seen = [], set()
    for i in defective:
        if defects[i] not in seen:
            seen.add(defects[i])
            firsts.append(i)
    chosen = (firsts + [i for i in defective if i not in firsts])[:n_defective]
    return good + chosen


def _repo_relative(path: str | os.PathLike) -> str:
    """``path`` relative to the repository root when it lies inside it (results stay portable), else as is."""
    full = Path(path).resolve()
    try:
        return str(full.relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return str(full)


def save_examples(result_json: str | os.PathLike, maps: Any, masks: Any, labels: Any, scores: Any,
                  defects: Sequence[str], paths: Sequence[str], size: int = 64) -> Path:
    """Keep the anomaly maps of a few fixed test images of one category beside its result JSON.

    Args:
        maps: ``(N, H, W)`` anomaly maps of the category's test set; masks: ``(N, H, W)``;
            labels, scores: ``(N,)``; defects, paths: per test image.
        size: the maps and masks are stored at ``size × size`` (float16 / uint8).

    The file also stores the minimum and maximum over all ``N`` maps (``lo``, ``hi``) so that a figure can
    scale every method's maps to that method's own range. Loaded by :func:`load_examples`.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    idx = pick_examples(labels, defects)
    maps_t = torch.as_tensor(maps, dtype=torch.float32)
    small = F.interpolate(maps_t[idx][:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    small_masks = F.interpolate(torch.as_tensor(masks)[idx][:, None].float(), size=(size, size),
                                mode="nearest")
    rel = [_repo_relative(paths[i]) for i in idx]
    arrays = {"maps": small.numpy().astype(np.float16), "masks": small_masks[:, 0].numpy().astype(np.uint8),
              "labels": np.asarray([int(labels[i]) for i in idx]),
              "scores": np.asarray([float(scores[i]) for i in idx]),
              "defects": np.asarray([defects[i] for i in idx]), "paths": np.asarray(rel),
              "lo": np.float32(maps_t.min()), "hi": np.float32(maps_t.max())}
    target = examples_path(result_json)

    def write(f: Any) -> None:
        np.savez_compressed(f, **arrays)

    return atomic_write_bytes(target, write)


def load_examples(record_or_path: dict[str, Any] | str | os.PathLike) -> dict[str, Any] | None:
    """The examples saved beside a result (a record with ``"_path"`` or the JSON path), or None if absent.

    Returns a dict of numpy arrays: maps ``(K, S, S)`` float32, masks ``(K, S, S)``, labels, scores,
    defects, paths (absolute), lo, hi.
    """
    import numpy as np

    path = examples_path(record_or_path["_path"] if isinstance(record_or_path, dict) else record_or_path)
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k] for k in data.files}
    out["maps"] = out["maps"].astype(np.float32)
    out["paths"] = np.asarray([str(REPO_ROOT / p) for p in out["paths"]])  # absolute paths stay absolute
    return out


def comparison_table(records: Sequence[dict[str, Any]], percent: bool = True) -> str:
    """Markdown table: one row per method with mean metrics over its categories, trainable parameters,
    training time (all categories, feature caching included) and inference time per image."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1")
    head = ("| Method | " + " | ".join(METRIC_NAMES[k] for k in keys)
            + " | Trainable params | Train time (s) | Inference (ms/image) |")
    lines = [head, "|" + "---|" * (len(keys) + 4)]
    for method, rows in by_method.items():
        cells = [_fmt(_mean(r["metrics"].get(k) for r in rows), percent) for k in keys]
        # a unified model is trained once for all its categories: count each training once
        trainings = {(r["timing"]["train_seconds_total"], r["timing"]["train_categories"]) for r in rows}
        train_s = sum(t for t, _ in trainings)
        params = max(r["timing"]["trainable_parameters"] for r in rows)
        infer = _mean(r["timing"]["inference_ms_per_image"] for r in rows)
        n_models = len(trainings)
        lines.append(f"| {method} | " + " | ".join(cells)
                     + f" | {params / 1e6:.2f} M × {n_models} | {train_s:.0f} | {infer:.1f} |")
    return "\n".join(lines)
