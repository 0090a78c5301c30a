"""Cross-scale pieces of CS-Flow: the input pyramid, the cross-scale convolution subnet and the flow.

Introduced for CS-Flow: M. Rudolph, T. Wehrbein, B. Rosenhahn, B. Wandt, "Fully Convolutional
Cross-Scale-Flows for Image-based Defect Detection", WACV 2022, arXiv:2110.02855. The layer layout
follows the official repository ``marco-rudolph/cs-flow`` at commit ``88a13b8`` (``freia_funcs.py``,
``model.py``); see ``flowlib.models.csflow`` for the model built from these pieces.

CS-Flow reads one backbone layer of the same image at ``n`` resolutions (a pyramid; sides ``S, S/2, S/4``)
and sends the ``n`` feature maps through *one* flow. Every coupling block predicts its scales and shifts
with a :class:`CrossScaleConv`, whose outputs at one scale depend on the neighbouring scales too, so a
defect seen clearly at one resolution raises the latent norm at the others.

Unlike the official code, whose inverse pass takes the shifts of its second step from the wrong subnet
output, the flow built here inverts exactly (:class:`flowlib.coupling.MultiScaleDoubleCoupling`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flowlib.coupling import ChannelPermutation, MultiScaleDoubleCoupling, SequentialFlow
from flowlib.subnets import SmallMapConv2d

__all__ = ["CrossScaleConv", "cross_scale_subnet", "image_pyramid", "pyramid_features",
           "cross_scale_flow", "check_pyramid_size"]


def check_pyramid_size(image_size: int, stride: int, n_scales: int, setting: str = "input_size") -> None:
    """Raise a clear error unless every pyramid level gives a feature map that halves exactly.

    The down path (stride-2 convolution) and the up path (×2 upsampling) of :class:`CrossScaleConv`
    only line up when each map is exactly twice the next one, i.e. when ``image_size`` is a multiple of
    ``stride · 2^(n_scales - 1)`` (128 for CS-Flow's stride 32 and three scales).
    """
    step = stride * 2 ** (n_scales - 1)
    if image_size <= 0 or image_size % step:
        lower = max(step, image_size // step * step)
        raise ValueError(f"{setting}={image_size} does not suit a {n_scales}-scale pyramid on a "
                         f"stride-{stride} backbone: it must be a multiple of {step} (e.g. {lower} or "
                         f"{lower + step}).")


def image_pyramid(images: Tensor, n_scales: int = 3, mode: str = "nearest") -> list[Tensor]:
    """The image at ``n_scales`` resolutions: sides ``H, H/2, H/4, ...`` (largest first).

    CS-Flow shrinks the *normalised* image with nearest-neighbour interpolation. Nearest resizing only
    picks pixels, so it commutes with the per-channel normalisation and can be applied to the raw
    ``[0, 1]`` images that :class:`flowlib.backbones.FeatureExtractor` normalises itself.

    Args:
        images: ``(B, 3, H, W)``.
        n_scales: number of levels (CS-Flow: 3).
        mode: ``F.interpolate`` mode (CS-Flow: ``"nearest"``, PyTorch's default).

    Returns:
        ``[(B, 3, H, W), (B, 3, H/2, W/2), ...]``.

    Example:
        >>> [tuple(x.shape) for x in image_pyramid(torch.rand(2, 3, 64, 64))]
        [(2, 3, 64, 64), (2, 3, 32, 32), (2, 3, 16, 16)]
    """
    if n_scales < 1:
        raise ValueError(f"n_scales must be at least 1, got {n_scales}.")
    h, w = images.shape[-2:]
    levels = [images]
    for s in range(1, n_scales):
        levels.append(F.interpolate(images, size=(h // 2**s, w // 2**s), mode=mode))
    return levels


def pyramid_features(backbone: Callable[[Tensor], list[Tensor]], images: Tensor, n_scales: int = 3
                     ) -> list[Tensor]:
    """Run one backbone on every level of the image pyramid: one feature map per scale.

    Args:
        backbone: maps images ``(B, 3, H, W)`` to a list whose first entry is the tapped map
            ``(B, C, H/s, W/s)`` (a :class:`flowlib.backbones.FeatureExtractor` with one layer).
        images: ``(B, 3, H, W)``.
        n_scales: pyramid levels (CS-Flow: 3).

    Returns:
        ``[(B, C, H/s, W/s), (B, C, H/2s, W/2s), ...]``.

    Example:
        >>> maps = pyramid_features(lambda x: [F.avg_pool2d(x, 4)], torch.rand(1, 3, 32, 32))
        >>> [tuple(f.shape) for f in maps]
        [(1, 3, 8, 8), (1, 3, 4, 4), (1, 3, 2, 2)]
    """
    return [backbone(level)[0] for level in image_pyramid(images, n_scales)]


class CrossScaleConv(nn.Module):
    """The subnet of a CS-Flow coupling: per-scale convolutions that exchange information across scales.

    For inputs ``x_0, ..., x_{n-1}`` (``x_0`` the largest; each map twice the size of the next):

        h_i = LeakyReLU(conv_i(x_i))                                   (c_in_i → hidden, k × k)
        o_i = same_i(h_i) + up_i(bilinear_×2(h_{i+1})) + down_i(h_{i-1})   (hidden → c_out_i, k × k)
        out_i = γ_i · o_i

    where ``down_i`` is a stride-2 convolution, terms with a missing neighbour are dropped, all
    convolutions have biases and "same" zero padding, and the scalars ``γ_i`` start at 0 so that a
    coupling built with this subnet starts as the identity. For three scales this is CS-Flow's
    ``CrossConvolutions``: 3 input convs, 3 same-scale, 2 up and 2 down convs, 3 γ. The convolutions are
    :class:`flowlib.subnets.SmallMapConv2d`: on a CPU, the coarsest scale of a small input (2 × 2 maps at
    256 px) is computed as one matrix product, which is faster there for CS-Flow's wide layers.

    Args:
        in_channels: ``c_in`` per scale.
        out_channels: ``c_out`` per scale.
        hidden: hidden width shared by the scales (CS-Flow: 1024).
        kernel_size: ``k`` of every convolution (CS-Flow: 3, 3, 3, 5 for its four blocks).
        leaky_slope: negative slope of the LeakyReLU (0.1).

    ``forward(xs)`` maps ``[(B, c_in_i, H_i, W_i)]`` to ``[(B, c_out_i, H_i, W_i)]``.

    Example:
        >>> net = CrossScaleConv([2, 2, 2], [4, 4, 4], hidden=8)
        >>> xs = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)]
        >>> outs = net(xs)
        >>> [tuple(o.shape) for o in outs], [bool((o == 0).all()) for o in outs]  # γ = 0 at start
        ([(1, 4, 8, 8), (1, 4, 4, 4), (1, 4, 2, 2)], [True, True, True])
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], hidden: int = 1024,
                 kernel_size: int = 3, leaky_slope: float = 0.1) -> None:
        super().__init__()
        if len(in_channels) != len(out_channels) or not in_channels:
            raise ValueError(f"CrossScaleConv needs one in and one out width per scale, got {in_channels} "
                             f"and {out_channels}.")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}.")
        n = len(in_channels)
        pad = kernel_size // 2
        self.n_scales = n
        self.leaky_slope = leaky_slope

        def conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
            return SmallMapConv2d(c_in, c_out, kernel_size, stride=stride, padding=pad)

        self.inner = nn.ModuleList(conv(c, hidden) for c in in_channels)
        self.same = nn.ModuleList(conv(hidden, c) for c in out_channels)
        # up[i] brings scale i+1 up to scale i; down[i] brings scale i down to scale i+1
        self.up = nn.ModuleList(conv(hidden, out_channels[i]) for i in range(n - 1))
        self.down = nn.ModuleList(conv(hidden, out_channels[i + 1], stride=2) for i in range(n - 1))
        self.gamma = nn.Parameter(torch.zeros(n))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        if len(xs) != self.n_scales:
            raise ValueError(f"CrossScaleConv was built for {self.n_scales} scales, got {len(xs)} tensors.")
        hs = [F.leaky_relu(conv(x), self.leaky_slope) for conv, x in zip(self.inner, xs)]
        outs = [same(h) for same, h in zip(self.same, hs)]
        for i in range(self.n_scales - 1):
            coarse = F.interpolate(hs[i + 1], size=hs[i].shape[-2:], mode="bilinear", align_corners=False)
            down = self.down[i](hs[i])
            if down.shape[-2:] != outs[i + 1].shape[-2:]:
                raise ValueError(f"Scale {i + 1} has size {tuple(outs[i + 1].shape[-2:])} but halving scale "
                                 f"{i} gives {tuple(down.shape[-2:])}; each feature map must be exactly "
                                 "twice the size of the next (use an input size that is a multiple of 128).")
            outs[i] = outs[i] + self.up[i](coarse)
            outs[i + 1] = outs[i + 1] + down
        return [o * self.gamma[i] for i, o in enumerate(outs)]


def cross_scale_subnet(hidden: int = 1024, kernel_size: int = 3, leaky_slope: float = 0.1
                       ) -> Callable[[list[int], list[int]], CrossScaleConv]:
    """List-subnet constructor for :class:`flowlib.coupling.MultiScaleDoubleCoupling`.

    Example:
        >>> block = MultiScaleDoubleCoupling([4, 4, 4], cross_scale_subnet(hidden=8), clamp=3.0)
        >>> type(block.r1).__name__
        'CrossScaleConv'
    """

    def make(c_in: list[int], c_out: list[int]) -> CrossScaleConv:
        return CrossScaleConv(c_in, c_out, hidden=hidden, kernel_size=kernel_size, leaky_slope=leaky_slope)

    return make


def cross_scale_flow(channels: Sequence[int], kernel_sizes: Sequence[int] = (3, 3, 3, 5), hidden: int = 1024,
                     clamp: float = 3.0, leaky_slope: float = 0.1, output_clamp: float | None = 1e6,
                     seed: int = 0) -> SequentialFlow:
    """CS-Flow's normalizing flow: one [permutation → cross-scale double coupling] block per kernel size.

    Each block first permutes the channels of every scale with its own fixed random permutation (drawn
    from a generator seeded with ``seed + block index``), then applies a Glow-style double affine
    coupling (atan soft clamp ``α = clamp``) whose two subnets are :class:`CrossScaleConv`.

    Args:
        channels: feature channels per scale (CS-Flow: ``[304, 304, 304]``).
        kernel_sizes: one kernel size per block (CS-Flow: 3, 3, 3, 5 → four blocks).
        hidden, leaky_slope: of the :class:`CrossScaleConv` subnets.
        clamp: ``α`` of the atan soft clamp (3).
        output_clamp: hard bound on every block's outputs (CS-Flow: ``1e6``, a safety net).
        seed: seed of the permutations.

    Returns:
        A :class:`flowlib.coupling.SequentialFlow`: ``zs, log_det = flow(xs)`` with ``xs`` a list of
        ``(B, C_i, H_i, W_i)`` and ``log_det`` of shape ``(B,)``; ``flow(zs, reverse=True)`` inverts it.

    Example:
        >>> flow = cross_scale_flow([4, 4, 4], kernel_sizes=(3, 3), hidden=8)
        >>> xs = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2)]
        >>> zs, log_det = flow(xs)
        >>> [tuple(z.shape) for z in zs], log_det.tolist()  # γ = 0: only permutes the channels
        ([(2, 4, 8, 8), (2, 4, 4, 4), (2, 4, 2, 2)], [0.0, 0.0])
    """
    blocks: list[nn.Module] = []
    for k, kernel_size in enumerate(kernel_sizes):
        generator = torch.Generator().manual_seed(seed + k)
        blocks.append(ChannelPermutation(list(channels), generator=generator))
        blocks.append(MultiScaleDoubleCoupling(
            channels, cross_scale_subnet(hidden, kernel_size, leaky_slope), clamp=clamp,
            output_clamp=output_clamp))
    return SequentialFlow(blocks)
