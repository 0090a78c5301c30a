"""Checks shared by the flow tests: noisy parameters, and log|det J| from the full autograd Jacobian."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def randomize(module: nn.Module, seed: int, scale: float = 0.3, add: bool = False) -> nn.Module:
    """Put noise in every parameter (replace it, or ``add`` to it) so that no block sits at its
    identity-like initialisation, where a wrong log-determinant could still come out right."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.add_(noise) if add else p.copy_(noise)
    return module


def flat(xs: Sequence[Tensor]) -> Tensor:
    """``[(B, *s_i)]`` → ``(B, Σ prod(s_i))``."""
    return torch.cat([x.reshape(x.shape[0], -1) for x in xs], dim=1)


def unflat(v: Tensor, shapes: Sequence[tuple[int, ...]]) -> list[Tensor]:
    """The inverse of :func:`flat` for per-sample shapes ``shapes``."""
    out, start = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(v[:, start:start + n].reshape(v.shape[0], *s))
        start += n
    return out


def jacobian_log_det(fn: Callable, x: Tensor | Sequence[Tensor]) -> Tensor:
    """``log|det ∂fn(x_b)/∂x_b|`` of every sample ``b`` by brute force (use float64): ``(B,)``.

    ``x`` is one tensor ``(B, ...)`` or a list of them (a multi-scale input); ``fn`` takes and returns the
    same kind of thing (its output may be a tensor or a list whatever its input).
    """
    single = isinstance(x, Tensor)
    xs = [x] if single else list(x)
    shapes = [tuple(t.shape[1:]) for t in xs]

    def as_vector(v: Tensor) -> Tensor:
        parts = unflat(v.unsqueeze(0), shapes)
        out = fn(parts[0] if single else parts)
        return flat([out] if isinstance(out, Tensor) else out)[0]

    log_dets = []
    for b in range(xs[0].shape[0]):
        jac = torch.autograd.functional.jacobian(as_vector, flat([t[b:b + 1] for t in xs])[0])
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0, "the Jacobian is singular"
        log_dets.append(logabs)
    return torch.stack(log_dets)
