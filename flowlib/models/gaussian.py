"""Reference method: a per-position diagonal Gaussian on backbone features.

It is the simplest normalizing flow there is, an elementwise affine map per feature position,
``z = (x - μ) / σ`` with ``log|det J| = -Σ log σ``, trained by maximum likelihood with the same
engine as the papers' flows. It proves the pipeline end to end and is the baseline every flow in this
repository should beat on images whose normal variation is not position-wise Gaussian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowlib.backbones import FeatureExtractor
from flowlib.models.base import AnomalyModel, Features, MethodConfig, register_method
from flowlib.resize import resize_sum


@dataclass
class GaussianConfig(MethodConfig):
    """Backbone stages (``layers``) and a feature-map side (``feature_size``) fixed per preset."""

    layers: tuple[int, ...] = (2, 3)


PRESETS = {
    "quick": GaussianConfig(backbone="efficientnet_lite0", input_size=128, layers=(2, 3), epochs=40,
                            batch_size=8, lr=5e-2),
    "paper": GaussianConfig(backbone="wide_resnet50_2", input_size=256, layers=(1, 2, 3), epochs=30,
                            batch_size=32, lr=5e-2),
}


@register_method("gaussian", GaussianConfig, PRESETS,
                 "per-position diagonal Gaussian (elementwise affine flow), the pipeline's reference")
class PositionGaussian(AnomalyModel):
    """``z = (x - μ) / σ`` per channel and position; anomaly map = mean over channels of ``z²/2``."""

    def __init__(self, config: GaussianConfig) -> None:
        super().__init__(config)
        self.backbone = FeatureExtractor(config.backbone, layers=list(config.layers),
                                         pretrained=config.pretrained)
        side = config.input_size
        self.mean = nn.ParameterList()
        self.log_std = nn.ParameterList()
        for c, s in zip(self.backbone.channels, self.backbone.strides):
            h = -(-side // s)
            self.mean.append(nn.Parameter(torch.zeros(c, h, h)))
            self.log_std.append(nn.Parameter(torch.zeros(c, h, h)))

    def forward(self, features: Features) -> tuple[list[Tensor], Tensor]:
        """Features ``[(B, C_l, H_l, W_l)]`` → latents of the same shapes and ``(B,)`` log-dets."""
        zs, log_det = [], 0.0
        for x, mu, log_s in zip(features, self.mean, self.log_std):
            zs.append((x - mu) * torch.exp(-log_s))
            log_det = log_det - log_s.sum()
        return zs, torch.as_tensor(log_det).expand(features[0].shape[0])

    def loss(self, features: Features, class_ids: Tensor | None = None) -> Tensor:
        zs, log_det = self(features)
        dims = sum(z[0].numel() for z in zs)
        nll = sum(0.5 * z.pow(2).flatten(1).sum(1) for z in zs) - log_det
        return (nll / dims).mean()

    def predict(self, features: Features, image_size: tuple[int, int],
                class_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        zs, _ = self(features)
        amap = resize_sum([0.5 * z.pow(2).mean(1) for z in zs], image_size, align_corners=False) / len(zs)
        return amap, amap.flatten(1).amax(1)
