"""Tensors that depend only on their arguments, built once and shared between calls.

The models ask for the same fixed tensors at every forward pass: positional encodings
(:mod:`flowlib.positional`) and interpolation matrices (:mod:`flowlib.resize`). :func:`shared_constant`
caches such a builder with three rules:

* the cached tensors are normal tensors even when first asked for under ``torch.inference_mode()``, so
  a later training step can use them;
* while ``torch.compile`` traces, the builder runs as it is, and the compiled graph folds its result into
  a constant itself;
* the results are shared between callers: treat them as read-only.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, wraps
from typing import TypeVar

import torch

T = TypeVar("T")


def shared_constant(maxsize: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: cache ``build(*args)`` per (hashable) arguments, up to ``maxsize`` entries.

    Example:
        >>> @shared_constant(maxsize=4)
        ... def ramp(n: int) -> torch.Tensor:
        ...     return torch.arange(n)
        >>> with torch.inference_mode():
        ...     r = ramp(3)
        >>> r is ramp(3), r.is_inference()
        (True, False)
    """

    def decorate(build: Callable[..., T]) -> Callable[..., T]:
        @lru_cache(maxsize=maxsize)
        def cached(*args) -> T:
            with torch.inference_mode(False):
                return build(*args)

        @wraps(build)
        def get(*args) -> T:
            compiling = getattr(torch.compiler, "is_compiling", None)
            if compiling is not None and compiling():
                return build(*args)
            return cached(*args)

        return get

    return decorate
