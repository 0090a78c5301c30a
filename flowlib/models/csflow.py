"""CS-Flow: fully convolutional cross-scale normalizing flow on an image pyramid.

M. Rudolph, T. Wehrbein, B. Rosenhahn, B. Wandt, "Fully Convolutional Cross-Scale-Flows for Image-based
Defect Detection", WACV 2022, arXiv:2110.02855; official code ``marco-rudolph/cs-flow`` (commit
``88a13b8``), whose settings the ``paper`` preset follows.

Pipeline, for an image of side ``S`` (a multiple of 128):

1. Pyramid: the image at ``S, S/2, S/4`` (nearest resize); a frozen EfficientNet-B5 tapped at the end of
   its stage 6 (304 channels, stride 32) gives maps ``x_0, x_1, x_2`` of sides ``S/32, S/64, S/128``.
2. Flow: four blocks of [per-scale channel permutation → double affine coupling whose subnets are
   cross-scale convolutions] (:func:`flowlib.cross_scale.cross_scale_flow`) give latents ``z_0, z_1, z_2``.
3. Loss, per latent dimension: ``(½ Σ z² − log|det J|) / D`` averaged over the batch,
   ``D = Σ_i C·H_i·W_i``.
4. Image score: ``mean(z² / 2)`` over all latent entries of all scales. Anomaly map of scale ``i``:
   ``mean_c z_i²``, bilinearly upsampled to the image. ``anomaly_map="largest"`` keeps the largest scale
   only (the official visualisation); ``"product"`` multiplies the three upsampled maps (anomalib's
   implementation, used for the pixel numbers of the seed table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowlib.backbones import FeatureExtractor
from flowlib.cross_scale import check_pyramid_size, cross_scale_flow, pyramid_features
from flowlib.models.base import AnomalyModel, Features, MethodConfig, adam, register_method
from flowlib.resize import resize_sum

ANOMALY_MAPS = ("product", "largest")


@dataclass
class CSFlowConfig(MethodConfig):
    """CS-Flow settings; the defaults are the paper's (official code, MVTec AD at 768 × 768).

    Attributes:
        layer: backbone module tapped (``"blocks.5"``: end of EfficientNet stage 6).
        n_scales: pyramid levels.
        kernel_sizes: kernel size of each coupling block (its length is the number of blocks).
        hidden_channels: hidden width of the cross-scale convolutions.
        clamp: ``α`` of the atan soft clamp.
        leaky_slope: LeakyReLU slope in the subnets.
        anomaly_map: ``"product"`` (product of the upsampled per-scale maps) or ``"largest"``.
        adam_eps: Adam's ``eps`` (1e-4 in the official code; a stabiliser).
        flow_seed: seed of the fixed channel permutations.
    """

    backbone: str = "efficientnet_b5"
    layer: str = "blocks.5"
    input_size: int = 768
    epochs: int = 240
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 1e-5
    grad_clip: float | None = 1.0
    n_scales: int = 3
    kernel_sizes: tuple[int, ...] = (3, 3, 3, 5)
    hidden_channels: int = 1024
    clamp: float = 3.0
    leaky_slope: float = 0.1
    anomaly_map: str = "product"
    adam_eps: float = 1e-4
    flow_seed: int = 0


PRESETS: dict[str, CSFlowConfig] = {
    # the paper's setting: EfficientNet-B5 at 768 × 768, 240 epochs of batch 16
    "paper": CSFlowConfig(),
    # the 256 × 256 setting of anomalib's table (maps 8², 4², 2²)
    "paper-256": CSFlowConfig(input_size=256),
    # CPU tutorial: offline EfficientNet-Lite0 tapped at its stage 6 (192 channels, stride 32). 384 px gives
    # maps of 12², 6² and 3² (at 256 px the 8², 4², 2² maps miss most demo defects); a narrow flow, more
    # steps (batch 8) and a larger learning rate make up for the short schedule.
    "quick": CSFlowConfig(backbone="efficientnet_lite0", input_size=384, hidden_channels=32,
                          epochs=12, batch_size=8, lr=5e-3),
}


@register_method("csflow", CSFlowConfig, PRESETS,
                 description="CS-Flow (WACV 2022): cross-scale flow on an EfficientNet image pyramid")
class CSFlow(AnomalyModel):
    """CS-Flow as an :class:`flowlib.models.base.AnomalyModel`.

    ``extract`` returns the three backbone maps of the image pyramid (what the engine caches);
    ``forward(features)`` returns the latents (same shapes) and the ``(B,)`` log-determinant.

    Example:
        >>> cfg = CSFlowConfig(backbone="efficientnet_lite0", input_size=128, hidden_channels=8,
        ...                    kernel_sizes=(3,), pretrained=False)
        >>> model = CSFlow(cfg)
        >>> feats = model.extract(torch.rand(2, 3, 128, 128))
        >>> [tuple(f.shape) for f in feats]
        [(2, 192, 4, 4), (2, 192, 2, 2), (2, 192, 1, 1)]
        >>> maps, scores = model.predict(feats, (128, 128))
        >>> tuple(maps.shape), tuple(scores.shape)
        ((2, 128, 128), (2,))
    """

    def __init__(self, config: CSFlowConfig) -> None:
        super().__init__(config)
        if config.anomaly_map not in ANOMALY_MAPS:
            raise ValueError(f"anomaly_map={config.anomaly_map!r} is not known; use one of {ANOMALY_MAPS}.")
        if not config.kernel_sizes:
            raise ValueError("kernel_sizes is empty; give one kernel size per coupling block, "
                             "e.g. (3, 3, 3, 5).")
        self.backbone = FeatureExtractor(config.backbone, layers=[config.layer], pretrained=config.pretrained)
        channels, stride = self.backbone.channels[0], self.backbone.strides[0]
        check_pyramid_size(config.input_size, stride, config.n_scales)
        self.flow = cross_scale_flow([channels] * config.n_scales, kernel_sizes=config.kernel_sizes,
                                     hidden=config.hidden_channels, clamp=config.clamp,
                                     leaky_slope=config.leaky_slope, seed=config.flow_seed)

    def feature_shapes(self, side: int | None = None) -> list[tuple[int, int, int]]:
        """``(C, h, w)`` of each scale's feature map for square images of ``side`` (default: the config's)."""
        side = self.config.input_size if side is None else side
        return [self.backbone.feature_shapes(side // 2**s)[0] for s in range(self.config.n_scales)]

    @torch.no_grad()
    def extract(self, images: Tensor) -> Features:
        """Images ``(B, 3, S, S)`` in [0, 1] → ``[(B, C, S/32, S/32), (B, C, S/64, S/64), ...]``."""
        return pyramid_features(self.backbone, images, self.config.n_scales)

    def forward(self, features: Features) -> tuple[list[Tensor], Tensor]:
        """Latents ``[(B, C, H_i, W_i)]`` and log-determinant ``(B,)`` of the per-scale features."""
        return self.flow(list(features))

    def loss(self, features: Features, class_ids: Tensor | None = None) -> Tensor:
        """Negative log-likelihood per latent dimension, averaged over the batch."""
        zs, log_det = self(features)
        n_dims = sum(z[0].numel() for z in zs)
        half_sq = 0.5 * sum(z.pow(2).flatten(1).sum(1) for z in zs)
        return ((half_sq - log_det) / n_dims).mean()

    @staticmethod
    def scale_maps(zs: list[Tensor], image_size: tuple[int, int]) -> list[Tensor]:
        """Per-scale anomaly maps ``mean_c z²``, bilinearly upsampled: a list of ``(B, H, W)``."""
        return [resize_sum([z.pow(2).mean(1)], image_size, align_corners=False) for z in zs]

    def combine_maps(self, maps: list[Tensor]) -> Tensor:
        """The anomaly map chosen by ``config.anomaly_map`` from the per-scale maps: ``(B, H, W)``."""
        if self.config.anomaly_map == "largest":
            return maps[0]
        out = maps[0]
        for m in maps[1:]:
            out = out * m
        return out

    @staticmethod
    def image_scores(zs: list[Tensor]) -> Tensor:
        """``mean(z² / 2)`` over every latent entry of every scale: ``(B,)``."""
        n_dims = sum(z[0].numel() for z in zs)
        return sum(z.pow(2).flatten(1).sum(1) for z in zs) / (2 * n_dims)

    @torch.no_grad()
    def predict(self, features: Features, image_size: tuple[int, int],
                class_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        zs, _ = self(features)
        return self.combine_maps(self.scale_maps(zs, image_size)), self.image_scores(zs)

    def configure_optimizers(self, steps_per_epoch: int
                             ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        cfg = self.config
        opt = adam(self.trainable_parameters(), lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        return opt, None
