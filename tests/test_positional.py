"""The 2-D sinusoidal positional encoding (CFLOW-AD, BGAD, MSFlow, HGAD)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowlib.positional import positional_encoding_2d, shared_positional_encoding


def _reference(channels: int, height: int, width: int) -> np.ndarray:
    """The formula written out entry by entry (no vectorisation shared with the implementation)."""
    d = channels // 2
    pe = np.zeros((channels, height, width))
    for k in range(channels):
        half, j = divmod(k, d)  # half 0 encodes the column x, half 1 the row y
        i = j // 2
        omega = 10000.0 ** (-(2 * i) / d)
        for y in range(height):
            for x in range(width):
                pos = x if half == 0 else y
                pe[k, y, x] = math.sin(omega * pos) if j % 2 == 0 else math.cos(omega * pos)
    return pe


@pytest.mark.parametrize(("channels", "height", "width"), [(8, 3, 5), (16, 4, 4), (64, 2, 7)])
def test_matches_formula(channels: int, height: int, width: int) -> None:
    pe = positional_encoding_2d(channels, height, width, dtype=torch.float64)
    assert pe.shape == (channels, height, width)
    np.testing.assert_allclose(pe.numpy(), _reference(channels, height, width), atol=1e-12)


def test_columns_and_rows_separate() -> None:
    pe = positional_encoding_2d(16, 5, 6)
    d = 8
    # the first half varies along columns only, the second half along rows only
    assert torch.allclose(pe[:d], pe[:d, :1].expand(-1, 5, -1))
    assert torch.allclose(pe[d:], pe[d:, :, :1].expand(-1, -1, 6))
    # the lowest frequency is 1: channel 0 is sin(x), channel d + 1 is cos(y)
    assert torch.allclose(pe[0, 0], torch.sin(torch.arange(6.0)))
    assert torch.allclose(pe[d + 1, :, 0], torch.cos(torch.arange(5.0)))


def test_dtype_and_device() -> None:
    pe = positional_encoding_2d(8, 2, 2, device="cpu", dtype=torch.float16)
    assert pe.dtype == torch.float16 and pe.device.type == "cpu"


def test_rejects_channels_not_multiple_of_four() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 3, 3)


def test_shared_encoding_is_built_once_and_usable_for_training() -> None:
    with torch.inference_mode():  # first asked for while evaluating ...
        first = shared_positional_encoding(8, 3, 7)
    assert not first.is_inference()  # ... it must still serve later training steps
    assert shared_positional_encoding(8, 3, 7) is first
    torch.testing.assert_close(first, positional_encoding_2d(8, 3, 7), rtol=0, atol=0)
    double = shared_positional_encoding(8, 3, 7, dtype=torch.float64)
    assert double.dtype == torch.float64 and double is not first
    weight = torch.ones(8, 3, 7, requires_grad=True)
    (weight * first).sum().backward()  # an autograd graph may keep the shared tensor
    torch.testing.assert_close(weight.grad, first)


def test_shared_constant_docstring_example_runs() -> None:
    import doctest

    from flowlib import constants

    result = doctest.testmod(constants, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
