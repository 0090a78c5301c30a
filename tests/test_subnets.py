"""SmallMapConv2d: its matrix-product path computes nn.Conv2d's function and is taken only where meant."""

import pytest
import torch
from torch import nn

from flowlib.cross_scale import CrossScaleConv
from flowlib.subnets import SmallMapConv2d


def _pair(c_in, c_out, kernel, stride=1, padding=1, bias=True, min_weight_numel=0, seed=0, **kwargs):
    """A SmallMapConv2d and an nn.Conv2d with the same weights; the size threshold lowered for small tests."""
    torch.manual_seed(seed)
    ref = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias, **kwargs)
    new = SmallMapConv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias, **kwargs)
    new.load_state_dict(ref.state_dict())
    new.min_weight_numel = min_weight_numel
    return new, ref


@pytest.mark.parametrize("batch,side,stride,kernel,bias", [
    (1, 2, 1, 3, True), (1, 3, 1, 3, True), (3, 2, 1, 3, False), (2, 4, 2, 3, True), (1, 5, 2, 3, True),
    (2, 3, 1, 1, True), (1, 3, 1, (1, 3), True),
])
def test_matmul_path_equals_conv2d_with_gradients(batch, side, stride, kernel, bias):
    padding = (0, 1) if kernel == (1, 3) else (1 if kernel == 3 else 0)
    new, ref = _pair(6, 5, kernel, stride=stride, padding=padding, bias=bias)
    x = torch.randn(batch, 6, side, side, requires_grad=True)
    assert new.uses_matmul(x)
    out, expected = new(x), ref(x)
    assert type(out.grad_fn).__name__ != type(expected.grad_fn).__name__  # the other path really ran
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, [x, *new.parameters()], grad)
    want = torch.autograd.grad(expected, [x, *ref.parameters()], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_matmul_path_passes_gradcheck():
    new, _ = _pair(3, 4, 3, stride=2)
    new.double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert new.uses_matmul(x)
    assert torch.autograd.gradcheck(new, (x,))


@pytest.mark.parametrize("case,kwargs,side", [
    ("map too large (16 positions)", {}, 4),
    ("kernel larger than 3", {"kernel": 5, "padding": 2}, 2),
    ("grouped", {"groups": 2}, 2),
    ("dilated", {"dilation": 2, "padding": 2}, 1),
    ("reflect padding", {"padding_mode": "reflect"}, 2),
    ("string padding", {"padding": "same"}, 2),
    ("weight below the size threshold", {"min_weight_numel": 10**6}, 2),
])
def test_other_cases_are_plain_conv2d(case, kwargs, side):
    kernel = kwargs.pop("kernel", 3)
    new, ref = _pair(6, 4, kernel, **{"padding": 1, **kwargs})
    x = torch.randn(2, 6, side, side)
    assert not new.uses_matmul(x), case
    assert torch.equal(new(x), ref(x)), case


def test_input_smaller_than_the_kernel_gets_conv2d_error():
    new, ref = _pair(6, 4, 3, padding=0)
    x = torch.randn(1, 6, 2, 2)
    assert not new.uses_matmul(x)
    with pytest.raises(RuntimeError) as expected:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        new(x)
    assert str(got.value) == str(expected.value)


def test_default_threshold_is_for_wide_layers_only():
    small = SmallMapConv2d(32, 192, 3, padding=1)  # CS-Flow quick preset: stays a convolution
    wide = SmallMapConv2d(1024, 304, 3, padding=1)  # CS-Flow at 256 px: 2 × 2 maps as a matrix product
    x_small, x_wide = torch.randn(1, 32, 3, 3), torch.randn(1, 1024, 2, 2)
    assert not small.uses_matmul(x_small)
    assert wide.uses_matmul(x_wide)
    assert not wide.uses_matmul(torch.randn(1, 1024, 6, 6))
    with torch.no_grad():
        expected = nn.functional.conv2d(x_wide, wide.weight, wide.bias, padding=1)
        torch.testing.assert_close(wide(x_wide), expected, rtol=1e-4, atol=1e-5)


def test_cross_scale_conv_keeps_conv2d_parameters_and_state_dict():
    net = CrossScaleConv([3, 3, 3], [4, 4, 4], hidden=5)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10 and all(isinstance(m, SmallMapConv2d) for m in convs)
    plain = {name: p.shape for name, p in nn.Conv2d(3, 5, 3, padding=1).state_dict().items()}
    assert {name: p.shape for name, p in net.inner[0].state_dict().items()} == plain
