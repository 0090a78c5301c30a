"""The built-in demo benchmark: determinism, counts, exact masks, atomic generation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowlib.data import DEFECT_KINDS, DEMO_CATEGORIES, demo, ensure_demo_data, load_dataset, load_union

N_TEST = demo.N_TEST_GOOD + demo.N_PER_DEFECT * len(DEFECT_KINDS)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("demo_data") / "demo"
    start = time.process_time()
    ensure_demo_data(root, seed=0)
    return root, time.process_time() - start


@pytest.fixture(scope="module")
def coffee() -> list[demo.DemoImage]:
    return demo.render_category("coffee", seed=0)


def test_generation_is_fast(generated):
    root, cpu_seconds = generated
    print(f"demo generation: {cpu_seconds:.1f} s CPU")
    # about 4 s of CPU on one core; wall time depends on how busy the machine is
    assert cpu_seconds < 15


def test_layout_and_counts(generated):
    root, _ = generated
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["version"] == demo.DEMO_VERSION and manifest["seed"] == 0
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left
    for cat in DEMO_CATEGORIES:
        train = load_dataset("demo", cat, "train", root=root, image_size=64)
        test = load_dataset("demo", cat, "test", root=root, image_size=64)
        assert len(train) == demo.N_TRAIN >= 60 and set(train.labels) == {0}
        assert len(test) == N_TEST == 60 and sum(test.labels) == 40
        for kind in DEFECT_KINDS:
            assert test.defects.count(kind) == demo.N_PER_DEFECT
            assert len(list((root / cat / "ground_truth" / kind).glob("*_mask.png"))) == demo.N_PER_DEFECT
        assert test.defects.count("good") == demo.N_TEST_GOOD >= 20
        with Image.open(root / cat / "train" / "good" / "000.png") as img:
            assert img.size == (256, 256)
            assert img.mode == ("RGB" if cat == "coffee" else "L")  # grey textures stay 1-channel


def test_masks_empty_for_good_and_present_for_defects(generated):
    root, _ = generated
    test = load_dataset("demo", "gravel", "test", root=root, image_size=None)
    for i in range(len(test)):
        s = test[i]
        assert s["image"].shape == (3, 256, 256)
        area = int(s["mask"].sum())
        if s["label"] == 0:
            assert area == 0
        else:
            assert demo.MIN_DEFECT_PIXELS <= area <= 0.08 * 256 * 256  # visible, not giant


def test_files_match_in_memory_render(generated, coffee):
    root, _ = generated
    for item in coffee:
        on_disk = np.asarray(Image.open(root / "coffee" / item.relpath))
        assert np.array_equal(on_disk, item.image), item.relpath
        if item.mask is not None:
            mask_path = root / "coffee" / "ground_truth" / item.defect / f"{item.index:03d}_mask.png"
            mask = np.asarray(Image.open(mask_path))
            assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask > 0, item.mask)
    brick = demo.render_category("brick", seed=0)[demo.N_TRAIN + demo.N_TEST_GOOD]
    on_disk = np.asarray(Image.open(root / "brick" / brick.relpath))
    assert np.array_equal(on_disk, brick.image[..., 0]) and np.ptp(brick.image.astype(int), axis=2).max() == 0


def test_masks_are_exact(coffee):
    t = demo.CHANGE_THRESHOLD
    defects = [d for d in coffee if d.mask is not None]
    assert len(defects) == 40 and {d.defect for d in defects} == set(DEFECT_KINDS)
    contrasts = []
    for d in defects:
        diff = np.abs(d.image.astype(int) - d.clean.astype(int)).max(axis=2)
        assert d.mask.sum() >= demo.MIN_DEFECT_PIXELS
        assert np.array_equal(d.image[~d.mask], d.clean[~d.mask])  # outside the mask: untouched
        assert (diff[d.mask] >= t).mean() > 0.8  # inside: materially changed (holes of a region filled)
        contrasts.append(diff[d.mask].mean())
    # a spread of difficulty: some faint defects, some strong ones
    assert min(contrasts) < 20 and max(contrasts) > 60


def test_make_defect_on_any_image():
    rng = np.random.default_rng(5)
    clean = (rng.random((64, 64, 3)) * 60 + 100).astype(np.uint8)
    for kind in DEFECT_KINDS:
        a = demo.make_defect(clean, kind, np.random.default_rng(1))
        b = demo.make_defect(clean, kind, np.random.default_rng(1))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        image, mask = a
        assert mask.any() and np.array_equal(image[~mask], clean[~mask])
    with pytest.raises(ValueError, match="Unknown defect kind"):
        demo.make_defect(clean, "dent", rng)


def test_seed_determinism(coffee):
    again = demo.render_category("coffee", seed=0)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(coffee, again, strict=True))
    other = demo.render_category("coffee", seed=1)
    assert not np.array_equal(coffee[0].image, other[0].image)
    pairs = [(a.mask, b.mask) for a, b in zip(coffee, other, strict=True) if a.mask is not None]
    assert not all(np.array_equal(m1, m2) for m1, m2 in pairs)


def test_same_seed_gives_identical_files(generated, tmp_path, monkeypatch):
    root, _ = generated
    monkeypatch.setattr(demo, "DEMO_CATEGORIES", ("coffee",))  # one category is enough, and 4x faster
    copy = ensure_demo_data(tmp_path / "demo", seed=0)
    assert tree_bytes(copy / "coffee") == tree_bytes(root / "coffee")


def test_train_and_test_images_differ(coffee):
    train = {d.image.tobytes() for d in coffee if d.split == "train"}
    assert not any(d.image.tobytes() in train for d in coffee if d.split == "test")
    # the object stays in place: all good crops are close to their mean (only small shifts)
    goods = np.stack([d.image for d in coffee if d.mask is None]).astype(np.float32)
    assert np.abs(goods - goods.mean(0)).mean() < 25


def stub_render(category, seed=0):
    img = np.full((8, 8, 3), seed % 256, np.uint8)
    return [demo.DemoImage("train", "good", 0, img), demo.DemoImage("test", "good", 0, img)]


def test_existing_data_is_reused_and_old_versions_regenerate(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "render_category", stub_render)
    root = ensure_demo_data(tmp_path / "demo", seed=3)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert ensure_demo_data(root, seed=3) == root and (root / "manifest.json").stat().st_mtime_ns == stamp

    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = demo.DEMO_VERSION - 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "stale.txt").write_text("from an old version")
    ensure_demo_data(root, seed=3)
    assert not (root / "stale.txt").exists()
    assert json.loads((root / "manifest.json").read_text())["version"] == demo.DEMO_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # old tree removed, nothing left over


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_render(category, seed=0):
        calls.append(category)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return stub_render(category, seed)

    monkeypatch.setattr(demo, "render_category", failing_render)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_data(tmp_path / "demo")
    assert list(tmp_path.iterdir()) == []


def test_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="manifest"):
        ensure_demo_data(tmp_path / "demo")
    assert (tmp_path / "demo" / "mine.txt").exists()


def test_load_dataset_generates_on_first_use(generated, monkeypatch):
    root, _ = generated
    monkeypatch.setenv("FLOWLIB_DATA", str(root.parent))  # <data root>/demo is the generated tree
    stamp = (root / "manifest.json").stat().st_mtime_ns
    union = load_union("demo", "test", image_size=32)
    assert union.categories == list(DEMO_CATEGORIES) and len(union) == 4 * N_TEST
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    assert len(load_dataset("demo", "coffee", "train", root=root.parent)) == demo.N_TRAIN  # parent accepted
    sample = union[N_TEST]  # first test image of the second category
    assert sample["class_id"] == 1 and sample["category"] == DEMO_CATEGORIES[1]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 32, 32)


def test_overview_figure(generated):
    import matplotlib.pyplot as plt

    root, _ = generated
    fig = demo.plot_demo_overview(root)
    assert len(fig.axes) == len(DEMO_CATEGORIES) * (1 + len(DEFECT_KINDS))
    plt.close(fig)


@pytest.mark.parametrize("module", ["flowlib.data", "flowlib.data.registry", "flowlib.data.demo",
                                    "flowlib.data.mvtec"])
def test_docstring_examples(module, monkeypatch):
    """The examples run against the default demo folder (``<repo>/data/demo``, generated on use)."""
    import doctest
    import importlib

    monkeypatch.delenv("FLOWLIB_DATA", raising=False)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
