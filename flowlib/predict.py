"""Apply a trained checkpoint to new images: anomaly maps, overlays and scores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from flowlib.checkpoint import atomic_write_bytes, load_checkpoint
from flowlib.config import get_device

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _image_paths(source: str | os.PathLike) -> list[Path]:
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if paths:
            return paths
        raise FileNotFoundError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {source}.")
    raise FileNotFoundError(f"{source} is neither an image file nor a folder.")


def _load_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except Exception as err:
        raise ValueError(f"Could not read image {path}: {err}") from err
    return torch.from_numpy(array).permute(2, 0, 1)


def predict_images(checkpoint: str | os.PathLike, source: str | os.PathLike, out: str | os.PathLike,
                   device: str | None = None, category: str | None = None,
                   batch_size: int = 8, compile: bool = False) -> list[dict]:
    """Score every image of ``source`` (a file or a folder) with the model in ``checkpoint``.

    Writes to ``out``: ``<name>_map.npy`` (the anomaly map at the model's input size),
    ``<name>_overlay.png`` and ``scores.json`` (score per image, plus a ``defective`` verdict when the
    checkpoint stores an image threshold, which was chosen at best F1 on its test set).
    Returns the list of per-image entries written to ``scores.json``. ``compile=True`` compiles the
    model first (:meth:`~flowlib.models.base.AnomalyModel.compile_inference`): worth it for many images.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from flowlib.viz import plot_overlays

    device_t = get_device(device)
    model, extra = load_checkpoint(checkpoint, device=device_t)
    if compile:
        model.compile_inference()
    cats = extra.get("categories") or []
    if category is None and len(cats) > 1:
        raise ValueError(f"{checkpoint} is a unified model over {cats}; pass --category to say which one the "
                         f"images belong to.")
    category = category or (cats[0] if cats else None)
    class_id = cats.index(category) if category in cats else 0
    thresholds = extra.get("image_threshold", {})
    threshold = thresholds.get(category) if isinstance(thresholds, dict) else None
    size = model.config.input_size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = _image_paths(source)
    entries = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = torch.stack([_load_image(p, size) for p in chunk]).to(device_t)
        ids = torch.full((len(chunk),), class_id, dtype=torch.long, device=device_t)
        with torch.inference_mode():
            maps, scores = model.predict(model.extract(images), (size, size), ids)
        for path, image, amap, score in zip(chunk, images.cpu(), maps.cpu(), scores.cpu()):
            stem = path.stem
            np.save(out / f"{stem}_map.npy", amap.numpy())
            fig = plot_overlays(image[None], amap[None], titles=[f"{stem}: score {score.item():.4g}"])
            fig.savefig(out / f"{stem}_overlay.png", dpi=100)
            plt.close(fig)
            entry = {"image": str(path), "score": float(score)}
            if threshold is not None:
                entry["threshold"] = float(threshold)
                entry["defective"] = bool(score.item() >= threshold)
            entries.append(entry)
    data = json.dumps(entries, indent=2).encode()
    atomic_write_bytes(out / "scores.json", lambda f: f.write(data))
    return entries
