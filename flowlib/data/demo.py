"""The built-in benchmark: real photographs from ``skimage.data`` with synthetic defects, MVTec layout.

It lets every notebook and test run offline in seconds. Four categories:

* ``brick``, ``grass``, ``gravel`` -- textures (grayscale photos, stored as 1-channel PNGs like MVTec
  AD's grid): random 256 px crops of the 512 px photo, random flips (grass and gravel also 90-degree
  turns; brick keeps its rows horizontal) and a +-3 % brightness change;
* ``coffee`` -- an object whose position matters: the cup and saucer of ``skimage.data.coffee()``
  scaled by 2/3, cropped at a fixed place with a shift of at most 4 px and a +-4 % brightness change.

Per category: 60 training images, 20 good test images and 10 test images per defect kind, 256 px.
Each defective image carries one defect, drawn inside the object for ``coffee``:

* ``scratch`` -- a thin bent line (2-4.5 px wide), lighter or darker than its surroundings;
* ``hole`` -- a dark irregular blob (radius 6-14 px), darkest at its centre;
* ``stain`` -- a larger soft-edged blob (radius 10-24 px) that tints or darkens, often faintly;
* ``patch`` -- a piece of another photograph (14-40 px) pasted in, its brightness partly matched.

Size, contrast and shape are drawn at random, so some defects are faint (mean change inside the
mask down to about 8 grey levels). On the busy grass and gravel textures defects are 1.6 times
larger and never at the faintest end, otherwise they are lost in the texture. Masks are exact: a pixel
whose value the defect changed by at least :data:`CHANGE_THRESHOLD` grey levels (8-bit, any channel)
is in the mask; the mask is then closed (3x3) and its holes filled (only where the defect was
drawn), and every pixel outside it is reset to the clean image. So outside the mask a test image
equals the clean crop bit for bit.

Generation is deterministic for a seed (NumPy ``Generator`` per category) and written atomically:
into a temporary folder that is renamed to ``data/demo`` when complete. ``manifest.json`` records
the generator version and seed; a different version or seed regenerates.

Example::

    >>> from flowlib.data import load_dataset
    >>> train = load_dataset("demo", "coffee", "train", image_size=128)   # generates on first use
    >>> len(train), tuple(train[0]["image"].shape)
    (60, (3, 128, 128))
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from flowlib.config import data_root
from flowlib.data.base import GOOD, AnomalyDataset, DatasetNotFoundError
from flowlib.data.mvtec import mvtec_layout_records

DEMO_CATEGORIES = ("brick", "grass", "gravel", "coffee")
DEFECT_KINDS = ("scratch", "hole", "stain", "patch")
DEMO_VERSION = 2
DEFAULT_SUBDIR = "demo"
IMAGE_SIDE = 256
N_TRAIN = 60
N_TEST_GOOD = 20
N_PER_DEFECT = 10
#: Smallest change (8-bit grey levels, any channel) that counts as a defect pixel.
CHANGE_THRESHOLD = 6
MIN_DEFECT_PIXELS = 20
MANIFEST = "manifest.json"

TREE = """\
<root>/                          (default data/demo, generated on first use)
    manifest.json
    brick/
        train/good/000.png ... 059.png
        test/good/000.png ... 019.png
        test/scratch/000.png ... 009.png        (also hole/, stain/, patch/)
        ground_truth/scratch/000_mask.png ...
    grass/ gravel/ coffee/"""


@dataclass(frozen=True)
class _Spec:
    texture: bool
    rotate: bool = False
    scale: float = 1.0  # defect size factor
    floor: float = 0.0  # lowest defect strength in [0, 1]


# Grass and gravel are busy natural textures: small faint defects vanish in them, so theirs are
# drawn larger and never at the faintest end.
_SPECS = {
    "brick": _Spec(texture=True, rotate=False, floor=0.1),
    "grass": _Spec(texture=True, rotate=True, scale=1.6, floor=0.5),
    "gravel": _Spec(texture=True, rotate=True, scale=1.6, floor=0.5),
    "coffee": _Spec(texture=False, floor=0.1),
}

# coffee(): 400x600 photo scaled by 2/3 to 267x400; the cup and saucer sit around (row 143, col 185).
_COFFEE_ORIGIN = (6, 57)  # top-left corner of the un-shifted 256 px crop
_COFFEE_SHIFT = 4
_COFFEE_ROI = (137.0, 128.0, 85.0, 100.0)  # ellipse (row, col, radius rows, radius cols) in the crop


@dataclass
class DemoImage:
    """One generated image. ``clean`` is the defect-free crop (test defects only), ``mask`` is
    ``(H, W)`` bool for defects and ``None`` for good images; arrays are ``(H, W, 3)`` uint8."""

    split: str
    defect: str
    index: int
    image: np.ndarray
    mask: np.ndarray | None = None
    clean: np.ndarray | None = None

    @property
    def relpath(self) -> str:
        return f"{self.split}/{self.defect}/{self.index:03d}.png"


# ----------------------------------------------------------------------------------------------
# source photographs


@cache
def _photo(name: str) -> np.ndarray:
    """A ``skimage.data`` photo as float32 ``(H, W, 3)`` in [0, 1] (grayscale ones replicated)."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if name == "coffee":
        h, w = arr.shape[:2]
        arr = np.asarray(Image.fromarray(arr).resize((round(w * 2 / 3), round(h * 2 / 3)), Image.BILINEAR))
    arr = arr.astype(np.float32) / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return arr[..., :3]


def _patch_sources(category: str) -> list[np.ndarray]:
    names = [n for n in ("brick", "grass", "gravel", "coffee", "chelsea", "astronaut", "rocket")
             if n != category]
    photos = [_photo(n) for n in names]
    if _SPECS[category].texture:  # a coloured patch on a grey texture would be trivial to spot
        photos = [np.repeat(p.mean(axis=2, keepdims=True), 3, axis=2) for p in photos]
    return photos


def _clean_crop(category: str, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """A defect-free crop ``(S, S, 3)`` float32 and its shift ``(dy, dx)`` (objects only)."""
    spec, s = _SPECS[category], IMAGE_SIDE
    src = _photo(category)
    dy = dx = 0
    if spec.texture:
        y = int(rng.integers(0, src.shape[0] - s + 1))
        x = int(rng.integers(0, src.shape[1] - s + 1))
        crop = src[y:y + s, x:x + s]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.5:
            crop = crop[::-1]
        if spec.rotate:
            crop = np.rot90(crop, int(rng.integers(0, 4)))
        crop = crop * rng.uniform(0.97, 1.03)
    else:
        dy, dx = (int(v) for v in rng.integers(-_COFFEE_SHIFT, _COFFEE_SHIFT + 1, size=2))
        y, x = _COFFEE_ORIGIN[0] + dy, _COFFEE_ORIGIN[1] + dx
        crop = src[y:y + s, x:x + s] * rng.uniform(0.96, 1.04)
    return np.clip(np.ascontiguousarray(crop), 0.0, 1.0).astype(np.float32), (dy, dx)


def _defect_centres(category: str, shift: tuple[int, int]) -> np.ndarray:
    """``(S, S)`` bool: where a defect may be centred (16 px from the border; on the object)."""
    s = IMAGE_SIDE
    if _SPECS[category].texture:
        centres = np.zeros((s, s), bool)
        centres[16:s - 16, 16:s - 16] = True
        return centres
    cy, cx, ry, rx = _COFFEE_ROI
    rows, cols = np.ogrid[0:s, 0:s]
    return ((rows - cy + shift[0]) / ry) ** 2 + ((cols - cx + shift[1]) / rx) ** 2 <= 1.0


# ----------------------------------------------------------------------------------------------
# defects: each returns (effect image (S, S, 3), alpha (S, S)); the result is clean*(1-a) + effect*a


def _blob(shape: tuple[int, int], cy: float, cx: float, radius: float, wobble: float,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Irregular disc: alpha in [0, 1] with a 1 px soft edge, and the relative radius rho/r(phi)
    (``inf`` far outside). Only a box around the disc is computed."""
    aspect = rng.uniform(0.6, 1.0)
    turn = rng.uniform(0, np.pi)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    reach = int(np.ceil(radius * (1 + wobble) ** 2)) + 2
    y0, y1 = max(0, int(cy) - reach), min(shape[0], int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(shape[1], int(cx) + reach + 1)
    rows, cols = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = rows - cy, cols - cx
    rho = np.hypot(dy, dx)
    phi = np.arctan2(dy, dx)
    r = radius * (1 + (aspect - 1) * np.sin(phi - turn) ** 2)
    for k, phase in zip((2, 3, 5), phases, strict=True):
        r = r * (1 + wobble / k * np.cos(k * phi + phase))
    alpha = np.zeros(shape, np.float32)
    rel = np.full(shape, np.inf, np.float32)
    alpha[y0:y1, x0:x1] = np.clip(r - rho + 0.5, 0.0, 1.0)
    rel[y0:y1, x0:x1] = rho / np.maximum(r, 1e-6)
    return alpha, rel


def _scratch(clean, cy, cx, strength, scale, rng, sources, gray):
    s = clean.shape[0]
    length = rng.uniform(40, 100) * scale
    angle = rng.uniform(0, np.pi)
    d = np.array([np.sin(angle), np.cos(angle)])
    n = np.array([d[1], -d[0]])
    c = np.array([cy, cx])
    p0, p2 = c - d * length / 2, c + d * length / 2
    p1 = c + n * rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0, 1, int(length * 3))[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    pts = np.clip(np.round(pts).astype(int), 0, s - 1)
    line = np.zeros((s, s), bool)
    line[pts[:, 0], pts[:, 1]] = True
    dist = ndimage.distance_transform_edt(~line)
    width = rng.uniform(2.0, 4.5) * scale
    alpha = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    contrast = 0.10 + 0.35 * strength
    return np.clip(clean + sign * contrast, 0, 1), alpha


def _hole(clean, cy, cx, strength, scale, rng, sources, gray):
    radius = rng.uniform(6, 14) * scale
    alpha, rel = _blob(clean.shape[:2], cy, cx, radius, 0.25, rng)
    depth = 0.3 + 0.55 * strength
    profile = depth * (0.6 + 0.4 * np.clip(1 - rel, 0, 1))  # darkest in the middle
    return clean * (1 - profile[..., None]), alpha


def _stain(clean, cy, cx, strength, scale, rng, sources, gray):
    radius = rng.uniform(10, 24) * scale
    alpha, _ = _blob(clean.shape[:2], cy, cx, radius, 0.35, rng)
    alpha = ndimage.gaussian_filter(alpha, rng.uniform(1.0, 3.0))
    alpha = alpha * (0.35 + 0.6 * strength)
    if gray:
        tint = np.full(3, rng.uniform(0.35, 0.7) if rng.random() < 0.7 else rng.uniform(1.35, 1.7))
    else:  # mostly darkening, with a colour cast
        tint = rng.uniform(0.5, 1.15) * (1 + rng.uniform(-0.25, 0.25, size=3))
    return np.clip(clean * tint, 0, 1), alpha


def _patch(clean, cy, cx, strength, scale, rng, sources, gray):
    s = clean.shape[0]
    h, w = (min(int(v * scale), s) for v in rng.integers(14, 41, size=2))
    src = sources[int(rng.integers(len(sources)))]
    y, x = int(rng.integers(0, src.shape[0] - h)), int(rng.integers(0, src.shape[1] - w))
    piece = src[y:y + h, x:x + w]
    top, left = int(np.clip(cy - h // 2, 0, s - h)), int(np.clip(cx - w // 2, 0, s - w))
    local = clean[top:top + h, left:left + w]
    # pull the piece's brightness towards its surroundings: faint patches differ mostly in texture
    keep = 0.3 + 0.7 * strength
    piece = local.mean(axis=(0, 1)) + (piece - piece.mean(axis=(0, 1))) + keep * (
        piece.mean(axis=(0, 1)) - local.mean(axis=(0, 1)))
    effect = clean.copy()
    effect[top:top + h, left:left + w] = np.clip(piece, 0, 1)
    alpha = np.zeros((s, s), np.float32)
    if rng.random() < 0.5:
        alpha[top:top + h, left:left + w] = 1.0
    else:
        rows, cols = np.mgrid[0:h, 0:w]
        inside = ((rows - (h - 1) / 2) / (h / 2)) ** 2 + ((cols - (w - 1) / 2) / (w / 2)) ** 2 <= 1.0
        alpha[top:top + h, left:left + w] = inside
    return effect, alpha


_DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "patch": _patch}


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def exact_mask(clean: np.ndarray, defective: np.ndarray, support: np.ndarray,
               threshold: int = CHANGE_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Mask of material change and the defective image with everything outside it reset.

    Args:
        clean, defective: ``(H, W, 3)`` uint8.
        support: ``(H, W)`` bool, where the defect was drawn at all.

    Returns:
        ``(image (H, W, 3) uint8, mask (H, W) bool)``: the mask holds every pixel that changed by
        at least ``threshold`` grey levels, closed and hole-filled within ``support``; outside it
        the image equals ``clean``.
    """
    change = np.abs(defective.astype(np.int16) - clean.astype(np.int16)).max(axis=2)
    changed = change >= threshold
    mask = np.zeros_like(changed)
    rows, cols = np.nonzero(changed)
    if rows.size:
        # the morphology only needs a box around the change (2 px of room for the 3x3 closing)
        y0, y1 = max(0, rows.min() - 2), min(changed.shape[0], rows.max() + 3)
        x0, x1 = max(0, cols.min() - 2), min(changed.shape[1], cols.max() + 3)
        box = changed[y0:y1, x0:x1]
        region = ndimage.binary_fill_holes(ndimage.binary_closing(box, np.ones((3, 3), bool)))
        mask[y0:y1, x0:x1] = (region & support[y0:y1, x0:x1]) | box
    return np.where(mask[..., None], defective, clean), mask


def make_defect(clean: np.ndarray, kind: str, rng: np.random.Generator, centres: np.ndarray | None = None,
                sources: Sequence[np.ndarray] | None = None, gray: bool = False, scale: float = 1.0,
                floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of ``kind`` (see :data:`DEFECT_KINDS`) into a clean image.

    Args:
        clean: ``(H, W, 3)`` uint8 defect-free image.
        rng: the random generator (all randomness comes from it).
        centres: ``(H, W)`` bool, where a defect may be centred (default: anywhere 16 px from the border).
        sources: ``(h, w, 3)`` float photos that ``patch`` cuts from (default: the demo's photos).
        gray: keep stains grey (for grayscale categories).
        scale: size factor; floor: lowest strength (contrast) in [0, 1], drawn uniformly up to 1.

    Returns:
        ``(image (H, W, 3) uint8, mask (H, W) bool)`` with at least :data:`MIN_DEFECT_PIXELS` mask
        pixels; outside the mask ``image == clean``.
    """
    if kind not in _DEFECTS:
        raise ValueError(f"Unknown defect kind {kind!r}; use one of {DEFECT_KINDS}.")
    h, w = clean.shape[:2]
    if centres is None:
        centres = np.zeros((h, w), bool)
        centres[16:h - 16, 16:w - 16] = True
    if sources is None:
        sources = _patch_sources("coffee" if not gray else "brick")
    candidates = np.flatnonzero(centres)
    if candidates.size == 0:
        raise ValueError("make_defect: `centres` allows no pixel (or the image is under 33 px).")
    base = clean.astype(np.float32) / 255.0
    for attempt in range(50):
        # a defect too faint to leave MIN_DEFECT_PIXELS is redrawn, a little stronger each time
        strength = min(1.0, floor + (1 - floor) * rng.random() + attempt * 0.05)
        cy, cx = divmod(int(candidates[rng.integers(len(candidates))]), w)
        effect, alpha = _DEFECTS[kind](base, cy, cx, strength, scale, rng, sources, gray)
        drawn = to_uint8(base * (1 - alpha[..., None]) + effect * alpha[..., None])
        image, mask = exact_mask(clean, drawn, alpha > 0)
        if mask.sum() >= MIN_DEFECT_PIXELS:
            return image, mask
    raise RuntimeError(f"Could not draw a visible {kind} defect; the clean image may be flat.")


def _category_seed(seed: int, category: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), zlib.crc32(category.encode())])


def render_category(category: str, seed: int = 0) -> list[DemoImage]:
    """All images of one demo category, in memory (what :func:`ensure_demo_data` writes).

    Order: ``N_TRAIN`` train images, ``N_TEST_GOOD`` good test images, then ``N_PER_DEFECT`` test
    images for each kind in :data:`DEFECT_KINDS`.
    """
    if category not in _SPECS:
        raise ValueError(f"Unknown demo category {category!r}; use one of {DEMO_CATEGORIES}.")
    rng = np.random.default_rng(_category_seed(seed, category))
    sources = _patch_sources(category)
    spec = _SPECS[category]
    out = []
    for i in range(N_TRAIN):
        out.append(DemoImage("train", GOOD, i, to_uint8(_clean_crop(category, rng)[0])))
    for i in range(N_TEST_GOOD):
        out.append(DemoImage("test", GOOD, i, to_uint8(_clean_crop(category, rng)[0])))
    for kind in DEFECT_KINDS:
        for i in range(N_PER_DEFECT):
            crop, shift = _clean_crop(category, rng)
            clean = to_uint8(crop)
            centres = _defect_centres(category, shift)
            image, mask = make_defect(clean, kind, rng, centres, sources, gray=spec.texture, scale=spec.scale,
                                      floor=spec.floor)
            out.append(DemoImage("test", kind, i, image, mask, clean))
    return out


# ----------------------------------------------------------------------------------------------
# writing and loading


def _write_category(folder: Path, images: list[DemoImage], gray: bool) -> None:
    for item in images:
        path = folder / item.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        # grey textures are stored as 1-channel PNGs (like MVTec AD's grid, screw, zipper)
        Image.fromarray(item.image[..., 0] if gray else item.image).save(path, compress_level=1)
        if item.mask is not None:
            mask_path = folder / "ground_truth" / item.defect / f"{item.index:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(item.mask.astype(np.uint8) * 255).save(mask_path, compress_level=1)


def _manifest(seed: int) -> dict:
    return {
        "dataset": "flowlib-demo",
        "version": DEMO_VERSION,
        "seed": int(seed),
        "image_side": IMAGE_SIDE,
        "categories": list(DEMO_CATEGORIES),
        "defect_kinds": list(DEFECT_KINDS),
        "counts": {"train": N_TRAIN, "test_good": N_TEST_GOOD, "test_per_defect": N_PER_DEFECT},
        "change_threshold": CHANGE_THRESHOLD,
    }


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_current(root: Path, seed: int) -> bool:
    found = _read_manifest(root)
    return found is not None and {k: found.get(k) for k in ("dataset", "version", "seed")} == {
        "dataset": "flowlib-demo", "version": DEMO_VERSION, "seed": int(seed)}


def demo_root(root: str | os.PathLike | None = None) -> Path:
    """The demo folder: ``root`` (or ``root/demo`` when that is the generated folder), else
    ``<data root>/demo``."""
    if root is None:
        return data_root() / DEFAULT_SUBDIR
    path = Path(root).expanduser()
    if not (path / MANIFEST).exists() and (path / DEFAULT_SUBDIR / MANIFEST).exists():
        return path / DEFAULT_SUBDIR
    return path


def ensure_demo_data(root: str | os.PathLike | None = None, seed: int = 0, force: bool = False) -> Path:
    """Generate the demo benchmark into ``root`` (default ``<data root>/demo``) unless it is there.

    The folder is reused when its ``manifest.json`` has this generator version and ``seed``.
    Otherwise (or with ``force``) everything is generated into a temporary sibling folder which then
    replaces ``root`` by a rename, so an interrupted run never leaves a half-written benchmark.
    A folder without a manifest is never overwritten.

    Returns:
        The demo folder (``<root>/<category>/train/good/000.png`` ...).
    """
    root = demo_root(root)
    if not force and _is_current(root, seed):
        return root
    if root.exists() and _read_manifest(root) is None and any(root.iterdir()):
        raise FileExistsError(f"'{root}' exists and is not a flowlib demo folder (no {MANIFEST}); "
                              f"delete it or pass another root to ensure_demo_data().")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for category in DEMO_CATEGORIES:
            _write_category(tmp / category, render_category(category, seed), gray=_SPECS[category].texture)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(seed), indent=2) + "\n")
        old = None
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(root, old)
        try:
            os.rename(tmp, root)
        except OSError:
            # another process finished first; keep its result if it is what we need
            if not _is_current(root, seed):
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_demo(category: str, split: str, root: str | os.PathLike | None = None,
              image_size: int | Sequence[int] | None = 256, seed: int = 0) -> AnomalyDataset:
    """One demo category (generated on first use) as an :class:`AnomalyDataset`."""
    if category not in DEMO_CATEGORIES:
        raise DatasetNotFoundError(f"Demo category '{category}' does not exist; "
                                   f"use one of {DEMO_CATEGORIES}.")
    path = ensure_demo_data(root, seed=seed)
    records = mvtec_layout_records(path, category, split, title="Demo benchmark", known=DEMO_CATEGORIES,
                                   tree=TREE, url="generated by flowlib.data.demo.ensure_demo_data()",
                                   subdir=DEFAULT_SUBDIR)
    return AnomalyDataset(records, category, image_size, name="demo", split=split, root=path)


def timed_generation(root: str | os.PathLike, seed: int = 0) -> float:
    """Seconds to generate the whole benchmark into ``root`` (forced)."""
    start = time.perf_counter()
    ensure_demo_data(root, seed=seed, force=True)
    return time.perf_counter() - start


def plot_demo_overview(root: str | os.PathLike | None = None, seed: int = 0):
    """One row per category: a good training crop, then one test image per defect kind with the
    mask outline in red. Returns the matplotlib ``Figure``."""
    import matplotlib.pyplot as plt

    path = ensure_demo_data(root, seed=seed)
    cols = ["good", *DEFECT_KINDS]
    rows = len(DEMO_CATEGORIES)
    fig, axes = plt.subplots(rows, len(cols), figsize=(1.7 * len(cols), 1.7 * rows), squeeze=False)
    for r, category in enumerate(DEMO_CATEGORIES):
        for c, kind in enumerate(cols):
            ax = axes[r, c]
            if kind == "good":
                img = np.asarray(Image.open(path / category / "train" / GOOD / "000.png").convert("RGB"))
                mask = None
            else:
                img = np.asarray(Image.open(path / category / "test" / kind / "000.png").convert("RGB"))
                mask = np.asarray(Image.open(path / category / "ground_truth" / kind / "000_mask.png")) > 0
            ax.imshow(img)
            if mask is not None:  # outline drawn a few pixels outside the mask, so the defect stays visible
                ring = ndimage.binary_dilation(mask, iterations=4)
                ax.contour(ring.astype(float), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(kind if kind != "good" else "good (train)", fontsize=10)
            if c == 0:
                ax.set_ylabel(category, fontsize=10)
    fig.tight_layout()
    return fig
