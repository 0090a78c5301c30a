"""Bilinear resizing of score maps as matrix products, and the sum of several resized maps as one product.

Every method ends by turning per-scale score maps ``(B, h_l, w_l)`` into image-sized maps ``(B, H, W)``
with bilinear interpolation. PyTorch's CPU kernel for it (``F.interpolate(mode="bilinear")``) spends about
2 ns per output value on the benchmark machine, whatever the input size: 1.9 ms for 16 maps of 256 × 256,
more than some heads spend on a convolution.

Bilinear resizing is linear and acts on rows and columns separately, so for one map ``X`` of ``h × w``

    resize(X) = A X Bᵀ,    A = R(h → H) of shape (H, h),   B = R(w → W) of shape (W, w),

where row ``i`` of an interpolation matrix ``R`` holds the two weights with which output ``i`` mixes its
two nearest inputs (:func:`interpolation_matrix`). A sum of resized maps of different sizes, which
MSFlow's and HGAD's aggregations need, becomes a single product with the matrices side by side:

    Σ_l A_l X_l B_lᵀ = [A_1 X_1 | A_2 X_2 | …] · [B_1 | B_2 | …]ᵀ.

Most entries of the matrices are zeros, but a matrix-product kernel does so many more operations per
second that MSFlow's three maps at batch 16 are resized and summed in 1.6 instead of 6.2 ms (0.14 instead
of 0.44 ms at batch 1). Results equal ``F.interpolate``'s up to float rounding: the same weights (PyTorch
computes the source coordinates in float32, these matrices are built in float64), added in another
order (``tests/test_resize.py``).

FLOP counts: the products run inside :class:`BilinearResize`, so ``FlopCounterMode.get_flop_counts()``
files them under ``"BilinearResize"``. The benchmarks leave them out of a head's FLOPs, as they leave out
the elementwise interpolation the products replace; a head's FLOP figure stays the model's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowlib.constants import shared_constant


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> Tensor:
    """The ``(n_out, n_in)`` matrix of 1-D bilinear (linear) resizing, as ``F.interpolate`` defines it.

    Output ``i`` reads the source coordinate ``c = i · (n_in − 1)/(n_out − 1)`` with ``align_corners``,
    else ``c = max(0, (i + ½) · n_in/n_out − ½)``, and mixes inputs ``⌊c⌋`` and ``min(⌊c⌋ + 1, n_in − 1)``
    with weights ``1 − λ`` and ``λ``, ``λ = c − ⌊c⌋``. Each row sums to 1. Built in float64, then cast.

    Example:
        >>> interpolation_matrix(2, 3, align_corners=True)
        tensor([[1.0000, 0.0000],
                [0.5000, 0.5000],
                [0.0000, 1.0000]])
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"interpolation_matrix needs sizes of at least 1, got {n_in} → {n_out}.")
    i = torch.arange(n_out, dtype=torch.float64)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros(1, dtype=torch.float64)
    else:
        src = ((i + 0.5) * (n_in / n_out) - 0.5).clamp_min(0.0)
    lo = src.floor().long().clamp_max(n_in - 1)
    hi = (lo + 1).clamp_max(n_in - 1)
    lam = src - lo
    rows = torch.arange(n_out)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix.index_put_((rows, lo), 1.0 - lam, accumulate=True)
    matrix.index_put_((rows, hi), lam, accumulate=True)
    return matrix.to(device=device, dtype=dtype)


@shared_constant(maxsize=64)
def _shared_plan(shapes: tuple[tuple[int, int], ...], size: tuple[int, int], align_corners: bool,
                 dtype: torch.dtype, device: torch.device) -> tuple[list[Tensor], Tensor]:
    """The row matrices ``A_l`` and the stacked, transposed column matrices ``[B_1 | B_2 | …]ᵀ``."""
    lefts = [interpolation_matrix(h, size[0], align_corners, dtype, device) for h, _ in shapes]
    right = torch.cat([interpolation_matrix(w, size[1], align_corners, dtype, device) for _, w in shapes], 1)
    return lefts, right.T.contiguous()


class BilinearResize(nn.Module):
    """Sum of bilinearly resized maps: ``forward([(B, h_l, w_l)], (H, W)) -> (B, H, W)``.

    ``Σ_l F.interpolate(x_l[:, None], (H, W), mode="bilinear", align_corners=…)[:, 0]`` up to float
    rounding, as two matrix products (see the module docstring); one map in the list is a plain resize.
    No parameters; the interpolation matrices are built once per sizes, dtype and device, and shared
    (:func:`flowlib.constants.shared_constant`).

    Example:
        >>> up = BilinearResize(align_corners=True)
        >>> up([torch.tensor([[[0.0, 2.0]]])], (1, 3))
        tensor([[[0., 1., 2.]]])
    """

    def __init__(self, align_corners: bool) -> None:
        super().__init__()
        self.align_corners = align_corners

    def extra_repr(self) -> str:
        return f"align_corners={self.align_corners}"

    def forward(self, maps: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        if not maps:
            raise ValueError("BilinearResize needs at least one map.")
        first = maps[0]
        for m in maps:
            if m.ndim != 3 or m.shape[0] != first.shape[0]:
                raise ValueError("BilinearResize takes maps of shape (B, h, w) with one batch size B, got "
                                 f"{[tuple(x.shape) for x in maps]}; squeeze a channel dimension first.")
            if m.dtype != first.dtype or m.device != first.device:
                raise ValueError("BilinearResize takes maps of one dtype and device, got "
                                 f"{[(x.dtype, str(x.device)) for x in maps]}.")
        size = (int(size[0]), int(size[1]))
        shapes = tuple((int(m.shape[1]), int(m.shape[2])) for m in maps)
        lefts, right = _shared_plan(shapes, size, self.align_corners, first.dtype, first.device)
        rows = [torch.matmul(a, m) for a, m in zip(lefts, maps)]  # (B, H, w_l): columns still to resize
        return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)) @ right


_RESIZERS = {True: BilinearResize(align_corners=True), False: BilinearResize(align_corners=False)}


def resize_sum(maps: Sequence[Tensor], size: tuple[int, int], align_corners: bool) -> Tensor:
    """``Σ_l`` bilinear resize of ``maps`` (each ``(B, h_l, w_l)``) to ``size``: ``(B, H, W)``.

    The one way the methods resize score maps (FastFlow excepted, which keeps ``F.interpolate`` so that
    its maps equal anomalib's bit for bit). Pass a one-map list for a plain resize.

    Example:
        >>> resize_sum([torch.ones(2, 4, 4), torch.ones(2, 2, 2)], (8, 8), align_corners=False).shape
        torch.Size([2, 8, 8])
    """
    return _RESIZERS[bool(align_corners)](maps, size)
