"""``flowlib.resize``: bilinear resizing as matrix products against ``F.interpolate``, and its errors.
How the benchmark's FLOP count treats the products: ``tests/test_benchmark_report.py``."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch.nn import functional as F

from flowlib import resize as resize_module
from flowlib.resize import interpolation_matrix, resize_sum

# (h, w) → (H, W): upsampling by integer and odd factors, equal sizes, downsampling, single rows/columns
SIZES = [((4, 4), (16, 16)), ((3, 5), (7, 11)), ((5, 5), (5, 5)), ((9, 7), (4, 3)), ((1, 1), (5, 7)),
         ((2, 3), (1, 1)), ((6, 4), (13, 2))]


def test_docstring_examples_run() -> None:
    result = doctest.testmod(resize_module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def _reference(maps, size, align_corners):
    return sum(F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=align_corners)[:, 0]
               for m in maps)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("n_in, n_out", [(4, 16), (5, 7), (5, 5), (9, 4), (1, 6), (3, 1), (32, 256)])
def test_interpolation_matrix_is_what_f_interpolate_does_to_unit_vectors(n_in, n_out, align_corners) -> None:
    # F.interpolate of the n_in unit rows gives the matrix's columns; float64 makes both exact to ~1e-15
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, 1, n_in)
    columns = F.interpolate(eye, size=(1, n_out), mode="bilinear", align_corners=align_corners)
    expected = columns.view(n_in, n_out).T
    got = interpolation_matrix(n_in, n_out, align_corners, dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.sum(1), torch.ones(n_out, dtype=torch.float64))


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_one_map_equals_f_interpolate(align_corners, dtype, atol) -> None:
    g = torch.Generator().manual_seed(0)
    for (h, w), size in SIZES:
        x = torch.randn(3, h, w, generator=g, dtype=dtype)
        out = resize_sum([x], size, align_corners=align_corners)
        assert out.shape == (3, *size) and out.dtype == dtype
        # float32: F.interpolate computes the source coordinate in float32, these matrices in float64
        torch.testing.assert_close(out, _reference([x], size, align_corners), rtol=0, atol=atol)


@pytest.mark.parametrize("align_corners", [True, False])
def test_a_sum_of_maps_of_different_sizes_equals_the_sum_of_resized_maps(align_corners) -> None:
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, 32, 32, generator=g, dtype=torch.float64),
            torch.randn(2, 16, 16, generator=g, dtype=torch.float64),
            torch.randn(2, 8, 8, generator=g, dtype=torch.float64),
            torch.randn(2, 3, 5, generator=g, dtype=torch.float64)]
    torch.testing.assert_close(resize_sum(maps, (64, 48), align_corners),
                               _reference(maps, (64, 48), align_corners), rtol=0, atol=1e-12)


def test_gradients_equal_f_interpolate_ones() -> None:
    g = torch.Generator().manual_seed(2)
    maps = [torch.randn(2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)]
    weight = torch.randn(2, 11, 9, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((resize_sum(maps, (11, 9), True) * weight).sum(), maps)
    ref = torch.autograd.grad((_reference(maps, (11, 9), True) * weight).sum(), maps)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_matrices_first_built_under_inference_mode_serve_autograd_later() -> None:
    with torch.inference_mode():
        resize_sum([torch.ones(1, 7, 3)], (13, 17), align_corners=True)
    x = torch.ones(1, 7, 3, requires_grad=True)
    resize_sum([x], (13, 17), align_corners=True).sum().backward()  # cached matrices are normal tensors
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_input_gets_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least one map"):
        resize_sum([], (4, 4), align_corners=True)
    with pytest.raises(ValueError, match=r"\(B, h, w\).*squeeze"):
        resize_sum([torch.ones(2, 1, 4, 4)], (8, 8), align_corners=True)
    with pytest.raises(ValueError, match="one batch size"):
        resize_sum([torch.ones(2, 4, 4), torch.ones(3, 2, 2)], (8, 8), align_corners=True)
    with pytest.raises(ValueError, match="one dtype"):
        resize_sum([torch.ones(2, 4, 4), torch.ones(2, 2, 2, dtype=torch.float64)], (8, 8), True)
    with pytest.raises(ValueError, match="at least 1"):
        interpolation_matrix(0, 4, align_corners=False)
