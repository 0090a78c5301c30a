"""Subnet constructors: functions ``f(c_in, c_out) -> nn.Module`` that coupling blocks call.

Coupling blocks never fix their subnets; they take a constructor, as FrEIA does, so one block serves
every paper. The subnets here predict the log-scale and shift of a coupling from its passive half.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flowlib.coupling import SubnetConstructor, concat_condition


def conv_subnet(kernel_size: int = 3, hidden_ratio: float = 1.0) -> SubnetConstructor:
    """Conv(k) → ReLU → Conv(k) with ``hidden = int(c_in · hidden_ratio)`` ("same" zero padding).

    FastFlow's subnet (ratio 1.0 for ResNets, 0.16 for the vision transformers).
    Input ``(B, c_in, H, W)`` → output ``(B, c_out, H, W)``.
    """

    def make(c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(c_in * hidden_ratio))
        pad = kernel_size // 2
        return nn.Sequential(
            nn.Conv2d(c_in, hidden, kernel_size, padding=pad),
            nn.ReLU(),
            nn.Conv2d(hidden, c_out, kernel_size, padding=pad),
        )

    return make


def alternating_kernels(n_steps: int, kernels: Sequence[int] = (3, 1)) -> list[int]:
    """Kernel size of each flow step when they alternate (FastFlow: 3, 1, 3, 1, ...)."""
    return [kernels[i % len(kernels)] for i in range(n_steps)]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of a ``(B, C, H, W)`` map (applied per position).

    The output has channels-last strides (it is normalised as ``(B, H, W, C)`` and viewed back), so a
    convolution that reads it runs in the channels-last layout; build that convolution with
    :func:`channels_last_conv` so that its weight is not converted at every call.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def channels_last_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` with its weight stored channels-last, for a convolution fed by :class:`ChannelLayerNorm`.

    Given a channels-last input, PyTorch computes the convolution in that layout and converts a
    channels-first weight on every call: 4 ms per call for MSFlow's 1024 × 576 × 3 × 3 weights at
    batch 1 on a CPU, a tenth of the convolution. Stored channels-last, the weight is used as it is; the
    outputs and gradients are the same values (``tests/test_msflow.py``). A reduction over the
    gradients, such as the norm of gradient clipping, may add them in another order (rounding only).
    """
    return conv.to(memory_format=torch.channels_last)


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes a map of few output positions on a CPU as one matrix product.

    For an output of ``L = H_out · W_out ≤ max_positions`` positions it unfolds the input into
    ``(B·L, C_in·k·k)`` rows and multiplies them by the transposed weight matrix ``(C_in·k·k, C_out)``,
    which is a convolution written out. PyTorch's own CPU path for such maps is slow with large
    weights: at batch 1 it uses its im2col kernel, whose matrix product ``(C_out, C_in·k·k) @
    (C_in·k·k, L)`` has only ``L`` columns, and at larger batches oneDNN's backward pass copes badly with
    2 × 2 maps. Measured on one CPU thread for a layer of CS-Flow at 256 px (``1024 → 304`` channels,
    3 × 3, 2 × 2 output): 4.0 → 1.25 ms at batch 1, and forward + backward 25 → 13.5 ms at batch 8
    (``benchmarks/README.md`` has the whole model). With small weights the extra Python operations
    cost more than they save, so the product is only used when all of these hold; otherwise this is
    ``nn.Conv2d``:

    * the input is a 4-D CPU tensor and the output has at most ``max_positions`` (9) positions;
    * the weight has at least ``min_weight_numel`` (2^20) entries and a kernel of at most 3 × 3;
    * one group, no dilation, numeric zero padding.

    The results equal ``nn.Conv2d``'s up to the order of floating-point additions
    (``tests/test_subnets.py``); the parameters and state dict are those of ``nn.Conv2d``.
    ``forward``: ``(B, C_in, H, W)`` → ``(B, C_out, H_out, W_out)``, contiguous.

    Example:
        >>> conv = SmallMapConv2d(256, 512, 3, padding=1)  # 1.18 M weights
        >>> x = torch.randn(1, 256, 2, 2)
        >>> conv.uses_matmul(x), conv.uses_matmul(torch.randn(1, 256, 4, 4))
        (True, False)
        >>> bool(torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5))
        True
    """

    max_positions = 9
    min_weight_numel = 1 << 20

    def _matmul_output_size(self, x: Tensor) -> tuple[int, int] | None:
        """``(H_out, W_out)`` if ``forward(x)`` takes the matrix-product path, else ``None``."""
        if not (x.device.type == "cpu" and x.ndim == 4 and self.groups == 1 and self.padding_mode == "zeros"
                and isinstance(self.padding, tuple) and self.dilation == (1, 1)
                and max(self.kernel_size) <= 3 and self.weight.numel() >= self.min_weight_numel):
            return None
        (kh, kw), (ph, pw), (sh, sw) = self.kernel_size, self.padding, self.stride
        h_out = (x.shape[-2] + 2 * ph - kh) // sh + 1
        w_out = (x.shape[-1] + 2 * pw - kw) // sw + 1
        if h_out > 0 and w_out > 0 and h_out * w_out <= self.max_positions:  # else nn.Conv2d (and its errors)
            return h_out, w_out
        return None

    def uses_matmul(self, x: Tensor) -> bool:
        """Whether ``forward(x)`` takes the matrix-product path (see the class docstring)."""
        return self._matmul_output_size(x) is not None

    def forward(self, x: Tensor) -> Tensor:
        size = self._matmul_output_size(x)
        if size is None:
            return super().forward(x)
        batch, (h_out, w_out) = x.shape[0], size
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (B, C_in·k·k, L)
        rows = cols.transpose(1, 2).reshape(batch * h_out * w_out, -1)
        weight = self.weight.reshape(self.out_channels, -1).t()
        out = rows @ weight if self.bias is None else torch.addmm(self.bias, rows, weight)  # (B·L, C_out)
        out = out.view(batch, h_out * w_out, -1).transpose(1, 2)
        return out.reshape(batch, -1, h_out, w_out).contiguous()


class ConvLayerNormSubnet(nn.Sequential):
    """Conv(k, c_in→c_in) → :class:`ChannelLayerNorm` → ReLU → Conv(k, c_in→c_out): MSFlow's subnet.

    ``c_in`` counts the coupling's passive half *and* its condition. The subnet takes the two separately
    (``takes_condition = True``, see :class:`~flowlib.coupling.AllInOneCoupling`):
    ``forward(x (B, c_x, H, W), cond (B or 1, c_in - c_x, H, W) or None) -> (B, c_out, H, W)``,
    the same function as ``Sequential(cat(x, cond))``. Two things make it cheaper:

    * a condition shared by the batch (MSFlow's positional encoding, batch 1) is not copied ``B`` times:
      the first convolution is split by input channels, ``conv(x; W_x) + conv(cond; W_c)``, and the
      condition's part is computed once and broadcast;
    * it runs channels-last: the input is converted once, so the first convolution computes in that
      layout, the LayerNorm reads its output without a copy, and the last convolution (weight stored
      channels-last by :func:`channels_last_conv`) continues in it. The output is handed back in the
      standard contiguous layout, like the coupling's other tensors: on a CPU an elementwise step
      between a channels-last and an NCHW tensor runs 5-15x slower than between two of one layout
      (MSFlow's quick head at batch 16: 64.4 → 60.6 ms per batch with this one copy).

    Both change the order of floating-point additions only (``tests/test_msflow.py`` compares with the
    concatenated input). A first layer other than a zero-padded, ungrouped ``nn.Conv2d`` gets the
    concatenation. The layer names stay ``0``–``3``, so state dicts are those of the plain ``nn.Sequential``.
    """

    takes_condition = True

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        first, rest = self[0], list(self)[1:]
        splittable = isinstance(first, nn.Conv2d) and first.groups == 1 and first.padding_mode == "zeros"
        if splittable and cond is not None and cond.shape[0] == 1 < x.shape[0]:
            n = x.shape[1]
            x = x.contiguous(memory_format=torch.channels_last)
            shared = F.conv2d(cond, first.weight[:, n:], None, first.stride, first.padding, first.dilation)
            # in x's layout: a broadcast sum of a channels-last and an NCHW tensor is ~15x slower on a CPU
            h = (F.conv2d(x, first.weight[:, :n], first.bias, first.stride, first.padding, first.dilation)
                 + shared.contiguous(memory_format=torch.channels_last))
        else:
            if cond is not None:
                x = concat_condition(x, cond)
            h = first(x.contiguous(memory_format=torch.channels_last))
        for layer in rest:
            h = layer(h)
        return h.contiguous()


def conv_ln_subnet(kernel_size: int = 3) -> SubnetConstructor:
    """Constructor of :class:`ConvLayerNormSubnet` (MSFlow's subnet) with ``k = kernel_size``."""

    def make(c_in: int, c_out: int) -> nn.Module:
        pad = kernel_size // 2
        return ConvLayerNormSubnet(
            nn.Conv2d(c_in, c_in, kernel_size, padding=pad),
            ChannelLayerNorm(c_in),
            nn.ReLU(),
            channels_last_conv(nn.Conv2d(c_in, c_out, kernel_size, padding=pad)),
        )

    return make


def mlp_subnet(hidden_ratio: float = 2.0) -> SubnetConstructor:
    """Linear(c_in → hidden) → ReLU → Linear(hidden → c_out), ``hidden = int(c_in · ratio)``.

    The per-position subnet of CFLOW-AD and HGAD; input ``(N, c_in)`` → ``(N, c_out)``.
    """

    def make(c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(c_in * hidden_ratio))
        return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))

    return make


class PerScale(nn.Module):
    """Applies one independent subnet per scale to a list of tensors (no cross-scale exchange)."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [net(x) for net, x in zip(self.nets, xs)]


def per_scale_subnet(constructor: SubnetConstructor) -> Callable[[list[int], list[int]], nn.Module]:
    """Lift a single-tensor constructor to the list form used by multi-scale couplings."""

    def make(c_in: list[int], c_out: list[int]) -> nn.Module:
        return PerScale([constructor(i, o) for i, o in zip(c_in, c_out)])

    return make
