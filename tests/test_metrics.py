"""Metrics against independent computations: scikit-learn, a brute-force MVTec AD PRO, hand-derived cases."""

from __future__ import annotations

import doctest
import time
import tracemalloc

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

from flowlib import metrics as M

# --------------------------------------------------------------------------------------------------
# Fixtures and independent references


def _image_data(seed: int, n: int = 300, decimals: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(n,)`` and scores ``(n,)`` with many ties (rounded) and overlapping classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.normal(size=n) + 1.2 * labels, decimals)
    return labels, scores


def _pixel_data(seed: int, n: int = 8, size: int = 24, levels: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Masks ``(n, size, size)`` with several regions (some touching only at a corner) and float32 maps
    quantised to ``levels`` values so that ties occur."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n // 2, n):  # the first half are good images
        for _ in range(rng.integers(1, 4)):
            h, w = rng.integers(1, 7, 2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            masks[i, y:y + h, x:x + w] = 255
    maps = rng.random((n, size, size)) + 0.6 * (masks > 0) * rng.random((n, 1, 1))
    maps = (np.floor(maps * levels) / levels).astype(np.float32)
    return masks, maps


def _brute_aupro(masks: np.ndarray, maps: np.ndarray, limit: float, eight: bool = True) -> float:
    """PRO at every distinct score by explicit counting, integrated with interpolation at ``limit``."""
    structure = np.ones((3, 3)) if eight else None
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m != 0, structure=structure)
        regions += [(i, lab == k) for k in range(1, n + 1)]
    ok = masks == 0
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & ok).sum() / ok.sum())
        pros.append(np.mean([pred[i][r].mean() for i, r in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2.0
    return area / limit


def _sklearn_best_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))
    return float(f1.max())


# --------------------------------------------------------------------------------------------------
# Image level


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_sklearn_with_ties(seed: int) -> None:
    labels, scores = _image_data(seed)
    assert M.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_accepts_torch_and_nonbinary_labels() -> None:
    labels, scores = _image_data(3)
    expected = roc_auc_score(labels, scores)
    assert M.image_auroc(torch.as_tensor(labels * 7), torch.as_tensor(scores)) == pytest.approx(expected)
    assert M.image_auroc(labels[:, None], scores[:, None]) == pytest.approx(expected)


def test_image_auroc_extremes() -> None:
    labels = np.array([0, 0, 1, 1])
    assert M.image_auroc(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert M.image_auroc(labels, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert M.image_auroc(labels, [1.0, 1.0, 1.0, 1.0]) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_best_f1_matches_sklearn_and_threshold_realises_it(seed: int) -> None:
    labels, scores = _image_data(seed, decimals=seed % 3)
    f1, thr = M.best_f1(labels, scores)
    assert f1 == pytest.approx(_sklearn_best_f1(labels, scores), abs=1e-12)
    assert thr in set(scores.tolist())  # a real score: the lowest one predicted defective
    assert M.f1_at_threshold(labels, scores, thr) == pytest.approx(f1, abs=1e-12)
    assert f1_score(labels, scores >= thr) == pytest.approx(f1, abs=1e-12)


def test_best_f1_when_some_defects_score_below_every_good_image() -> None:
    labels = np.array([1, 0, 0, 1, 1])
    scores = np.array([-5.0, 0.0, 0.1, 0.2, 0.3])
    f1, thr = M.best_f1(labels, scores)
    assert f1 == pytest.approx(_sklearn_best_f1(labels, scores))
    assert M.f1_at_threshold(labels, scores, thr) == pytest.approx(f1)


def test_threshold_chosen_on_validation_applies_to_test() -> None:
    val_labels, val_scores = _image_data(10)
    test_labels, test_scores = _image_data(11)
    thr = M.threshold_at_best_f1(val_labels, val_scores)
    got = M.f1_at_threshold(test_labels, test_scores, thr)
    assert got == pytest.approx(f1_score(test_labels, test_scores >= thr))
    assert got <= M.best_f1(test_labels, test_scores)[0] + 1e-12


def test_roc_curve_points_span_the_square_and_integrate_to_auroc() -> None:
    labels, scores = _image_data(4)
    fpr, tpr = M.roc_curve_points(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_single_class_raises_a_clear_error() -> None:
    with pytest.raises(M.UndefinedMetricError, match="both good"):
        M.image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="single class"):
        M.best_f1([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least one defective"):
        M.f1_at_threshold([0, 0], [0.1, 0.2], 0.15)


def test_bad_image_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        M.image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        M.image_auroc([0, 1], [0.1, np.nan])


# --------------------------------------------------------------------------------------------------
# Pixel AUROC and F1


@pytest.mark.parametrize("method", ["exact", "binned"])
@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_and_f1_match_sklearn(method: str, seed: int) -> None:
    masks, maps = _pixel_data(seed)
    y, s = masks.ravel() != 0, maps.ravel()
    # few distinct scores: every binned bin holds a single value, so binned is exact here too
    assert M.pixel_auroc(masks, maps, method=method) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    f1, thr = M.pixel_best_f1(masks, maps, method=method)
    assert f1 == pytest.approx(_sklearn_best_f1(y, s), abs=1e-12)
    assert M.pixel_f1_at_threshold(masks, maps, thr) == pytest.approx(f1, abs=1e-12)


def test_pixel_metrics_with_a_tie_larger_than_a_processing_chunk() -> None:
    """Maps where most good pixels share one score (a saturated map) across a whole chunk of the exact
    sweep (2**16 scores): this once made the sweep hand an empty group to the F1 search."""
    rng = np.random.default_rng(0)
    maps = np.full((3, 160, 160), 0.5, dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=np.uint8)
    masks[0, 40:60, 40:70] = 1
    maps[0, 40:60, 40:70] = rng.uniform(0.3, 0.9, (20, 30))  # defects: some below, most above the tie
    maps[1, :10] = rng.uniform(0.0, 0.5, (10, 160))  # a few good pixels below the tie
    y, sc = masks.ravel() != 0, maps.ravel()
    assert np.count_nonzero(~y & (sc == 0.5)) > 2**16 + 10
    assert M.pixel_auroc(masks, maps, method="exact") == pytest.approx(roc_auc_score(y, sc), abs=1e-12)
    f1, thr = M.pixel_best_f1(masks, maps, method="exact")
    assert f1 == pytest.approx(_sklearn_best_f1(y, sc), abs=1e-12)
    assert M.pixel_f1_at_threshold(masks, maps, thr) == pytest.approx(f1, abs=1e-12)
    assert 0.0 < M.aupro(masks, maps, method="exact") < 1.0


def test_pixel_inputs_torch_4d_and_lists_agree() -> None:
    masks, maps = _pixel_data(5)
    ref = M.pixel_metrics(masks, maps)
    as_torch = M.pixel_metrics(torch.as_tensor(masks)[:, None], torch.as_tensor(maps)[:, None])
    as_lists = M.pixel_metrics(list(masks), list(maps.astype(np.float64)))
    for other in (as_torch, as_lists):
        got = (other.auroc, other.aupro, other.f1)
        assert got == pytest.approx((ref.auroc, ref.aupro, ref.f1), abs=1e-12)


def test_images_of_different_sizes() -> None:
    masks, maps = _pixel_data(6)
    small_m, small_s = masks[-1, :10, :13], maps[-1, :10, :13]
    got = M.pixel_auroc(list(masks) + [small_m], list(maps) + [small_s])
    y = np.concatenate([masks.ravel(), small_m.ravel()]) != 0
    s = np.concatenate([maps.ravel(), small_s.ravel()])
    assert got == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_pixel_degenerate_and_bad_inputs() -> None:
    masks, maps = _pixel_data(0)
    with pytest.raises(M.UndefinedMetricError, match="no defect pixel"):
        M.aupro(np.zeros_like(masks), maps)
    with pytest.raises(M.UndefinedMetricError, match="defect-free"):
        M.pixel_auroc(np.ones_like(masks), maps)
    with pytest.raises(ValueError, match="resize the anomaly maps"):
        M.pixel_auroc(masks, maps[:, :-1])
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"maps\[0\] contains NaN"):
        M.aupro(masks, bad)
    with pytest.raises(ValueError, match="single image"):
        M.aupro(masks[0], maps[0])
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="method"):
        M.aupro(masks, maps, method="fast")


# --------------------------------------------------------------------------------------------------
# AU-PRO


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force(seed: int, limit: float) -> None:
    masks, maps = _pixel_data(seed)
    expected = _brute_aupro(masks, maps, limit)
    assert M.aupro(masks, maps, limit, method="exact") == pytest.approx(expected, abs=1e-9)
    assert M.aupro(masks, maps, limit, method="binned") == pytest.approx(expected, abs=1e-9)


def test_aupro_continuous_scores_match_brute_force() -> None:
    rng = np.random.default_rng(7)
    masks, _ = _pixel_data(7, n=4, size=16)
    maps = (rng.random(masks.shape) + 0.5 * (masks > 0)).astype(np.float32)  # all scores distinct
    assert M.aupro(masks, maps, method="exact") == pytest.approx(_brute_aupro(masks, maps, 0.3), abs=1e-9)


def test_regions_are_eight_connected() -> None:
    masks = np.zeros((2, 12, 12), dtype=np.uint8)
    masks[1, 2:5, 2:5] = 1
    masks[1, 5:8, 5:8] = 1  # touches the first square at one corner: one region with 8-connectivity
    masks[1, 9:11, 1:3] = 1
    rng = np.random.default_rng(0)
    maps = (rng.random(masks.shape) + 0.8 * masks * (np.arange(12) / 12)[None, :, None]).astype(np.float32)
    eight = _brute_aupro(masks, maps, 0.3, eight=True)
    four = _brute_aupro(masks, maps, 0.3, eight=False)
    assert abs(eight - four) > 1e-3  # the case can tell the two apart
    assert M.aupro(masks, maps) == pytest.approx(eight, abs=1e-9)
    assert M.pixel_metrics(masks, maps).n_regions == 2


def test_aupro_perfect_and_constant_maps() -> None:
    masks, _ = _pixel_data(1)
    assert M.aupro(masks, (masks > 0).astype(np.float32)) == pytest.approx(1.0, abs=1e-12)
    for method in ("exact", "binned"):
        assert M.aupro(masks, np.full(masks.shape, 0.7), method=method) == pytest.approx(0.15, abs=1e-12)
        assert M.aupro(masks, np.zeros(masks.shape), fpr_limit=1.0, method=method) == pytest.approx(0.5)


def test_aupro_is_invariant_to_strictly_monotone_transforms() -> None:
    masks, maps = _pixel_data(2)  # values k/60: distinct after every transform below, also in float32
    ref = M.aupro(masks, maps)
    for f in (lambda x: 3 * x - 7, np.exp, lambda x: np.sqrt(x + 0.1), lambda x: -1.0 / (x + 1)):
        assert M.aupro(masks, f(maps.astype(np.float64))) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("method", ["exact", "binned"])
def test_aupro_stripes(method: str) -> None:
    """400x7 image, scores rising along the rows: PRO tracks FPR, so the area up to 1/3 is 1/6."""
    scores = (np.arange(2800) / 2800.0).reshape(1, 400, 7)
    one = np.zeros((1, 400, 7))
    one[0, :, 3] = 1
    three = np.zeros((1, 400, 7))
    three[0, :, [1, 3, 5]] = 1
    for masks, maps in ((one, scores), (three, scores),
                        (np.concatenate([one, three]), np.concatenate([scores, scores]))):
        # the staircase meets the diagonal at every row end; the cut at 1/3 falls inside a row (1e-6)
        assert M.aupro(masks, maps, fpr_limit=1 / 3, method=method) == pytest.approx(1 / 6, abs=2e-6)
    assert M.pixel_metrics(three, scores).n_regions == 3


@pytest.mark.parametrize("seed", range(6))
def test_aupro_never_exceeds_one(seed: int) -> None:
    masks, maps = _pixel_data(seed, levels=4 + seed)
    maps = maps + 5.0 * (masks > 0)  # defects far above: PRO reaches 1 at FPR 0
    for limit in (0.01, 0.3, 1.0):
        value = M.aupro(masks, maps, limit)
        assert 0.0 <= value <= 1.0
    assert M.aupro(masks, maps, 0.01) == pytest.approx(1.0, abs=1e-12)


def test_aupro_grows_with_the_limit_for_a_better_than_chance_map() -> None:
    masks, maps = _pixel_data(3)
    values = [M.aupro(masks, maps, limit) for limit in (0.05, 0.3, 1.0)]
    assert values[0] < values[1] < values[2]


def test_pro_curve_shape_and_area() -> None:
    masks, maps = _pixel_data(4)
    fpr, pro = M.pro_curve(masks, maps)
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    cut_fpr, cut_pro = M.pro_curve(masks, maps, fpr_limit=0.3)
    assert cut_fpr[-1] == pytest.approx(0.3) and cut_fpr.max() <= 0.3 + 1e-12
    assert np.trapezoid(cut_pro, cut_fpr) / 0.3 == pytest.approx(M.aupro(masks, maps), abs=1e-12)
    assert np.trapezoid(pro, fpr) == pytest.approx(M.aupro(masks, maps, fpr_limit=1.0), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Binned approximation


def _continuous_set(n: int = 40, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    masks[n // 2:, 10:30, 20:28] = 1
    masks[n // 2::3, 40:44, 40:60] = 1
    maps = rng.gamma(2.0, size=masks.shape).astype(np.float32) + 2.0 * masks * rng.random((n, 1, 1))
    return masks, maps


@pytest.mark.parametrize("bins", [16, 256, 4096])
def test_binned_stays_within_its_bound(bins: int) -> None:
    masks, maps = _continuous_set()
    exact = M.pixel_metrics(masks, maps, method="exact")
    binned = M.pixel_metrics(masks, maps, method="binned", bins=bins)
    assert exact.exact and not binned.exact
    assert binned.auroc_bound > 0 and binned.aupro_bound > 0  # continuous scores: the bins are not ties
    assert abs(binned.auroc - exact.auroc) <= binned.auroc_bound + 1e-12
    assert abs(binned.aupro - exact.aupro) <= binned.aupro_bound + 1e-12
    assert binned.f1 <= exact.f1 + 1e-12 and exact.f1 <= binned.f1 + binned.f1_bound + 1e-12
    # quantile bins: each holds ~1/bins of the pixels, so the bounds shrink like 1/bins
    assert binned.auroc_bound < 2.0 / bins and binned.aupro_bound < 8.0 / bins


def test_default_binning_is_close_to_exact() -> None:
    masks, maps = _continuous_set(n=60, size=96, seed=1)
    exact = M.pixel_metrics(masks, maps, method="exact")
    binned = M.pixel_metrics(masks, maps, method="binned")
    assert binned.aupro_bound < 1e-4 and binned.auroc_bound < 1e-4
    assert binned.aupro == pytest.approx(exact.aupro, abs=1e-4)
    assert binned.auroc == pytest.approx(exact.auroc, abs=1e-4)


def test_auto_switches_to_binned_above_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    masks, maps = _pixel_data(0)
    assert M.pixel_metrics(masks, maps).exact
    monkeypatch.setattr(M, "EXACT_PIXEL_LIMIT", masks.size - 1)
    assert not M.pixel_metrics(masks, maps).exact


@pytest.mark.slow  # about 5 s alone, more on a busy machine
def test_peak_memory_on_20_million_pixels() -> None:
    """Both methods on 20 M pixels stay at a few bytes per pixel (the inputs themselves not counted)."""
    n, size = 305, 256  # 19.99 M pixels, 1.1 % defective, 458 regions
    rng = np.random.default_rng(0)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    masks[::2, 100:140, 60:90] = 1
    masks[1::4, 10:20, 200:250] = 1
    maps = rng.random(masks.shape, dtype=np.float32)
    maps += 0.4 * masks
    peaks, results = {}, {}
    for method in ("binned", "exact"):
        tracemalloc.start()
        start = time.perf_counter()
        results[method] = M.pixel_metrics(masks, maps, method=method)
        peaks[method] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{method}: {time.perf_counter() - start:.1f} s, peak {peaks[method] / 2**20:.0f} MiB "
              f"({peaks[method] / masks.size:.2f} B/pixel)")
    assert peaks["binned"] < 80 * 2**20  # independent of the pixel count: one batch, the bins, the sample
    assert peaks["exact"] < 5.0 * masks.size  # 4 B per defect-free pixel plus the defect pixels
    assert results["binned"].aupro == pytest.approx(results["exact"].aupro, abs=1e-4)
    assert results["binned"].auroc == pytest.approx(results["exact"].auroc, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# compute_metrics


def test_compute_metrics_agrees_with_the_single_functions() -> None:
    masks, maps = _pixel_data(8)
    labels = (masks.reshape(len(masks), -1) > 0).any(axis=1).astype(int)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    out = M.compute_metrics(torch.as_tensor(labels), torch.as_tensor(scores),
                            torch.as_tensor(masks)[:, None], torch.as_tensor(maps)[:, None])
    assert {"image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1"} <= set(out)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel() > 0, maps.ravel()))
    assert out["aupro"] == pytest.approx(_brute_aupro(masks, maps, 0.3), abs=1e-9)
    assert out["image_f1"] == pytest.approx(_sklearn_best_f1(labels, scores))
    assert out["pixel_f1"] == pytest.approx(_sklearn_best_f1(masks.ravel() > 0, maps.ravel()))
    assert out["pixel_bound"] == 0.0
    assert set(M.compute_metrics(labels, scores)) == {"image_auroc", "image_f1", "image_threshold"}


def test_compute_metrics_undefined_metrics() -> None:
    masks, maps = _pixel_data(0)
    good = np.zeros_like(masks)
    labels, scores = np.zeros(len(masks)), maps.reshape(len(maps), -1).max(axis=1)
    with pytest.raises(ValueError, match="single class"):
        M.compute_metrics(labels, scores, good, maps)
    with pytest.warns(UserWarning, match="set to NaN"):
        out = M.compute_metrics(labels, scores, good, maps, allow_undefined=True)
    assert all(np.isnan(out[k]) for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1"))


def test_docstring_example_runs() -> None:
    assert doctest.testmod(M).failed == 0
