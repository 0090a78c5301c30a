"""Anomaly-detection metrics: image and pixel AUROC, the MVTec AD AU-PRO, best F1 and thresholds.

Conventions
-----------
* A sample (image or pixel) is *defective* when its label or mask value is non-zero; it is predicted
  defective when ``score >= threshold``. Higher scores mean "more anomalous".
* Image-level inputs: ``labels`` and ``scores`` of shape ``(N,)``. Pixel-level inputs: ``masks`` and
  ``maps`` of shape ``(N, H, W)`` or ``(N, 1, H, W)``, or a sequence of ``(H_i, W_i)`` arrays when the
  images differ in size. Masks and maps must have the same size: upsample the maps first (the official
  MVTec AD evaluation compares at the original image resolution). NumPy arrays and torch tensors (any
  device) are accepted; tensors are converted one image at a time.
* Pixel scores are compared in float32, as the official evaluation does (it reads float32 TIFF maps).
  Image scores keep their own precision.

AU-PRO follows the official MVTec AD evaluation (Bergmann et al., "The MVTec Anomaly Detection Dataset",
IJCV 2021; ``pro_curve_util.py`` and ``generic_util.py`` of the MVTec evaluation scripts): the regions
are the 8-connected components of every ground-truth mask (per image, never merged across images); the
PRO at a threshold is the mean over all regions of the fraction of the region's pixels at or above the
threshold; the false-positive rate counts every defect-free pixel of the whole set (all pixels of good
images included). Runs of tied scores form one point, the curve starts at (0, 0), its area is taken with
the trapezoid rule up to ``fpr_limit``, with linear interpolation at the limit, and divided by the limit.
MSFlow and CFLOW-AD compute a different, biased variant (uniform score thresholds, min-max rescaled FPR);
numbers from it are not comparable.

Exact and binned computation
----------------------------
Every curve here is walked through *tie groups*: for each distinct score ``u`` of the negatives
(defect-free samples) the curve moves from the point "score > u" to the point "score >= u". Points
where only positives change are vertical and add no area, so these groups give the exact trapezoid
areas, tie handling included, with no per-point arrays of the full size.

* ``method="exact"`` (the default below :data:`EXACT_PIXEL_LIMIT` pixels) sorts a float32 copy of the
  defect-free scores in place (4 bytes per pixel) and keeps the defect pixels sorted with their region
  weights (about 30 bytes per *defect* pixel). Results equal the MVTec AD reference to float rounding.
* ``method="binned"`` (the default above the limit) makes two streaming passes over the images: the first
  takes the exact minimum and maximum and a random sample of scores whose quantiles give ``bins`` bin
  edges; the second sorts the scores a batch of 4 M pixels at a time and counts, per bin, defect-free
  pixels, defect pixels and region weights by searching the edges in the sorted batch. Memory is a
  constant (below 80 MiB) whatever the pixel count. At the bin edges the curves are exact; inside a bin
  the true curve is monotone, so it stays in the box spanned by the two edge points. The binned value
  therefore differs from the exact one by at most the summed half-areas of those boxes (a full box for the
  bin cut by the FPR limit; nothing for a bin whose pixels all share one score, which is an exact tie).
  This bound is computed from the counts and returned as :attr:`PixelMetrics.auroc_bound` and
  :attr:`PixelMetrics.aupro_bound`. With the default ``2**18`` quantile bins each bin holds about 4e-6 of
  the pixels, which bounds the AUROC error by about 2e-6 and the AU-PRO error by about 1e-5 (a little
  more where the sampled edges are uneven).

Undefined metrics
-----------------
AUROC needs both classes, AU-PRO needs at least one defect region and one defect-free pixel, and F1 of
the defective class needs at least one defective sample. Otherwise the functions raise
:class:`UndefinedMetricError` (a ``ValueError``) saying what is missing; no value is guessed.
:func:`compute_metrics` can instead return NaN for such metrics (``allow_undefined=True``), with a
warning that names the reason.

Example
-------
>>> import numpy as np
>>> masks = np.zeros((2, 8, 8)); masks[1, 2:4, 2:5] = 1
>>> round(aupro(masks, masks * 0.9 + 0.05), 6)
1.0
>>> round(aupro(masks, np.ones((2, 8, 8))), 6)   # a constant map: the straight line up to 0.3
0.15
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

#: Above this many pixels the pixel metrics switch from the exact computation to the binned one.
EXACT_PIXEL_LIMIT = 2**25
#: Number of quantile bins of the binned pixel metrics.
DEFAULT_BINS = 2**18
#: Scores sampled (in total) to place the quantile bin edges.
_EDGE_SAMPLE = 2**22
#: Tie groups handled per step; bounds the temporary arrays of the exact computation.
_CHUNK = 2**16
#: Scores sorted at a time by the binned computation (16 MiB of float32).
_BATCH = 2**22
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_METHODS = ("auto", "exact", "binned")

ArrayLike = Any  # numpy array, torch tensor or nested sequence


class UndefinedMetricError(ValueError):
    """A metric is undefined for the data given (e.g. only one class present)."""


# --------------------------------------------------------------------------------------------------
# Input handling


def _as_numpy(x: ArrayLike) -> np.ndarray:
    """NumPy view of ``x`` (a torch tensor is detached and moved to the CPU; no copy when it lives there)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def _image_level(labels: ArrayLike, scores: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(is_defective (N,) bool, scores (N,) float)`` with shape and finiteness checks."""
    y = _as_numpy(labels)
    s = _as_numpy(scores)
    if y.ndim > 1 and y.size == y.shape[0]:
        y = y.reshape(-1)
    if s.ndim > 1 and s.size == s.shape[0]:
        s = s.reshape(-1)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"{what}: labels and scores must both have shape (N,); got {y.shape} and {s.shape}.")
    if y.size == 0:
        raise ValueError(f"{what}: labels and scores are empty.")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"{what}: scores contain NaN or inf; replace them (e.g. np.nan_to_num) first.")
    return y != 0, s


def _num_images(x: ArrayLike, what: str, name: str) -> int:
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) not in (3, 4):
        raise ValueError(f"{what}: {name} must have shape (N, H, W) or (N, 1, H, W); got {tuple(shape)}. "
                         f"For a single image pass {name}[None].")
    return len(x)


def _image_2d(x: ArrayLike, what: str, name: str, i: int) -> np.ndarray:
    a = _as_numpy(x)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{what}: {name}[{i}] must be a 2-D (H, W) map; got shape {a.shape}.")
    return a


def _iter_images(masks: ArrayLike, maps: ArrayLike, what: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(defect (H, W) bool, scores (H, W) float32)`` for every image."""
    n = _num_images(maps, what, "maps")
    if _num_images(masks, what, "masks") != n:
        raise ValueError(f"{what}: {len(masks)} masks but {n} maps; pass one mask per map.")
    if n == 0:
        raise ValueError(f"{what}: no images given.")
    for i in range(n):
        s = _image_2d(maps[i], what, "maps", i)
        m = _image_2d(masks[i], what, "masks", i)
        if m.shape != s.shape:
            raise ValueError(f"{what}: image {i} has mask shape {m.shape} but map shape {s.shape}; "
                             "resize the anomaly maps to the mask size (e.g. bilinear interpolation).")
        s = np.asarray(s, dtype=np.float32)
        if not np.isfinite(s).all():
            raise ValueError(f"{what}: maps[{i}] contains NaN or inf; replace them (e.g. np.nan_to_num) "
                             "first.")
        yield m != 0, s


def _check_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit={fpr_limit} must lie in (0, 1].")
    return fpr_limit


# --------------------------------------------------------------------------------------------------
# Tie groups and the accumulator that integrates them


@dataclass
class _Groups:
    """A run of curve steps in descending threshold order, shape ``(G,)`` each.

    ``*_gt`` counts samples with score above the group threshold, ``*_ge`` at or above it; ``fp`` are
    negatives, ``tp`` positives and ``w`` the summed region weights ``1/|region|`` of the positives.
    ``thr_gt`` is the threshold that realises the ``*_gt`` point (None when it is not a candidate).
    ``tied`` marks binned steps whose samples all share one score, so that the step is exact.
    """

    thr_ge: np.ndarray
    thr_gt: np.ndarray | None
    fp_gt: np.ndarray
    fp_ge: np.ndarray
    tp_gt: np.ndarray
    tp_ge: np.ndarray
    w_gt: np.ndarray | None = None
    w_ge: np.ndarray | None = None
    tied: np.ndarray | None = None


def _exact_groups(neg: np.ndarray, pos: np.ndarray, cumw: np.ndarray | None = None,
                  chunk: int = _CHUNK) -> Iterator[_Groups]:
    """Tie groups at every distinct negative score, from the highest down.

    Args:
        neg: ascending scores of the negatives ``(N_neg,)``, at least one.
        pos: ascending scores of the positives ``(N_pos,)``, at least one.
        cumw: ``(N_pos + 1,)`` cumulative region weights of ``pos`` (``cumw[0] == 0``), or None.
    """
    n, p = neg.size, pos.size
    wtot = None if cumw is None else cumw[-1]
    for b in range(n, 0, -chunk):
        a = max(b - chunk, 0)
        s = neg[a:b]
        first = np.empty(s.size, dtype=bool)
        first[0] = a == 0 or neg[a - 1] != s[0]
        np.not_equal(s[1:], s[:-1], out=first[1:])
        start = np.flatnonzero(first)[::-1] + a
        if start.size == 0:  # the whole chunk continues a tie group that starts further down
            continue
        u = neg[start]
        right = np.searchsorted(neg, u, side="right")
        lo = np.searchsorted(pos, u, side="left")
        hi = np.searchsorted(pos, u, side="right")
        # The "score > u" point is realised by the smallest score of either class above u.
        next_neg = np.where(right < n, neg[np.minimum(right, n - 1)], np.inf)
        next_pos = np.where(hi < p, pos[np.minimum(hi, p - 1)], np.inf)
        g = _Groups(thr_ge=u, thr_gt=np.minimum(next_neg, next_pos), fp_gt=n - right, fp_ge=n - start,
                    tp_gt=p - hi, tp_ge=p - lo)
        if cumw is not None:
            g.w_gt = wtot - cumw[hi]
            g.w_ge = wtot - cumw[lo]
        yield g


def _binned_groups(edges: np.ndarray, neg: np.ndarray, pos: np.ndarray, w: np.ndarray | None,
                   tied: np.ndarray) -> _Groups:
    """Tie groups at the bin edges from per-bin counts ``(B,)`` (bin ``b`` is ``[edges[b], edges[b+1])``)."""
    fp_ge = np.cumsum(neg[::-1])
    tp_ge = np.cumsum(pos[::-1])
    g = _Groups(thr_ge=edges[: neg.size][::-1], thr_gt=None, fp_gt=fp_ge - neg[::-1], fp_ge=fp_ge,
                tp_gt=tp_ge - pos[::-1], tp_ge=tp_ge, tied=tied[::-1])
    if w is not None:
        g.w_ge = np.cumsum(w[::-1])
        g.w_gt = g.w_ge - w[::-1]
    return g


class _CurveAccumulator:
    """Integrates ROC and PRO areas and tracks the best F1 over a stream of tie groups.

    With ``binned=True`` it also sums the slack: the largest possible difference between the chord through
    two consecutive edge points and any monotone curve between them.
    """

    def __init__(self, n_neg: int, n_pos: int, n_regions: int = 0, fpr_limit: float = 0.3,
                 binned: bool = False, keep_points: bool = False):
        self.n_neg, self.n_pos, self.n_regions = n_neg, n_pos, n_regions
        self.limit, self.binned, self.keep_points = fpr_limit, binned, keep_points
        self.roc_area = self.roc_slack = 0.0
        self.pro_area = self.pro_slack = 0.0
        self.best_f1, self.best_thr, self.f1_ceiling = -1.0, math.nan, 0.0
        self.points: list[tuple[np.ndarray, ...]] = []

    def add(self, g: _Groups) -> None:
        n, p = float(self.n_neg), float(self.n_pos)
        dx = (g.fp_ge - g.fp_gt) / n
        self.roc_area += float(np.dot(dx, (g.tp_gt + g.tp_ge) / (2.0 * p)))
        if self.binned:
            self.roc_slack += float(np.dot(dx * ~g.tied, (g.tp_ge - g.tp_gt) / (2.0 * p)))
        self._add_f1(g)
        if g.w_ge is not None and self.n_regions > 0:
            self._add_pro(g)
        if self.keep_points:
            self.points.append((g.fp_gt / n, g.tp_gt / p, g.fp_ge / n, g.tp_ge / p,
                                None if g.w_gt is None else self._pro(g.w_gt),
                                None if g.w_ge is None else self._pro(g.w_ge)))

    def _pro(self, w: np.ndarray) -> np.ndarray:
        return np.minimum(w / self.n_regions, 1.0)

    def _add_pro(self, g: _Groups) -> None:
        lim = self.limit
        x0, x1 = g.fp_gt / self.n_neg, g.fp_ge / self.n_neg
        y0, y1 = self._pro(g.w_gt), self._pro(g.w_ge)
        full = x1 <= lim
        self.pro_area += float(np.dot(x1[full] - x0[full], y0[full] + y1[full]) / 2.0)
        cut = np.flatnonzero((x0 < lim) & (x1 > lim))
        for i in cut:  # at most one group in the whole stream crosses the limit
            y_lim = y0[i] + (y1[i] - y0[i]) * (lim - x0[i]) / (x1[i] - x0[i])
            self.pro_area += float((lim - x0[i]) * (y0[i] + y_lim) / 2.0)
            if self.binned and not g.tied[i]:
                self.pro_slack += float((lim - x0[i]) * (y1[i] - y0[i]))
        if self.binned:
            open_ = full & ~g.tied
            self.pro_slack += float(np.dot(x1[open_] - x0[open_], y1[open_] - y0[open_]) / 2.0)

    def _add_f1(self, g: _Groups) -> None:
        p = self.n_pos
        cands = [(g.tp_ge, g.fp_ge, g.thr_ge)]
        if g.thr_gt is not None:
            cands.append((g.tp_gt, g.fp_gt, g.thr_gt))
        for tp, fp, thr in cands:
            f1 = 2.0 * tp / (tp + fp + p)
            i = int(np.argmax(f1))
            if f1[i] > self.best_f1 and np.isfinite(thr[i]):
                self.best_f1, self.best_thr = float(f1[i]), float(thr[i])
        if self.binned:
            # Inside a bin, TP can reach tp_ge while FP is still fp_gt: the best F1 the bin could hide.
            fp_low = np.where(g.tied, g.fp_ge, g.fp_gt)
            self.f1_ceiling = max(self.f1_ceiling, float(np.max(2.0 * g.tp_ge / (g.tp_ge + fp_low + p))))

    def add_candidate(self, tp: int, fp: int, thr: float) -> None:
        f1 = 2.0 * tp / (tp + fp + self.n_pos)
        if f1 > self.best_f1:
            self.best_f1, self.best_thr = f1, float(thr)

    def auroc(self) -> float:
        return self.roc_area

    def aupro(self) -> float:
        return self.pro_area / self.limit

    def curve(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Collected points ``(x, y)`` from (0, 0) to (1, 1); ``kind`` is ``"roc"`` or ``"pro"``."""
        xs, ys = [np.zeros(1)], [np.zeros(1)]
        for x0, t0, x1, t1, w0, w1 in self.points:
            y0, y1 = (t0, t1) if kind == "roc" else (w0, w1)
            xs.append(np.stack([x0, x1], axis=1).reshape(-1))
            ys.append(np.stack([y0, y1], axis=1).reshape(-1))
        xs.append(np.ones(1))
        ys.append(np.ones(1))
        x, y = np.concatenate(xs), np.concatenate(ys)
        keep = np.ones(x.size, dtype=bool)
        keep[1:] = (x[1:] != x[:-1]) | (y[1:] != y[:-1])
        return x[keep], y[keep]


# --------------------------------------------------------------------------------------------------
# Image level


def _image_accumulator(labels: ArrayLike, scores: ArrayLike, what: str,
                       keep_points: bool = False) -> _CurveAccumulator:
    y, s = _image_level(labels, scores, what)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise UndefinedMetricError(
            f"{what} needs both good (label 0) and defective (label != 0) samples; got {n_neg} good and "
            f"{n_pos} defective. The metric is undefined for a single class.")
    neg, pos = np.sort(s[~y]), np.sort(s[y])
    acc = _CurveAccumulator(n_neg, n_pos, keep_points=keep_points)
    for g in _exact_groups(neg, pos):
        acc.add(g)
    acc.add_candidate(n_pos, n_neg, min(neg[0], pos[0]))
    return acc


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image scores (ties count one half, as in ``sklearn.roc_auc_score``).

    Args:
        labels: ``(N,)``, non-zero = defective.
        scores: ``(N,)`` image anomaly scores.
    """
    return _image_accumulator(labels, scores, "image_auroc").auroc()


def roc_curve_points(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr)``, each ``(K,)``, from (0, 0) to (1, 1) with tied scores merged (for plots).

    Works for image scores ``(N,)``; for pixels pass flattened masks and maps of moderate size.
    """
    acc = _image_accumulator(labels, scores, "roc_curve_points", keep_points=True)
    return acc.curve("roc")


def best_f1(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Maximum F1 of the defective class over all thresholds, and the threshold that reaches it.

    The threshold is the lowest score predicted defective (``score >= threshold``). Chosen on the test set
    itself this is an optimistic, oracle number ("F1-max"); to report an honest F1, pick the threshold on
    validation data with :func:`threshold_at_best_f1` and apply it with :func:`f1_at_threshold`.

    Returns:
        ``(f1, threshold)``.
    """
    acc = _image_accumulator(labels, scores, "best_f1")
    return acc.best_f1, acc.best_thr


def threshold_at_best_f1(labels: ArrayLike, scores: ArrayLike) -> float:
    """The threshold that maximises F1 on ``(labels, scores)``, e.g. a validation set."""
    return best_f1(labels, scores)[1]


def _f1(tp: int, fp: int, n_pos: int) -> float:
    return 2.0 * tp / (tp + fp + n_pos)


def f1_at_threshold(labels: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    """F1 of the defective class when ``score >= threshold`` is predicted defective."""
    y, s = _image_level(labels, scores, "f1_at_threshold")
    n_pos = int(y.sum())
    if n_pos == 0:
        raise UndefinedMetricError("f1_at_threshold needs at least one defective sample (label != 0); F1 of "
                                   "the defective class is undefined without one.")
    pred = s >= threshold
    return _f1(int((pred & y).sum()), int((pred & ~y).sum()), n_pos)


# --------------------------------------------------------------------------------------------------
# Pixel level


@dataclass(frozen=True)
class PixelMetrics:
    """Pixel-level metrics of a set of anomaly maps.

    Attributes:
        auroc: pixel AUROC over all pixels pooled.
        aupro: normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD protocol).
        f1, threshold: best pixel F1 and the threshold reaching it (``score >= threshold``).
        exact: True when computed exactly, False when binned.
        auroc_bound, aupro_bound, f1_bound: bounds on the absolute difference from the exact values
            (0 when exact). ``f1_bound`` bounds how much higher the exact best F1 can be.
        fpr_limit, n_pixels, n_defect_pixels, n_regions: what was measured.
    """

    auroc: float
    aupro: float
    f1: float
    threshold: float
    exact: bool
    auroc_bound: float
    aupro_bound: float
    f1_bound: float
    fpr_limit: float
    n_pixels: int
    n_defect_pixels: int
    n_regions: int


def _regions(defect: np.ndarray) -> tuple[np.ndarray, int]:
    """Weights ``1/|region|`` of the defect pixels of one image ``(K,)`` (C order) and the region count."""
    lab, n = ndimage.label(defect, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(lab.ravel())
    return 1.0 / sizes[lab[defect]], int(n)


def _count(masks: ArrayLike, maps: ArrayLike, what: str) -> tuple[int, int]:
    n_pix = n_pos = 0
    for m, _ in _iter_images(masks, maps, what):
        n_pix += m.size
        n_pos += int(np.count_nonzero(m))
    return n_pix, n_pos


def _check_pixel_classes(n_pix: int, n_pos: int, what: str) -> None:
    if n_pos == 0:
        raise UndefinedMetricError(
            f"{what}: the masks contain no defect pixel (all {n_pix} pixels are 0); pixel AUROC, AU-PRO and "
            "pixel F1 are undefined without a defect. Evaluate on a test set with defective images.")
    if n_pos == n_pix:
        raise UndefinedMetricError(f"{what}: every pixel is marked defective; pixel AUROC and AU-PRO need "
                                   "defect-free pixels too.")


def _exact_pixel_accumulator(masks: ArrayLike, maps: ArrayLike, fpr_limit: float, need_regions: bool,
                             keep_points: bool, what: str) -> tuple[_CurveAccumulator, int, int]:
    n_pix, n_pos = _count(masks, maps, what)
    _check_pixel_classes(n_pix, n_pos, what)
    n_neg = n_pix - n_pos
    neg = np.empty(n_neg, dtype=np.float32)
    pos = np.empty(n_pos, dtype=np.float32)
    w = np.empty(n_pos, dtype=np.float64) if need_regions else None
    i = j = n_regions = 0
    for m, s in _iter_images(masks, maps, what):
        k = int(np.count_nonzero(m))
        neg[i:i + m.size - k] = s[~m]
        pos[j:j + k] = s[m]
        if w is not None and k:
            w[j:j + k], r = _regions(m)
            n_regions += r
        i, j = i + m.size - k, j + k
    neg.sort()
    order = np.argsort(pos)
    pos = pos[order]
    cumw = None
    if w is not None:
        cumw = np.empty(n_pos + 1, dtype=np.float64)
        cumw[0] = 0.0
        np.cumsum(w[order], out=cumw[1:])
    del order, w
    acc = _CurveAccumulator(n_neg, n_pos, n_regions, fpr_limit, binned=False, keep_points=keep_points)
    for g in _exact_groups(neg, pos, cumw):
        acc.add(g)
    acc.add_candidate(n_pos, n_neg, float(min(neg[0], pos[0])))
    return acc, n_pix, n_regions


def _binned_pixel_accumulator(masks: ArrayLike, maps: ArrayLike, fpr_limit: float, bins: int,
                              need_regions: bool, keep_points: bool, what: str,
                              seed: int = 0) -> tuple[_CurveAccumulator, int, int]:
    if bins < 1:
        raise ValueError(f"{what}: bins={bins} must be at least 1.")
    n_images = _num_images(maps, what, "maps")
    per_image = max(1, -(-_EDGE_SAMPLE // max(n_images, 1)))
    rng = np.random.default_rng(seed)
    lo, hi, n_pix, n_pos, samples = np.inf, -np.inf, 0, 0, []
    for m, s in _iter_images(masks, maps, what):
        flat = s.reshape(-1)
        lo, hi = min(lo, float(flat.min())), max(hi, float(flat.max()))
        n_pix += flat.size
        n_pos += int(np.count_nonzero(m))
        samples.append(flat if flat.size <= per_image else flat[rng.integers(0, flat.size, per_image)])
    _check_pixel_classes(n_pix, n_pos, what)
    sample = np.concatenate(samples)
    del samples
    sample.sort()
    q = sample[np.linspace(0, sample.size - 1, bins + 1).round().astype(np.int64)]
    del sample
    edges = np.unique(np.concatenate([[lo], q, [hi]]).astype(np.float32))
    counter = _BinCounter(edges, need_regions)
    for m, s in _iter_images(masks, maps, what):
        counter.add(m, s)
    neg, pos, wsum, tied = counter.result()
    acc = _CurveAccumulator(n_pix - n_pos, n_pos, counter.n_regions, fpr_limit, binned=True,
                            keep_points=keep_points)
    acc.add(_binned_groups(edges, neg, pos, wsum, tied))
    return acc, n_pix, counter.n_regions


class _BinCounter:
    """Per-bin counts of defect-free pixels, defect pixels and region weights, one batch at a time.

    Scores are gathered into a buffer of :data:`_BATCH` values and sorted there; the counts then come from
    searching the bin edges in the sorted batch, which is much faster than searching every pixel among
    the edges.
    """

    def __init__(self, edges: np.ndarray, need_regions: bool, batch: int = _BATCH):
        self.lower = edges[: max(edges.size - 1, 1)]  # bin b is [edges[b], edges[b+1]), the top one closed
        nb = self.lower.size
        self.neg, self.pos = np.zeros(nb, np.int64), np.zeros(nb, np.int64)
        self.neg_tied, self.pos_tied = np.zeros(nb, np.int64), np.zeros(nb, np.int64)
        self.wsum = np.zeros(nb, np.float64) if need_regions else None
        self.n_regions = 0
        self.buf = np.empty(batch, np.float32)
        self.fill = 0
        self.pos_scores: list[np.ndarray] = []
        self.pos_weights: list[np.ndarray] = []
        self.pos_fill = 0

    def add(self, defect: np.ndarray, scores: np.ndarray) -> None:
        neg = scores[~defect]
        if self.fill + neg.size > self.buf.size:
            self._flush_neg()
        if neg.size > self.buf.size:
            neg.sort()
            self._count(neg, self.neg, self.neg_tied)
        else:
            self.buf[self.fill:self.fill + neg.size] = neg
            self.fill += neg.size
        if defect.any():
            self.pos_scores.append(scores[defect])
            if self.wsum is not None:
                w, r = _regions(defect)
                self.pos_weights.append(w)
                self.n_regions += r
            self.pos_fill += self.pos_scores[-1].size
            if self.pos_fill >= self.buf.size // 4:  # defect pixels also carry weights and an argsort
                self._flush_pos()

    def _count(self, srt: np.ndarray, counts: np.ndarray, tied: np.ndarray,
               cumw: np.ndarray | None = None) -> None:
        left = np.searchsorted(srt, self.lower, side="left")
        counts += np.diff(left, append=srt.size)
        tied += np.searchsorted(srt, self.lower, side="right") - left
        if cumw is not None:
            self.wsum += np.diff(cumw[left], append=cumw[-1])

    def _flush_neg(self) -> None:
        if self.fill:
            srt = self.buf[: self.fill]
            srt.sort()
            self._count(srt, self.neg, self.neg_tied)
            self.fill = 0

    def _flush_pos(self) -> None:
        if not self.pos_scores:
            return
        s = np.concatenate(self.pos_scores)
        order = np.argsort(s)
        cumw = None
        if self.wsum is not None:
            cumw = np.zeros(s.size + 1, np.float64)
            np.cumsum(np.concatenate(self.pos_weights)[order], out=cumw[1:])
        self._count(s[order], self.pos, self.pos_tied, cumw)
        self.pos_scores, self.pos_weights, self.pos_fill = [], [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """``(neg, pos, wsum, tied)`` per bin; ``tied`` marks bins whose pixels all equal the lower edge."""
        self._flush_neg()
        self._flush_pos()
        tied = (self.neg_tied + self.pos_tied) == (self.neg + self.pos)
        return self.neg, self.pos, self.wsum, tied


def _pixel_accumulator(masks: ArrayLike, maps: ArrayLike, fpr_limit: float, method: str, bins: int,
                       need_regions: bool, keep_points: bool,
                       what: str) -> tuple[_CurveAccumulator, int, int]:
    if method not in _METHODS:
        raise ValueError(f"{what}: method={method!r} is not one of {_METHODS}.")
    fpr_limit = _check_limit(fpr_limit)
    if method == "auto":
        shape = getattr(maps, "shape", None)
        n_pix = (int(np.prod(tuple(shape))) if shape is not None
                 else sum(int(np.prod(tuple(getattr(x, "shape", np.shape(x))))) for x in maps))
        method = "exact" if n_pix <= EXACT_PIXEL_LIMIT else "binned"
    if method == "exact":
        return _exact_pixel_accumulator(masks, maps, fpr_limit, need_regions, keep_points, what)
    return _binned_pixel_accumulator(masks, maps, fpr_limit, bins, need_regions, keep_points, what)


def pixel_metrics(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3, method: str = "auto",
                  bins: int = DEFAULT_BINS, regions: bool = True) -> PixelMetrics:
    """Pixel AUROC, AU-PRO and best pixel F1 in one pass over the maps.

    Args:
        masks: ground truth ``(N, H, W)`` / ``(N, 1, H, W)`` or a sequence of ``(H_i, W_i)``;
            non-zero = defect.
        maps: anomaly maps of the same shapes (higher = more anomalous).
        fpr_limit: upper FPR limit of the AU-PRO integral, in (0, 1].
        method: ``"exact"``, ``"binned"`` or ``"auto"`` (exact up to :data:`EXACT_PIXEL_LIMIT` pixels).
        bins: number of quantile bins when binned.
        regions: label GT regions (needed for AU-PRO only; False skips it and sets ``aupro`` to NaN).
    """
    what = "pixel_metrics"
    acc, n_pix, n_regions = _pixel_accumulator(masks, maps, fpr_limit, method, bins, regions, False, what)
    aupro_value = acc.aupro() if regions else math.nan
    return PixelMetrics(auroc=acc.auroc(), aupro=aupro_value, f1=acc.best_f1, threshold=acc.best_thr,
                        exact=not acc.binned, auroc_bound=acc.roc_slack,
                        aupro_bound=acc.pro_slack / acc.limit if regions else math.nan,
                        f1_bound=max(acc.f1_ceiling - acc.best_f1, 0.0) if acc.binned else 0.0,
                        fpr_limit=acc.limit, n_pixels=n_pix, n_defect_pixels=acc.n_pos, n_regions=n_regions)


def pixel_auroc(masks: ArrayLike, maps: ArrayLike, method: str = "auto", bins: int = DEFAULT_BINS) -> float:
    """AUROC over all pixels of all images pooled. Shapes as in :func:`pixel_metrics`."""
    return pixel_metrics(masks, maps, method=method, bins=bins, regions=False).auroc


def pixel_best_f1(masks: ArrayLike, maps: ArrayLike, method: str = "auto",
                  bins: int = DEFAULT_BINS) -> tuple[float, float]:
    """Best F1 over all pixels pooled and its threshold (``score >= threshold``): ``(f1, threshold)``."""
    pm = pixel_metrics(masks, maps, method=method, bins=bins, regions=False)
    return pm.f1, pm.threshold


def pixel_f1_at_threshold(masks: ArrayLike, maps: ArrayLike, threshold: float) -> float:
    """Pixel F1 when ``score >= threshold`` is predicted defective (streams one image at a time)."""
    tp = fp = n_pos = 0
    thr = np.float32(threshold)
    for m, s in _iter_images(masks, maps, "pixel_f1_at_threshold"):
        pred = s >= thr
        tp += int(np.count_nonzero(pred & m))
        fp += int(np.count_nonzero(pred & ~m))
        n_pos += int(np.count_nonzero(m))
    if n_pos == 0:
        raise UndefinedMetricError("pixel_f1_at_threshold: the masks contain no defect pixel; F1 is "
                                   "undefined.")
    return _f1(tp, fp, n_pos)


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3, method: str = "auto",
          bins: int = DEFAULT_BINS) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD protocol).

    Args:
        masks: ``(N, H, W)`` ground truth, non-zero = defect; regions are its 8-connected components.
        maps: ``(N, H, W)`` anomaly maps.
        fpr_limit: integration limit in (0, 1]; the area is divided by it, so the result lies in [0, 1].
    """
    return pixel_metrics(masks, maps, fpr_limit=fpr_limit, method=method, bins=bins).aupro


def pro_curve(masks: ArrayLike, maps: ArrayLike, fpr_limit: float | None = None, method: str = "auto",
              bins: int = DEFAULT_BINS) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve ``(fpr, pro)``, each ``(K,)``, ascending from (0, 0) to (1, 1), ties merged.

    With ``fpr_limit`` the curve stops at the limit, with PRO interpolated there (the integrated part).
    The exact curve has up to two points per distinct defect-free score; for plots of large sets use
    ``method="binned"`` with e.g. ``bins=2000``.
    """
    limit = 1.0 if fpr_limit is None else _check_limit(fpr_limit)
    acc, _, _ = _pixel_accumulator(masks, maps, limit, method, bins, True, True, "pro_curve")
    if acc.n_regions == 0:
        raise UndefinedMetricError("pro_curve: the masks contain no defect region.")
    x, y = acc.curve("pro")
    if fpr_limit is not None:
        k = int(np.searchsorted(x, limit, side="right"))
        if k < x.size and x[k - 1] < limit:
            y_lim = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
            x, y = np.append(x[:k], limit), np.append(y[:k], y_lim)
        else:
            x, y = x[:k], y[:k]
    return x, y


# --------------------------------------------------------------------------------------------------
# Everything at once


def compute_metrics(labels: ArrayLike, scores: ArrayLike, masks: ArrayLike | None = None,
                    maps: ArrayLike | None = None, fpr_limit: float = 0.3, method: str = "auto",
                    bins: int = DEFAULT_BINS, allow_undefined: bool = False) -> dict[str, float]:
    """Image AUROC and F1-max, and (when masks and maps are given) pixel AUROC, AU-PRO and pixel F1-max.

    Args:
        labels: ``(N,)`` image labels (non-zero = defective); scores: ``(N,)`` image scores.
        masks, maps: ``(N, H, W)`` or ``(N, 1, H, W)`` ground truth and anomaly maps (optional).
        fpr_limit, method, bins: see :func:`pixel_metrics`.
        allow_undefined: return NaN (with a warning) for metrics that a single-class set leaves undefined,
            instead of raising ``ValueError``.

    Returns:
        ``image_auroc``, ``image_f1``, ``image_threshold`` and, with maps, ``pixel_auroc``, ``aupro``,
        ``pixel_f1``, ``pixel_threshold`` and ``pixel_bound`` (the larger of the AUROC and AU-PRO binning
        error bounds; 0 when exact). F1 values are the best over all thresholds of this set (F1-max).
    """
    out: dict[str, float] = {}
    try:
        acc = _image_accumulator(labels, scores, "compute_metrics (image level)")
        out.update(image_auroc=acc.auroc(), image_f1=acc.best_f1, image_threshold=acc.best_thr)
    except UndefinedMetricError as err:
        if not allow_undefined:
            raise
        warnings.warn(f"image metrics set to NaN: {err}", stacklevel=2)
        out.update(image_auroc=math.nan, image_f1=math.nan, image_threshold=math.nan)
    if masks is None or maps is None:
        return out
    try:
        pm = pixel_metrics(masks, maps, fpr_limit=fpr_limit, method=method, bins=bins)
        out.update(pixel_auroc=pm.auroc, aupro=pm.aupro, pixel_f1=pm.f1, pixel_threshold=pm.threshold,
                   pixel_bound=max(pm.auroc_bound, pm.aupro_bound))
    except UndefinedMetricError as err:
        if not allow_undefined:
            raise
        warnings.warn(f"pixel metrics set to NaN: {err}", stacklevel=2)
        out.update(pixel_auroc=math.nan, aupro=math.nan, pixel_f1=math.nan, pixel_threshold=math.nan,
                   pixel_bound=math.nan)
    return out


__all__ = [
    "DEFAULT_BINS", "EXACT_PIXEL_LIMIT", "PixelMetrics", "UndefinedMetricError", "aupro", "best_f1",
    "compute_metrics", "f1_at_threshold", "image_auroc", "pixel_auroc", "pixel_best_f1",
    "pixel_f1_at_threshold", "pixel_metrics", "pro_curve", "roc_curve_points", "threshold_at_best_f1",
]
