"""Figures: the right panels, valid PNGs written only where asked, and no failure on small edge cases."""

from __future__ import annotations

import doctest

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from flowlib import config, viz

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def figures_tmp(tmp_path, monkeypatch):
    """Send ``config.figures_dir`` to a temporary folder."""

    def figures_dir(subdir=None):
        path = tmp_path / "figures" / subdir if subdir else tmp_path / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path

    monkeypatch.setattr(config, "figures_dir", figures_dir)
    return tmp_path / "figures"


def _batch(n: int = 5, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, 3, size, size)).astype(np.float32)
    maps = rng.random((n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    masks[n // 2:, 8:16, 10:20] = 1
    maps += 2 * masks
    return images, maps, masks


def test_save_figure_writes_a_png_atomically(figures_tmp) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = viz.save_figure(fig, "line", subdir="00_test")
    assert path == figures_tmp / "00_test" / "line.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert viz.save_figure(fig, "line.png", subdir="00_test") == path  # suffix optional, overwrite is fine
    assert sorted(p.name for p in path.parent.iterdir()) == ["line.png"]  # no temporary file left behind
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50


def test_save_figure_is_reproducible(figures_tmp) -> None:
    fig = viz.plot_overlays(*_batch(2))
    first = viz.save_figure(fig, "a").read_bytes()
    second = viz.save_figure(fig, "b").read_bytes()
    assert first == second  # no timestamp or version in the file


def test_save_figure_rejects_bad_names(figures_tmp) -> None:
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="PNG only"):
        viz.save_figure(fig, "plot.svg")
    with pytest.raises(ValueError, match="subdir"):
        viz.save_figure(fig, "sub/plot")


@pytest.mark.parametrize("n, ncols, colorbar", [(5, 3, True), (1, 4, True), (4, 4, False)])
def test_plot_overlays_has_one_panel_per_image(n: int, ncols: int, colorbar: bool) -> None:
    images, maps, masks = _batch(n)
    fig = viz.plot_overlays(images, maps, masks, titles=[f"img {i}" for i in range(n)],
                            scores=maps.max((1, 2)), ncols=ncols, colorbar=colorbar)
    assert len(fig.axes) == n + colorbar
    panels = fig.axes[:n]
    assert [len(ax.images) for ax in panels] == [2] * n  # the image and the heat map
    assert panels[0].get_title().startswith("img 0\nscore")
    assert masks[-1].any() and panels[-1].collections  # the last image is defective: its contour is drawn


def test_plot_overlays_channels_last_torch_no_mask_and_other_map_size() -> None:
    images, maps, _ = _batch(3)
    hwc = torch.as_tensor(images).permute(0, 2, 3, 1)
    low_res = torch.as_tensor(maps[:, None, ::4, ::4])  # (N, 1, 8, 8) drawn over 32x32 images
    fig = viz.plot_overlays(hwc, low_res, masks=None)
    assert len(fig.axes) == 4
    heat = fig.axes[0].images[1]
    assert heat.get_extent() == [-0.5, 31.5, 31.5, -0.5]
    assert heat.cmap.name == viz.ANOMALY_CMAP


def test_plot_overlays_constant_maps_and_full_masks() -> None:
    images, _, _ = _batch(2)
    fig = viz.plot_overlays(images, np.zeros((2, 32, 32)), np.ones((2, 32, 32)))
    assert len(fig.axes) == 3


def test_plot_overlays_rejects_mismatched_lengths() -> None:
    images, maps, _ = _batch(3)
    with pytest.raises(ValueError, match="3 images but 2 maps"):
        viz.plot_overlays(images, maps[:2])


def test_plot_samples_titles_and_contours() -> None:
    images, _, masks = _batch(3)
    dataset = [{"image": torch.as_tensor(images[i]), "mask": torch.as_tensor(masks[i][None]).float(),
                "defect": "good" if not masks[i].any() else "crack", "category": "demo"} for i in range(3)]
    fig = viz.plot_samples(dataset, [0, 2], ncols=4)
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["demo / good", "demo / crack"]
    assert not fig.axes[0].collections and fig.axes[1].collections


def test_plot_score_histogram() -> None:
    labels = np.array([0] * 20 + [1] * 10)
    scores = np.random.default_rng(0).normal(size=30) + labels
    fig = viz.plot_score_histogram(labels, scores, title="scores", threshold=0.5)
    (ax,) = fig.axes
    assert ax.get_title() == "scores"
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["good (n=20)", "defective (n=10)"]
    # good images only, drawn into an existing axes
    fig2, ax2 = plt.subplots(1, 2)
    assert viz.plot_score_histogram(np.zeros(5), np.arange(5.0), ax=ax2[1]) is fig2


def test_plot_roc_curves() -> None:
    rng = np.random.default_rng(1)
    labels = np.array([0] * 30 + [1] * 30)
    curves = {"good model": (labels, labels + rng.normal(size=60) * 0.5),
              "chance": (labels, rng.normal(size=60))}
    fig = viz.plot_roc_curves(curves, title="ROC")
    (ax,) = fig.axes
    assert len(ax.lines) == 3  # chance diagonal + two curves
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[0].startswith("good model (AUROC 0.9")


def test_plot_pro_curve_reports_the_metric_value() -> None:
    from flowlib.metrics import aupro

    _, maps, masks = _batch(6)
    maps = maps + np.random.default_rng(2).normal(size=maps.shape).astype(np.float32)
    fig = viz.plot_pro_curve(masks, maps, fpr_limit=0.3, label="demo")
    (ax,) = fig.axes
    legend = ax.get_legend().get_texts()[0].get_text()
    assert legend == f"demo (AU-PRO@0.3 {aupro(masks, maps):.3f})"
    fig2, ax2 = plt.subplots()
    viz.plot_pro_curve(masks, maps, ax=ax2)
    viz.plot_pro_curve(masks, maps * 0 + 1, ax=ax2, label="constant")
    assert len(ax2.lines) == 4  # two curves and two limit markers


def test_plotting_leaves_global_style_alone() -> None:
    before = dict(matplotlib.rcParams)
    images, maps, masks = _batch(2)
    viz.plot_overlays(images, maps, masks)
    viz.plot_score_histogram([0, 1], [0.1, 0.9])
    assert dict(matplotlib.rcParams) == before


def test_docstring_example_runs() -> None:
    assert doctest.testmod(viz).failed == 0
