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
from flowlib.config import results_dir

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
