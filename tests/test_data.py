"""Dataset loaders on tiny trees built in each real layout (MVTec AD, VisA, BTAD, MVTec 3D-AD, folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowlib.data import (
    DatasetNotFoundError,
    ImageReadError,
    MaskSizeError,
    MultiCategoryDataset,
    list_categories,
    load_dataset,
    load_union,
    make_dataloader,
)
from flowlib.data.registry import parse_sources

SIDE = 40
# defect square of every mask: rows 10..19, cols 20..29 of a 40x40 image
ROWS, COLS = slice(10, 20), slice(20, 30)


def rgb_image(path: Path, value: tuple[int, int, int] = (200, 100, 50), mode: str = "RGB", size: int = SIDE,
              fmt: str | None = None) -> Path:
    """A small image whose left half has the colour ``value`` and right half a gradient."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:, : size // 2] = value
    arr[:, size // 2:] = np.linspace(0, 255, size - size // 2, dtype=np.uint8)[None, :, None]
    img = Image.fromarray(arr)
    if mode == "L":
        img = Image.fromarray(np.full((size, size), 77, np.uint8), "L")
    elif mode == "RGBA":
        img = Image.fromarray(np.dstack([arr, np.full((size, size), 30, np.uint8)]), "RGBA")
    img.save(path, format=fmt)
    return path


def mask_image(path: Path, size: int = SIDE, value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size), np.uint8)
    arr[ROWS, COLS] = value
    Image.fromarray(arr, "L").save(path)
    return path


def expected_mask(size: int = SIDE) -> torch.Tensor:
    m = torch.zeros(1, SIDE, SIDE)
    m[0, ROWS, COLS] = 1
    if size != SIDE:  # nearest resizing by a factor of 2 keeps the square, halved
        m = m[:, 1::2, 1::2]
    return m


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec_ad"
    for cat in ("bottle", "grid"):
        c = root / cat
        for i in range(3):
            rgb_image(c / "train" / "good" / f"{i:03d}.png")
        rgb_image(c / "test" / "good" / "000.png", mode="L")  # grayscale file
        rgb_image(c / "test" / "good" / "001.png", mode="RGBA")
        for defect, n in (("crack", 2), ("scratch", 1)):
            for i in range(n):
                rgb_image(c / "test" / defect / f"{i:03d}.png")
                mask_image(c / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


# ---------------------------------------------------------------------------------------------- MVTec AD


def test_mvtec_counts_labels_and_defects(mvtec_root):
    train = load_dataset("mvtec", "bottle", "train", root=mvtec_root, image_size=None)
    test = load_dataset("mvtec", "bottle", "test", root=mvtec_root, image_size=None)
    assert len(train) == 3 and train.labels == [0, 0, 0]
    assert test.defects == ["crack", "crack", "good", "good", "scratch"]
    assert test.labels == [1, 1, 0, 0, 1]
    s = test[0]
    assert set(s) == {"image", "mask", "label", "defect", "path", "category", "class_id"}
    assert s["category"] == "bottle" and s["class_id"] == 0 and s["path"].endswith("crack/000.png")


def test_mvtec_pixels_masks_and_channel_conversion(mvtec_root):
    test = load_dataset("mvtec", "bottle", "test", root=mvtec_root, image_size=None)
    crack = test[0]
    assert crack["image"].shape == (3, SIDE, SIDE) and crack["image"].dtype == torch.float32
    # RGB order and scale: left half is (200, 100, 50)
    assert torch.allclose(crack["image"][:, 5, 5], torch.tensor([200, 100, 50]) / 255.0)
    assert torch.equal(crack["mask"], expected_mask())
    gray, rgba = test[2], test[3]
    assert gray["defect"] == "good" and torch.count_nonzero(gray["mask"]) == 0
    assert gray["image"].shape == (3, SIDE, SIDE)
    assert torch.allclose(gray["image"], torch.full((3, SIDE, SIDE), 77 / 255.0))
    assert rgba["image"].shape == (3, SIDE, SIDE)
    assert torch.allclose(rgba["image"][:, 5, 5], torch.tensor([200, 100, 50]) / 255.0)


def test_resizing_keeps_masks_binary_and_aligned(mvtec_root):
    test = load_dataset("mvtec", "bottle", "test", root=mvtec_root, image_size=20)
    s = test[0]
    assert s["image"].shape == (3, 20, 20) and s["mask"].shape == (1, 20, 20)
    assert set(s["mask"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(s["mask"], expected_mask(20))
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert test[4]["image"].shape == (3, 20, 20)


def test_root_from_environment_and_parent_folder(mvtec_root, monkeypatch):
    monkeypatch.setenv("FLOWLIB_DATA", str(mvtec_root.parent))
    assert len(load_dataset("mvtec", "grid", "train")) == 3  # $FLOWLIB_DATA/mvtec_ad
    monkeypatch.delenv("FLOWLIB_DATA")
    assert len(load_dataset("mvtec_ad", "grid", "train", root=mvtec_root.parent)) == 3  # parent accepted


def test_missing_root_names_path_and_tree(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mvtec", "bottle", "train", root=missing)
    msg = str(err.value)
    assert str(missing) in msg and "Expected layout" in msg
    assert "ground_truth/broken_large/000_mask.png" in msg
    assert "FLOWLIB_DATA" in msg


def test_missing_category_lists_what_is_there(mvtec_root):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mvtec", "bottel", "test", root=mvtec_root)
    msg = str(err.value)
    assert str(mvtec_root / "bottel") in msg and "bottle, grid" in msg and "Expected layout" in msg


def test_missing_mask_file_is_named(mvtec_root):
    (mvtec_root / "bottle" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="000_mask.png"):
        load_dataset("mvtec", "bottle", "test", root=mvtec_root)


def test_corrupt_image_names_the_file(mvtec_root):
    bad = mvtec_root / "bottle" / "train" / "good" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    train = load_dataset("mvtec", "bottle", "train", root=mvtec_root)
    train[0]  # a good file still loads
    with pytest.raises(ImageReadError, match=str(bad)):
        train[1]


def test_truncated_image_names_the_file(mvtec_root):
    path = mvtec_root / "bottle" / "train" / "good" / "002.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ImageReadError, match="002.png"):
        load_dataset("mvtec", "bottle", "train", root=mvtec_root)[2]


def test_mask_size_mismatch_names_both_files(mvtec_root):
    mask = mask_image(mvtec_root / "bottle" / "ground_truth" / "crack" / "000_mask.png", size=32)
    test = load_dataset("mvtec", "bottle", "test", root=mvtec_root)
    with pytest.raises(MaskSizeError) as err:
        test[0]
    image = mvtec_root / "bottle" / "test" / "crack" / "000.png"
    assert str(mask) in str(err.value) and str(image) in str(err.value)


def test_bad_arguments(mvtec_root):
    with pytest.raises(ValueError, match="split"):
        load_dataset("mvtec", "bottle", "val", root=mvtec_root)
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_dataset("imagenet", "bottle", "train")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("mvtec", "bottle", "train", root=mvtec_root, image_size=0)


# ---------------------------------------------------------------------------------------------- VisA


@pytest.fixture
def visa_root(tmp_path: Path) -> Path:
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        rel = f"candle/Data/Images/Normal/{i:04d}.JPG"
        rgb_image(root / rel, fmt="JPEG")
        rows.append(f"candle,{'train' if i < 2 else 'test'},normal,{rel},")
    anno = ["image,label,mask"]
    for i, value in enumerate((1, 2)):  # VisA masks hold instance ids, not 255
        rel, mrel = f"candle/Data/Images/Anomaly/{i:03d}.JPG", f"candle/Data/Masks/Anomaly/{i:03d}.png"
        rgb_image(root / rel, fmt="JPEG")
        mask_image(root / mrel, value=value)
        rows.append(f"candle,test,anomaly,{rel},{mrel}")
        anno.append(f'{rel},{"wax melded out" if i == 0 else "extra wax"},{mrel}')
    rel = "pcb1/Data/Images/Normal/0000.JPG"
    rgb_image(root / rel, fmt="JPEG")
    rows.append(f"pcb1,train,normal,{rel},")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    (root / "candle" / "image_anno.csv").write_text("\n".join(anno) + "\n")
    return root


def test_visa_split_file(visa_root):
    train = load_dataset("visa", "candle", "train", root=visa_root, image_size=20)
    test = load_dataset("visa", "candle", "test", root=visa_root, image_size=20)
    assert len(train) == 2 and train.labels == [0, 0]
    assert test.labels == [0, 1, 1]
    assert test.defects == ["good", "wax melded out", "extra wax"]
    assert torch.equal(test[1]["mask"], expected_mask(20)) and torch.equal(test[2]["mask"], expected_mask(20))
    assert torch.count_nonzero(test[0]["mask"]) == 0
    assert list_categories("visa", visa_root, present_only=True) == ["candle", "pcb1"]


def test_visa_errors(visa_root):
    with pytest.raises(DatasetNotFoundError, match="capsules"):
        load_dataset("visa", "capsules", "test", root=visa_root)
    (visa_root / "candle" / "Data" / "Images" / "Anomaly" / "001.JPG").unlink()
    with pytest.raises(DatasetNotFoundError, match="001.JPG"):
        load_dataset("visa", "candle", "test", root=visa_root)
    (visa_root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DatasetNotFoundError, match="1cls.csv"):
        load_dataset("visa", "candle", "test", root=visa_root)


# ---------------------------------------------------------------------------------------------- BTAD


@pytest.fixture
def btad_root(tmp_path: Path) -> Path:
    root = tmp_path / "btad"
    # 01: BMP images, PNG masks; 02: PNG images and masks; 03: BMP images and masks
    for cat, img_ext, mask_ext in (("01", "bmp", "png"), ("02", "png", "png"), ("03", "bmp", "bmp")):
        c = root / cat
        for i in range(2):
            rgb_image(c / "train" / "ok" / f"{i:04d}.{img_ext}")
        rgb_image(c / "test" / "ok" / f"0000.{img_ext}")
        for i in range(2):
            rgb_image(c / "test" / "ko" / f"{i:04d}.{img_ext}")
            mask_image(c / "ground_truth" / "ko" / f"{i:04d}.{mask_ext}")
    return root


@pytest.mark.parametrize("cat", ["01", "02", "03"])
def test_btad_extensions(btad_root, cat):
    assert len(load_dataset("btad", cat, "train", root=btad_root)) == 2
    test = load_dataset("btad", cat, "test", root=btad_root, image_size=None)
    assert test.labels == [0, 1, 1] and test.defects == ["good", "ko", "ko"]
    assert torch.equal(test[1]["mask"], expected_mask())
    assert torch.count_nonzero(test[0]["mask"]) == 0


def test_btad_missing_mask(btad_root):
    (btad_root / "03" / "ground_truth" / "ko" / "0001.bmp").unlink()
    with pytest.raises(DatasetNotFoundError, match="0001"):
        load_dataset("btad", "03", "test", root=btad_root)


# ---------------------------------------------------------------------------------------------- MVTec 3D-AD


@pytest.fixture
def mvtec3d_root(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec_3d"
    c = root / "bagel"
    for i in range(2):
        rgb_image(c / "train" / "good" / "rgb" / f"{i:03d}.png")
        (c / "train" / "good" / "xyz").mkdir(parents=True, exist_ok=True)
    rgb_image(c / "validation" / "good" / "rgb" / "000.png")
    rgb_image(c / "test" / "good" / "rgb" / "000.png")
    mask_image(c / "test" / "good" / "gt" / "000.png", value=0)
    for defect in ("crack", "hole"):
        rgb_image(c / "test" / defect / "rgb" / "000.png")
        mask_image(c / "test" / defect / "gt" / "000.png")
    return root


def test_mvtec3d_rgb_and_gt(mvtec3d_root):
    assert len(load_dataset("mvtec3d", "bagel", "train", root=mvtec3d_root)) == 2
    assert len(load_dataset("mvtec_3d", "bagel", "validation", root=mvtec3d_root)) == 1
    test = load_dataset("mvtec3d", "bagel", "test", root=mvtec3d_root, image_size=None)
    assert test.defects == ["crack", "good", "hole"] and test.labels == [1, 0, 1]
    assert torch.equal(test[0]["mask"], expected_mask())
    assert test[0]["path"].endswith("crack/rgb/000.png")
    with pytest.raises(DatasetNotFoundError, match="carrot"):
        load_dataset("mvtec3d", "carrot", "test", root=mvtec3d_root)


def test_mvtec3d_missing_mask_is_named(mvtec3d_root):
    missing = mvtec3d_root / "bagel" / "test" / "hole" / "gt" / "000.png"
    missing.unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mvtec3d", "bagel", "test", root=mvtec3d_root)
    msg = str(err.value)
    assert f"Mask '{missing}'" in msg and str(missing.parents[1] / "rgb" / "000.png") in msg
    assert "Expected layout" in msg and "test/crack/gt/000.png" in msg


# ---------------------------------------------------------------------------------------------- plain folder


def test_folder_layout(tmp_path):
    c = tmp_path / "parts" / "widget"
    for i in range(2):
        rgb_image(c / "train" / f"{i}.png")
    rgb_image(c / "train" / "good" / "2.jpg", fmt="JPEG")
    rgb_image(c / "test" / "good" / "a.png")
    rgb_image(c / "test" / "dent" / "b.png")
    mask_image(c / "ground_truth" / "dent" / "b.png")
    rgb_image(c / "test" / "smudge" / "c.png")
    mask_image(c / "ground_truth" / "smudge" / "c_mask.png")
    root = tmp_path / "parts"
    assert list_categories("folder", root) == ["widget"]
    assert len(load_dataset("folder", "widget", "train", root=root)) == 3
    test = load_dataset("folder", "widget", "test", root=root, image_size=None)
    assert test.defects == ["dent", "good", "smudge"] and test.has_masks
    assert torch.equal(test[0]["mask"], expected_mask()) and torch.equal(test[2]["mask"], expected_mask())
    # the category folder itself as root
    assert len(load_dataset("folder", None, "train", root=c)) == 3

    rgb_image(c / "test" / "crack" / "d.png")  # no mask for this one
    test = load_dataset("folder", "widget", "test", root=root)
    assert not test.has_masks and torch.count_nonzero(test[0]["mask"]) == 0


def test_folder_without_test_set(tmp_path):
    rgb_image(tmp_path / "x" / "train" / "0.png")
    assert len(load_dataset("folder", "x", "train", root=tmp_path)) == 1
    with pytest.raises(DatasetNotFoundError, match="test"):
        load_dataset("folder", "x", "test", root=tmp_path)


# ---------------------------------------------------------------------------------------------- several


def test_multi_category_dataset_class_ids(mvtec_root, btad_root):
    parts = [load_dataset("mvtec", "bottle", "test", root=mvtec_root, image_size=16),
             load_dataset("mvtec", "grid", "test", root=mvtec_root, image_size=16),
             load_dataset("btad", "02", "test", root=btad_root, image_size=16)]
    multi = MultiCategoryDataset(parts)
    assert multi.categories == ["bottle", "grid", "02"]
    assert len(multi) == 5 + 5 + 3
    assert multi.class_ids == [0] * 5 + [1] * 5 + [2] * 3
    assert [multi[i]["class_id"] for i in range(len(multi))] == multi.class_ids
    assert multi[7]["category"] == "grid" and multi[-1]["category"] == "02"
    assert multi.labels == parts[0].labels + parts[1].labels + parts[2].labels
    with pytest.raises(IndexError):
        multi[len(multi)]
    # one category name in two datasets is qualified by the dataset name
    # (an MVTec AD category folder is also a valid plain folder)
    same_name = load_dataset("folder", "bottle", "test", root=mvtec_root, image_size=16)
    assert MultiCategoryDataset([parts[0], same_name]).categories == ["mvtec/bottle", "folder/bottle"]
    with pytest.raises(ValueError, match="same name"):
        MultiCategoryDataset([parts[0], parts[0]])


def test_union_of_datasets_and_loader(mvtec_root, btad_root):
    with pytest.raises(DatasetNotFoundError):  # "mvtec" alone means all 15 official classes
        load_union("mvtec", "train", roots={"mvtec": mvtec_root})
    union = load_union("mvtec:bottle,mvtec:grid,btad:01", "train",
                       roots={"mvtec_ad": mvtec_root, "btad": btad_root}, image_size=16)
    assert union.categories == ["bottle", "grid", "01"] and len(union) == 3 + 3 + 2
    assert parse_sources(["btad", ("mvtec", "grid")]) == [("btad", None), ("mvtec", "grid")]

    loader = make_dataloader(union, batch_size=4, shuffle=True, seed=3)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 1, 16, 16)
    assert batch["class_id"].dtype == torch.int64 and len(batch["path"]) == 4
    order = [p for b in make_dataloader(union, batch_size=4, shuffle=True, seed=3) for p in b["path"]]
    again = [p for b in make_dataloader(union, batch_size=4, shuffle=True, seed=3) for p in b["path"]]
    assert order == again and sorted(order) == sorted(str(r.image) for d in union.datasets for r in d.records)


def test_list_categories(mvtec_root):
    assert len(list_categories("mvtec")) == 15 and list_categories("btad") == ["01", "02", "03"]
    assert len(list_categories("mvtec3d")) == 10 and len(list_categories("visa")) == 12
    assert list_categories("mvtec", mvtec_root, present_only=True) == ["bottle", "grid"]


def test_union_dataset_reads_each_category_from_its_own_dataset(mvtec_root, btad_root):
    root = mvtec_root.parent  # the folder that holds mvtec_ad/ and btad/
    assert btad_root.parent == root
    every = list_categories("union")
    assert len(every) == 40 and len(set(every)) == 40  # HGAD's 40 classes, no name twice
    assert every[:15] == list_categories("mvtec") and every[15:18] == ["01", "02", "03"]
    assert list_categories("union", root, present_only=True) == ["bottle", "grid", "01", "02", "03"]
    grid = load_dataset("union", "grid", "test", root=root, image_size=16)
    assert grid.records == load_dataset("mvtec", "grid", "test", root=mvtec_root, image_size=16).records
    btad_02 = load_dataset("union", "02", "train", root=root, image_size=16)
    assert all("btad" in str(r.image) for r in btad_02.records) and len(btad_02) == 2
    with pytest.raises(ValueError, match="Unknown union category 'nope'"):
        load_dataset("union", "nope", "train", root=root)


def test_one_unified_model_over_a_union_of_datasets(mvtec_root, btad_root, tmp_path):
    from flowlib.engine import run

    records = run("hgad", dataset="union", root=mvtec_root.parent, categories="bottle,01", preset="quick",
                  out=tmp_path / "results", progress=False, overrides={"epochs": 1, "pretrained": False})
    assert [r["category"] for r in records] == ["bottle", "01"]
    assert all(r["unified_over"] == ["bottle", "01"] and r["config"]["n_classes"] == 2 for r in records)
    assert len({r["timing"]["train_seconds_total"] for r in records}) == 1  # one model for both
    assert (tmp_path / "results" / "hgad" / "union" / "01" / "quick_seed0.json").is_file()
