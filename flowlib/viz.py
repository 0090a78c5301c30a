"""Figures shared by the notebooks: anomaly-map overlays, sample grids, score histograms, ROC and PRO curves.

Every plotting function returns its :class:`~matplotlib.figure.Figure` (created with ``plt.subplots`` so
that notebooks display it, or the figure of the ``ax`` passed in) and changes no global matplotlib
setting. One colour map and one set of colours are used throughout, so that figures of different papers
can be compared side by side. :func:`save_figure` writes PNGs (stable across runs: no software version
stamped in) under ``figures/<subdir>/``.

Example
-------
>>> import numpy as np
>>> images, maps = np.full((2, 3, 16, 16), 0.5), np.random.default_rng(0).random((2, 16, 16))
>>> masks = np.zeros((2, 16, 16)); masks[1, 4:9, 5:10] = 1
>>> fig = plot_overlays(images, maps, masks, titles=["good", "defect"])
>>> len(fig.axes)   # two panels and the shared colour bar
3
>>> plt.close(fig)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from flowlib import config
from flowlib import metrics as M

#: Colour map of every anomaly map (a perceptually ordered rainbow, close to the papers' "jet").
ANOMALY_CMAP = "turbo"
#: Ground-truth contour colour (drawn with a thin black edge so it shows on any heat-map colour).
MASK_COLOR = "white"
#: Good / defective colours of histograms.
GOOD_COLOR = "tab:blue"
DEFECT_COLOR = "tab:red"
#: Side of one image panel in inches.
PANEL_SIZE = 2.4

ArrayLike = Any


def _np(x: ArrayLike) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def save_figure(fig: Figure, name: str, subdir: str | None = None, dpi: int = 100) -> Path:
    """Write ``fig`` as ``<figures>/<subdir>/<name>.png`` atomically and return the path.

    Args:
        fig: the figure.
        name: file name, with or without ``.png`` (no folders; use ``subdir``).
        subdir: e.g. ``"02_csflow"``; the folder comes from :func:`flowlib.config.figures_dir`.
        dpi: resolution.
    """
    stem = Path(name)
    if stem.name != name or not stem.stem:
        raise ValueError(f"save_figure: name={name!r} must be a plain file name; put folders in subdir=.")
    if stem.suffix not in ("", ".png"):
        raise ValueError(f"save_figure: name={name!r} has suffix {stem.suffix!r}; figures are saved as "
                         "PNG only.")
    path = config.figures_dir(subdir) / f"{stem.stem}.png"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # No "Software" stamp: the bytes then depend on the figure only, not on the matplotlib version.
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", facecolor="white",
                    metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# Image grids


def _grid(n: int, ncols: int, panel_size: float, extra_width: float = 0.0) -> tuple[Figure, list[Axes]]:
    """A figure with ``n`` image panels in rows of ``ncols``; unused grid cells are removed."""
    if n < 1:
        raise ValueError("nothing to plot: got 0 images.")
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * panel_size + extra_width, nrows * panel_size),
                             squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.remove()
    for ax in flat[:n]:
        ax.set_axis_off()
    return fig, flat[:n]


def _to_hwc(image: ArrayLike) -> np.ndarray:
    """``(3, H, W)``, ``(H, W, 3)``, ``(1, H, W)`` or ``(H, W)`` in [0, 1] -> ``(H, W, 3)`` or ``(H, W)``."""
    a = _np(image).astype(np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an image (3, H, W), (H, W, 3) or (H, W); got shape {a.shape}.")
    return np.clip(a, 0.0, 1.0)


def _to_2d(x: ArrayLike, what: str) -> np.ndarray:
    a = _np(x)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{what} must be (H, W) or (1, H, W) per image; got shape {a.shape}.")
    return a


def _draw_contour(ax: Axes, mask: ArrayLike, height: int, width: int) -> None:
    """Outline the non-zero part of ``mask`` over an image of ``height x width`` (any mask resolution)."""
    m = (_to_2d(mask, "mask") != 0).astype(np.float32)
    if not m.any() or m.all():  # no boundary to draw
        return
    mh, mw = m.shape
    xs = (np.arange(mw) + 0.5) * width / mw - 0.5
    ys = (np.arange(mh) + 0.5) * height / mh - 0.5
    contour = ax.contour(xs, ys, m, levels=[0.5], colors=MASK_COLOR, linewidths=1.2)
    contour.set_path_effects([patheffects.withStroke(linewidth=2.4, foreground="black")])


def plot_overlays(images: ArrayLike, maps: ArrayLike, masks: ArrayLike | None = None,
                  titles: Sequence[str] | None = None, scores: Sequence[float] | None = None,
                  ncols: int = 4, alpha: float = 0.5, vmin: float | None = None, vmax: float | None = None,
                  colorbar: bool = True, panel_size: float = PANEL_SIZE) -> Figure:
    """Images with their anomaly maps as a semi-transparent heat map and the ground truth outlined.

    Args:
        images: ``(N, 3, H, W)`` or ``(N, H, W, 3)`` in [0, 1] (one image: ``image[None]``).
        maps: ``(N, h, w)`` or ``(N, 1, h, w)``; stretched over the image, so ``h, w`` may differ from
            ``H, W``.
        masks: optional ``(N, H', W')`` / ``(N, 1, H', W')`` ground truth (non-zero = defect).
        titles, scores: optional per-image title and image score (shown under the title).
        ncols: panels per row.
        alpha: opacity of the heat map.
        vmin, vmax: colour range shared by all panels (default: min and max over all maps), so that
            colours mean the same score everywhere.
        colorbar: add one shared colour bar (one extra axes).
    """
    maps_np = [_to_2d(m, "maps") for m in maps]
    n = len(maps_np)
    if len(images) != n:
        raise ValueError(f"plot_overlays: {len(images)} images but {n} maps.")
    lo = min(float(m.min()) for m in maps_np) if vmin is None else vmin
    hi = max(float(m.max()) for m in maps_np) if vmax is None else vmax
    norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
    fig, axes = _grid(n, ncols, panel_size, extra_width=0.6 if colorbar else 0.0)
    for i, ax in enumerate(axes):
        img = _to_hwc(images[i])
        height, width = img.shape[:2]
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
        same = maps_np[i].shape == (height, width)
        ax.imshow(maps_np[i], cmap=ANOMALY_CMAP, norm=norm, alpha=alpha,
                  interpolation="nearest" if same else "bilinear",
                  extent=(-0.5, width - 0.5, height - 0.5, -0.5))
        if masks is not None:
            _draw_contour(ax, masks[i], height, width)
        label = [titles[i]] if titles is not None else []
        if scores is not None:
            label.append(f"score {float(scores[i]):.3g}")
        if label:
            ax.set_title("\n".join(label), fontsize=9)
    if colorbar:
        fig.colorbar(ScalarMappable(norm=norm, cmap=ANOMALY_CMAP), ax=axes, shrink=0.8, label="anomaly score")
    return fig


def plot_samples(dataset: Any, indices: Sequence[int], ncols: int = 4,
                 panel_size: float = PANEL_SIZE) -> Figure:
    """Dataset samples with their ground truth outlined, titled ``category / defect``.

    Args:
        dataset: indexable; ``dataset[i]`` is a dict with ``"image"`` ``(3, S, S)`` in [0, 1], ``"mask"``
            ``(1, S, S)``, ``"defect"`` and ``"category"`` (the :mod:`flowlib.data` sample format).
        indices: which samples to show.
    """
    indices = list(indices)
    fig, axes = _grid(len(indices), ncols, panel_size)
    for ax, idx in zip(axes, indices, strict=True):
        sample = dataset[idx]
        img = _to_hwc(sample["image"])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
        if sample.get("mask") is not None:
            _draw_contour(ax, sample["mask"], *img.shape[:2])
        ax.set_title(f"{sample.get('category', '?')} / {sample.get('defect', '?')}", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------------
# Curves and histograms


def _axes(ax: Axes | None, figsize: tuple[float, float] = (4.5, 3.6)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.get_figure(root=True), ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def plot_score_histogram(labels: ArrayLike, scores: ArrayLike, ax: Axes | None = None,
                         title: str | None = None, bins: int = 30, threshold: float | None = None) -> Figure:
    """Histograms of the scores of good and defective samples on shared bins.

    Args:
        labels: ``(N,)``, non-zero = defective. scores: ``(N,)``.
        threshold: optional decision threshold drawn as a dashed line.
    """
    y = _np(labels).reshape(-1) != 0
    s = _np(scores).reshape(-1).astype(np.float64)
    if y.shape != s.shape:
        raise ValueError(f"plot_score_histogram: labels {y.shape} and scores {s.shape} differ in length.")
    fig, ax = _axes(ax)
    edges = np.histogram_bin_edges(s, bins=bins)
    for part, name, color in ((s[~y], "good", GOOD_COLOR), (s[y], "defective", DEFECT_COLOR)):
        if part.size:
            ax.hist(part, bins=edges, alpha=0.6, color=color, label=f"{name} (n={part.size})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def plot_roc_curves(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], ax: Axes | None = None,
                    title: str | None = None) -> Figure:
    """ROC curves, one per entry ``name -> (labels, scores)``, with their AUROC in the legend."""
    fig, ax = _axes(ax, figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
    for name, (labels, scores) in curves.items():
        fpr, tpr = M.roc_curve_points(labels, scores)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUROC {M.image_auroc(labels, scores):.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate", ylabel="true-positive rate")
    ax.set_aspect("equal")
    if curves:
        ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title)
    return fig


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area of the ascending curve ``(x, y)`` on ``[0, limit]``, interpolating at the limit."""
    k = int(np.searchsorted(x, limit, side="right"))
    xs, ys = x[:k], y[:k]
    if k < x.size and xs[-1] < limit:
        y_lim = ys[-1] + (y[k] - ys[-1]) * (limit - xs[-1]) / (x[k] - xs[-1])
        xs, ys = np.append(xs, limit), np.append(ys, y_lim)
    return float(np.trapezoid(ys, xs))


def plot_pro_curve(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3, ax: Axes | None = None,
                   label: str | None = None, title: str | None = None, method: str = "auto") -> Figure:
    """The per-region-overlap curve with the integrated part (FPR up to ``fpr_limit``) shaded.

    The legend gives AU-PRO as in :func:`flowlib.metrics.aupro`. Call it again with the same ``ax`` to
    compare methods. Shapes as in :func:`flowlib.metrics.pro_curve`.
    """
    fpr, pro = M.pro_curve(masks, maps, method=method)
    value = _area_up_to(fpr, pro, fpr_limit) / fpr_limit
    if fpr.size > 5000:  # the exact curve has a point per distinct score; a plot needs far fewer
        keep = np.unique(np.linspace(0, fpr.size - 1, 5000).round().astype(np.int64))
        fpr, pro = fpr[keep], pro[keep]
    fig, ax = _axes(ax)
    text = f"AU-PRO@{fpr_limit:g} {value:.3f}"
    (line,) = ax.plot(fpr, pro, linewidth=1.5, label=f"{label} ({text})" if label else text)
    inside = fpr <= fpr_limit
    ax.fill_between(fpr[inside], pro[inside], color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axvline(fpr_limit, color="0.4", linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate (defect-free pixels)",
           ylabel="per-region overlap")
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title)
    return fig


__all__ = [
    "ANOMALY_CMAP", "DEFECT_COLOR", "GOOD_COLOR", "MASK_COLOR", "plot_overlays", "plot_pro_curve",
    "plot_roc_curves", "plot_samples", "plot_score_histogram", "save_figure",
]
