"""CPU memory reuse: glibc ``malloc`` settings that stop large tensors from costing fresh pages.

PyTorch takes the memory of every CPU tensor from the C library's ``malloc``. With glibc's defaults, a
block larger than the *mmap threshold* (128 KiB at start, raised on its own up to 32 MiB) is mapped
from the kernel when it is allocated and unmapped when it is freed, and memory freed at the top of
the heap is handed back once more than the *trim threshold* (twice the mmap threshold) is free. A
convolutional backbone allocates and frees megabytes of activations at every layer, so every call
pays page faults and the kernel's zeroing of each new page, again and again. Measured on this
project's 2-core CPU machine (one torch thread, EfficientNet-Lite0 at 256 px, FastFlow's quick
backbone; ``benchmarks/README.md``): 34 → 22 ms per image at batch 1 and 880 → 348 ms per batch of 16
once freed memory stayed in the process; the flow heads changed by a few per cent.

:func:`tune_malloc` raises both thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`), so freed
blocks are reused. It runs when :mod:`flowlib` is imported. What it costs: the process keeps the
memory of its largest working set after a peak instead of returning it (the peak itself is about the
same). It changes no computed value.

It does nothing when:

* the environment variable ``FLOWLIB_MALLOC`` is ``default`` (glibc's behaviour is kept);
* the process set glibc's own variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
  or ``GLIBC_TUNABLES`` with a ``glibc.malloc`` entry): those choices are respected;
* the C library is not glibc (macOS, Windows, musl); an allocator preloaded with ``LD_PRELOAD``
  (jemalloc, tcmalloc) ignores the call, and those reuse memory by design.

:data:`STATUS` says which case applied (the benchmarks record it).
"""

from __future__ import annotations

import ctypes
import os
import platform

#: Blocks up to this size come from the heap, where freed blocks are reused (256 MiB).
MMAP_THRESHOLD = 256 * 2**20
#: Free memory at the top of the heap is returned to the kernel only beyond this (1 GiB).
TRIM_THRESHOLD = 2**30
#: The glibc variables that do the same from outside the process (values in bytes).
GLIBC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
                     "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # the upper limit mallopt(3) documents for 64-bit systems
_CHOICES = ("tuned", "default")

#: What :func:`tune_malloc` did last: ``"tuned"`` (or ``"tuned (...)"``),
#: ``"default (FLOWLIB_MALLOC=default)"``, ``"set by the environment (...)"``, ``"not glibc (...)"``,
#: ``"not tuned: ..."`` or ``"not called"``.
STATUS = "not called"


def _glibc_choices_in_environment() -> list[str]:
    names = [name for name in GLIBC_ENVIRONMENT if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        names.append("GLIBC_TUNABLES")
    return names


def tune_malloc() -> str:
    """Let glibc's ``malloc`` reuse freed tensor memory (see the module docstring); returns :data:`STATUS`.

    Raises:
        ValueError: ``FLOWLIB_MALLOC`` is set to something other than ``tuned`` or ``default``.
    """
    global STATUS
    choice = os.environ.get("FLOWLIB_MALLOC", "tuned").strip().lower() or "tuned"
    if choice not in _CHOICES:
        raise ValueError(f"FLOWLIB_MALLOC={os.environ['FLOWLIB_MALLOC']!r} is not one of {_CHOICES}: use "
                         "'default' to keep glibc's malloc settings, or unset it to let flowlib tune them.")
    if choice == "default":
        STATUS = "default (FLOWLIB_MALLOC=default)"
        return STATUS
    own = _glibc_choices_in_environment()
    if own:
        STATUS = f"set by the environment ({', '.join(own)})"
        return STATUS
    libc, version = platform.libc_ver()
    if libc != "glibc":
        STATUS = f"not glibc ({platform.system()} {libc or 'unknown C library'}): left as it is"
        return STATUS
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as err:  # pragma: no cover - glibc without a loadable libc.so.6
        STATUS = f"not tuned: glibc {version} has no usable mallopt ({err})"
        return STATUS
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        STATUS = f"not tuned: glibc {version} refused the trim threshold"
    elif mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1:
        STATUS = "tuned"
    elif mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX) == 1:  # a glibc that enforces that limit
        STATUS = "tuned (mmap threshold 32 MiB, the documented limit this glibc enforces)"
    else:  # pragma: no cover - no known glibc refuses both
        STATUS = f"not tuned: glibc {version} refused the mmap threshold"
    return STATUS
