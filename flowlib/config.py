"""One place for the things every run needs: seeds, device, paths and the quick/paper switch.

The mode switch is the environment variable ``FLOWLIB_MODE`` (``quick`` or ``paper``); notebooks read
it through :func:`mode` so that one variable flips every notebook between the CPU tutorial and the
paper reproduction.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

#: Repository root (the folder that holds ``flowlib/``).
REPO_ROOT = Path(__file__).resolve().parent.parent

MODES = ("quick", "paper")


def mode(default: str = "quick") -> str:
    """Return the run mode chosen by ``FLOWLIB_MODE`` (``quick`` or ``paper``)."""
    value = os.environ.get("FLOWLIB_MODE", default).strip().lower()
    if value not in MODES:
        raise ValueError(f"FLOWLIB_MODE={value!r} is not a mode; use one of {MODES}.")
    return value


def seed_everything(seed: int) -> int:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) and return the seed.

    NumPy matters as well as torch: FrEIA 0.2 draws its fixed permutations from NumPy.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    return seed


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: the one asked for, else CUDA when present, else the CPU.

    Asking for a CUDA device that this machine does not have raises a ``ValueError`` that says so (rather
    than a driver error from deep inside the first tensor that moves).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r} asks for CUDA, but torch sees no CUDA device on this "
                             f"machine (torch {torch.__version__}). Use 'cpu', or leave the device unset to "
                             "take a GPU only where there is one.")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), "
                             f"numbered 0 to {count - 1}.")
    return dev


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Dataset root: the argument, else ``$FLOWLIB_DATA``, else ``<repo>/data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("FLOWLIB_DATA")
    return Path(env).expanduser() if env else REPO_ROOT / "data"


def results_dir(path: str | os.PathLike | None = None) -> Path:
    """Where run results (JSON) go: the argument, else ``$FLOWLIB_RESULTS``, else ``<repo>/results``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("FLOWLIB_RESULTS")
    return Path(env).expanduser() if env else REPO_ROOT / "results"


def figures_dir(subdir: str | None = None) -> Path:
    """``<repo>/figures`` (or a subfolder of it), created on demand."""
    path = REPO_ROOT / "figures"
    if subdir:
        path = path / subdir
    path.mkdir(parents=True, exist_ok=True)
    return path


def quiet_warnings() -> None:
    """Silence known, harmless third-party warnings so notebook output stays stable."""
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*scipy.*special_ortho_group.*")
