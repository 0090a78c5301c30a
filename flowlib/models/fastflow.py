"""FastFlow: an independent 2-D normalizing flow on each feature map of a frozen backbone.

J. Yu, Y. Zheng, X. Wang, W. Li, Y. Wu, R. Zhao, L. Wu, "FastFlow: Unsupervised Anomaly Detection and
Localization via 2D Normalizing Flows", arXiv:2111.07677, 2021. There is no official code; the settings
follow the two open implementations, ``gathierry/FastFlow`` (commit ``2cf1f2f``) and anomalib's
(``openvinotoolkit/anomalib``, commit ``161bb36``), which agree on every point used here.

Pipeline, for an image of side ``S``:

1. Features: a frozen backbone gives maps ``x_i`` of shape ``(B, C_i, H_i, W_i)``. For the CNNs
   (ResNet-18, Wide-ResNet-50-2, EfficientNet-Lite0) each map goes through a *trainable*
   ``LayerNorm([C_i, H_i, W_i])`` (not in the paper, but needed by both implementations, see
   ``gathierry/FastFlow#3``). The vision transformers use their own frozen final norm instead.
2. Flow: per map an independent chain of ``flow_steps`` :class:`~flowlib.coupling.AllInOneCoupling`
   steps (tanh clamp ``α = 2``, global affine, hard channel permutation), whose subnets are
   ``Conv_k → ReLU → Conv_k`` with ``k`` alternating 3, 1, 3, 1, ... (or always 3) and hidden width
   ``hidden_ratio × (C − C//2)``. Fully convolutional: the flow sees a 2-D map, not isolated vectors.
3. Loss: ``Σ_i mean_batch(½ ‖z_i‖² − log|det J_i|)`` (no normalisation by the dimension).
4. Anomaly map: ``mean_i up(−exp(−½ · mean_c z_i²))`` (bilinear upsampling to the image), in [−1, 0];
   image score = the map's maximum. The log-determinant is not used for scoring.

Example (no weights needed):
    >>> from flowlib.models import build_model
    >>> model = build_model("fastflow", "quick", pretrained=False, input_size=128)
    >>> feats = model.extract(torch.rand(2, 3, 128, 128))
    >>> maps, scores = model.predict(feats, (128, 128))
    >>> tuple(maps.shape), tuple(scores.shape), bool(maps.max() <= 0)
    ((2, 128, 128), (2,), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flowlib.backbones import FeatureExtractor
from flowlib.coupling import AllInOneCoupling, SequentialFlow
from flowlib.models.base import AnomalyModel, Features, MethodConfig, register_method
from flowlib.subnets import alternating_kernels, conv_subnet


def fastflow_steps(channels: int, flow_steps: int = 8, hidden_ratio: float = 1.0,
                   conv3x3_only: bool = False, clamp: float = 2.0,
                   generator: torch.Generator | None = None) -> SequentialFlow:
    """FastFlow's flow for one feature map: ``flow_steps`` AllInOne couplings, ``(B, C, H, W) → same``.

    Step ``i`` uses a ``Conv_k → ReLU → Conv_k`` subnet with ``k = 3`` for even ``i`` and ``k = 1`` for
    odd ``i`` (``conv3x3_only=True``: always 3, gathierry's ResNet-18 setting).

    Example:
        >>> flow = fastflow_steps(8, flow_steps=4)
        >>> x = torch.randn(2, 8, 6, 6)
        >>> z, log_det = flow(x)
        >>> bool(torch.allclose(flow(z, reverse=True)[0], x, atol=1e-5)), tuple(log_det.shape)
        (True, (2,))
    """
    kernels = [3] * flow_steps if conv3x3_only else alternating_kernels(flow_steps, (3, 1))
    return SequentialFlow([
        AllInOneCoupling(channels, conv_subnet(k, hidden_ratio), clamp=clamp, generator=generator)
        for k in kernels
    ])


def anomaly_map(latents: Sequence[Tensor], image_size: tuple[int, int]) -> Tensor:
    """FastFlow's map: mean over scales of ``−exp(−½ · mean_c z²)``, upsampled bilinearly.

    Args:
        latents: one ``(B, C_i, H_i, W_i)`` tensor per scale.
        image_size: ``(H, W)`` of the output.

    Returns:
        ``(B, H, W)`` in ``[−1, 0]``; higher = more anomalous (``−1`` where ``z = 0``, the mode).

    Example:
        >>> z = torch.zeros(1, 4, 2, 2)
        >>> z[0, :, 0, 0] = 10.0
        >>> m = anomaly_map([z], (2, 2))
        >>> [round(v, 3) for v in m.flatten().tolist()]
        [-0.0, -1.0, -1.0, -1.0]
    """
    total = None
    for z in latents:
        prob = torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True))
        up = F.interpolate(-prob, size=image_size, mode="bilinear", align_corners=False)
        total = up if total is None else total + up
    if total is None:
        raise ValueError("anomaly_map needs at least one latent tensor.")
    return (total / len(latents))[:, 0]


@dataclass
class FastFlowConfig(MethodConfig):
    """FastFlow settings. The defaults are the CPU tutorial (``quick``); see :data:`PRESETS`.

    Attributes:
        layers: backbone taps (timm feature-stage indices for CNNs, the last block index for the
            vision transformers); ``None`` = the backbone's default.
        flow_steps: AllInOne coupling steps per feature map (8 for CNNs, 20 for the transformers).
        hidden_ratio: subnet hidden width / passive half width (1.0 CNNs, 0.16 transformers).
        conv3x3_only: all subnets 3×3 (gathierry's ResNet-18) instead of alternating 3×3 / 1×1.
        clamp: ``α`` of the tanh soft clamp.
        layer_norm: trainable ``LayerNorm([C, H, W])`` on each map (CNNs); off for the transformers,
            whose feature extractor already applies the model's final norm.
        flow_seed: seed of the fixed channel permutations.
    """

    backbone: str = "efficientnet_lite0"
    layers: tuple[int | str, ...] | None = (2, 3)
    input_size: int = 256
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-5
    flow_steps: int = 8
    hidden_ratio: float = 1.0
    conv3x3_only: bool = False
    clamp: float = 2.0
    layer_norm: bool = True
    flow_seed: int = 0


def _paper(**kw) -> FastFlowConfig:
    # gathierry's training schedule: 500 epochs of batch 32, Adam 1e-3 / wd 1e-5, no clipping
    return FastFlowConfig(epochs=500, batch_size=32, lr=1e-3, weight_decay=1e-5, **kw)


_CAIT = dict(backbone="cait_m48_448", layers=(40,), input_size=448, flow_steps=20, hidden_ratio=0.16,
             layer_norm=False)

PRESETS: dict[str, FastFlowConfig] = {
    # the paper's headline numbers (99.4 image / 98.5 pixel AUROC) use CaiT-M48 at 448 px
    "paper": _paper(**_CAIT),
    "paper-cait": _paper(**_CAIT),
    "paper-deit": _paper(backbone="deit_base_distilled_patch16_384", layers=(7,), input_size=384,
                         flow_steps=20, hidden_ratio=0.16, layer_norm=False),
    "paper-resnet18": _paper(backbone="resnet18", layers=(1, 2, 3), input_size=256, conv3x3_only=True),
    "paper-wide_resnet50_2": _paper(backbone="wide_resnet50_2", layers=(1, 2, 3), input_size=256),
    # CPU tutorial: offline EfficientNet-Lite0 at 256 px, stages of stride 8 and 16 (40 and 112 channels,
    # maps 32² and 16²); small batches give enough optimiser steps on 60 training images
    "quick": FastFlowConfig(),
}


@register_method("fastflow", FastFlowConfig, PRESETS,
                 description="FastFlow (arXiv 2111.07677): per-scale 2-D AllInOne flows")
class FastFlow(AnomalyModel):
    """FastFlow on a frozen backbone (see the module docstring for the equations).

    ``extract`` returns the raw backbone maps, *before* the trainable LayerNorm, so cached features stay
    valid while the LayerNorm trains. All other calls take those maps.
    """

    def __init__(self, config: FastFlowConfig) -> None:
        super().__init__(config)
        layers = list(config.layers) if config.layers is not None else None
        self.backbone = FeatureExtractor(config.backbone, layers=layers, pretrained=config.pretrained,
                                         input_size=config.input_size)
        channels = list(self.backbone.channels)
        self.feature_shapes = self.backbone.feature_shapes(config.input_size)
        self.norms = nn.ModuleList(
            nn.LayerNorm(list(shape)) if config.layer_norm else nn.Identity() for shape in self.feature_shapes
        )
        generator = torch.Generator().manual_seed(config.flow_seed)
        self.flows = nn.ModuleList(
            fastflow_steps(c, config.flow_steps, config.hidden_ratio, config.conv3x3_only, config.clamp,
                           generator=generator)
            for c in channels
        )

    def _check_features(self, features: Features) -> None:
        if len(features) != len(self.flows):
            raise ValueError(f"FastFlow expects {len(self.flows)} feature maps "
                             f"(layers={self.config.layers}), got {len(features)}.")
        if not self.config.layer_norm:
            return
        for i, (f, norm) in enumerate(zip(features, self.norms)):
            if tuple(f.shape[1:]) != tuple(norm.normalized_shape):
                raise ValueError(
                    f"FastFlow's LayerNorm of scale {i} was built for maps {tuple(norm.normalized_shape)} "
                    f"(input_size={self.config.input_size}), but got {tuple(f.shape[1:])}. Feed images of "
                    f"{self.config.input_size} px or build the model with a matching input_size.")

    def forward(self, features: Features) -> tuple[list[Tensor], Tensor]:
        """Backbone maps ``[(B, C_i, H_i, W_i)]`` → latents (same shapes) and ``log|det J|`` ``(B,)``.

        The log-det covers the flows only, as in both open implementations: the trainable LayerNorm is
        treated as preprocessing. Its Jacobian is therefore missing from the likelihood, so shrinking
        its scale ``γ`` while the flows' global affine grows lowers the loss without changing ``z``;
        one plausible reason why long training can hurt (gathierry/FastFlow#4).
        """
        self._check_features(features)
        latents, log_det = [], None
        for x, norm, flow in zip(features, self.norms, self.flows):
            z, ld = flow(norm(x))
            latents.append(z)
            log_det = ld if log_det is None else log_det + ld
        return latents, log_det

    def loss(self, features: Features, class_ids: Tensor | None = None) -> Tensor:
        latents, log_det = self(features)
        sq = sum(0.5 * z.pow(2).flatten(1).sum(dim=1) for z in latents)
        return (sq - log_det).mean()

    @torch.no_grad()
    def predict(self, features: Features, image_size: tuple[int, int],
                class_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        latents, _ = self(features)
        maps = anomaly_map(latents, tuple(image_size))
        return maps, maps.flatten(1).amax(dim=1)

    def num_flow_parameters(self) -> int:
        """Trainable parameters of the flows alone (what the paper counts as "A.d. param")."""
        return sum(p.numel() for p in self.flows.parameters() if p.requires_grad)

    def num_norm_parameters(self) -> int:
        """Trainable parameters of the LayerNorms (0 for the transformers)."""
        return sum(p.numel() for p in self.norms.parameters() if p.requires_grad)
