"""Checkpoints that are safe to load: written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict of tensors and JSON-like values::

    {"format": "flowlib-checkpoint-v1", "method": str, "config": dict, "state_dict": {...}, "extra": dict}

The frozen backbone is not stored (it is rebuilt from its name and pretrained weights), so a FastFlow
checkpoint holds only the flow and its LayerNorms.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from flowlib.models.base import AnomalyModel, build_model, config_from_dict

FORMAT = "flowlib-checkpoint-v1"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def atomic_write_bytes(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then rename it into place.

    A crash or error leaves any existing ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_checkpoint(model: AnomalyModel, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model`` (config + trainable head, no backbone) to ``path`` atomically."""
    payload = {
        "format": FORMAT,
        "method": model.method,
        "config": _jsonable(model.config.to_dict()),
        "state_dict": {k: v.detach().cpu() for k, v in model.head_state_dict().items()},
        "extra": _jsonable(extra or {}),
    }
    return atomic_write_bytes(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint dict without executing any pickled code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; train one with "
                                f"`python -m flowlib run METHOD ... --save-checkpoints`.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or a pickle that is not plain tensors/containers
        raise ValueError(f"Could not read checkpoint {path} as a flowlib checkpoint "
                         f"(weights_only=True refused or the file is damaged): {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a flowlib checkpoint (expected format {FORMAT!r}).")
    return payload


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None,
                    **config_overrides: Any) -> tuple[AnomalyModel, dict]:
    """Rebuild the model stored in ``path``; returns ``(model, extra)``.

    ``config_overrides`` change settings that do not affect the weights (e.g. ``pretrained=False``
    to rebuild without downloading backbone weights, for inspection only).
    """
    payload = read_checkpoint(path)
    config = config_from_dict(payload["method"], payload["config"])
    if config_overrides:
        config = config.replace(**config_overrides)
    model = build_model(payload["method"], config=config)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"Checkpoint {path} does not match the {payload['method']} model built from its "
                         f"config: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    if device is not None:
        model.to(device)
    model.eval()
    return model, payload.get("extra", {})
