"""MSFlow: asymmetric parallel flows, one fusion flow, two aggregations.

Paper: Zhou, Xu, Song, Shen, Shen, "MSFlow: Multi-Scale Flow-based Framework for Unsupervised Anomaly
Detection", IEEE TNNLS 2024, arXiv:2308.15300. Official code: cool-xuan/msflow (commit e239755), whose
configuration the ``paper`` preset follows.

Pipeline for an image ``(B, 3, S, S)``:

1. a frozen backbone (Wide-ResNet-50-2 with reflect padding) gives three maps (strides 4, 8, 16), each
   average-pooled ``3×3 / stride 2 / pad 1`` → ``(B, C_l, S/2^(l+3), S/2^(l+3))``; the pooling is part
   of :meth:`MSFlow.extract`, so cached features are already pooled;
2. **parallel flows**: one chain of :class:`~flowlib.coupling.AllInOneCoupling` blocks per scale, deeper for
   coarser scales (2 / 5 / 8 blocks), each conditioned on a 64-channel 2-D sin/cos positional encoding;
3. **fusion flow** (:func:`flowlib.fusion.fusion_flow`): one coupling layer whose subnets mix all scales;
4. loss: ``mean_batch[Σ_l ½‖z_l‖² - log|det J|]``, not divided by the dimension;
5. scores (:mod:`flowlib.aggregation`): the image score is the top-3 % mean of the multiplicative
   (detection) map, the anomaly map is the additive (localisation) map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flowlib.aggregation import msflow_scores
from flowlib.backbones import FeatureExtractor
from flowlib.coupling import AllInOneCoupling, SequentialFlow
from flowlib.fusion import fusion_flow
from flowlib.models.base import AnomalyModel, Features, MethodConfig, adam, register_method
from flowlib.positional import shared_positional_encoding
from flowlib.subnets import conv_ln_subnet


@dataclass
class MSFlowConfig(MethodConfig):
    """MSFlow settings (defaults = the official configuration).

    Attributes:
        layers: backbone stages tapped (timm feature indices; 1, 2, 3 = ResNet layer1–3).
        padding_mode: padding of the backbone's convolutions (``"reflect"`` as in the official code).
        input_size_overrides: per-category input side; the engine reads it (the official log trains
            transistor at 256 px, every other category at 512 px).
        pool: ``"avg"`` (official), ``"max"`` or ``"none"``: the 3×3 / stride-2 pooling of each map.
        parallel_blocks: AllInOne blocks per scale, fine to coarse.
        clamp: soft-clamp ``α`` of every coupling (tanh in the parallel flows, atan in the fusion flow).
        cond_channels: channels of the positional encoding given to the parallel flows.
        fusion_hidden_ratio: width of the fusion subnet's mixing convolution relative to its input.
        top_k: fraction of the detection map averaged into the image score.
        warmup_epochs, warmup_from: linear learning-rate warm-up from ``warmup_from · lr`` to ``lr``.
        lr_milestones, lr_gamma: the learning rate is multiplied by ``lr_gamma`` at these epochs.
    """

    backbone: str = "wide_resnet50_2"
    layers: tuple[int | str, ...] = (1, 2, 3)
    padding_mode: str = "reflect"
    input_size: int = 512
    input_size_overrides: dict[str, int] = field(default_factory=lambda: {"transistor": 256})
    pool: str = "avg"
    parallel_blocks: tuple[int, ...] = (2, 5, 8)
    clamp: float = 1.9
    cond_channels: int = 64
    fusion_hidden_ratio: float = 0.25
    top_k: float = 0.03
    epochs: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    grad_clip: float | None = 2.0
    warmup_epochs: int = 12
    warmup_from: float = 0.1
    lr_milestones: tuple[int, ...] = (70, 90)
    lr_gamma: float = 0.33


def lr_factor(epoch: int, cfg: MSFlowConfig) -> float:
    """Learning-rate multiplier during (0-based) ``epoch``: linear warm-up times step decays.

    Equal to the official ``LinearLR`` × ``MultiStepLR`` pair stepped once per epoch: ``0.1`` in
    epoch 0, ``0.175`` in epoch 1, ``1`` from epoch 12, ``0.33`` from epoch 70, ``0.33²`` from 90.
    """
    warm = 1.0
    if cfg.warmup_epochs > 0:
        warm = cfg.warmup_from + (1.0 - cfg.warmup_from) * min(epoch, cfg.warmup_epochs) / cfg.warmup_epochs
    decays = sum(epoch >= m for m in cfg.lr_milestones)
    return warm * cfg.lr_gamma ** decays


def parallel_flow(channels: int, n_blocks: int, clamp: float = 1.9, cond_channels: int = 64
                  ) -> SequentialFlow:
    """One scale's flow: ``n_blocks`` conditional AllInOne blocks with MSFlow's conv-LayerNorm subnet.

    Input ``(B, channels, H, W)``, condition ``(B or 1, cond_channels, H, W)``; output of the same shape
    and a ``(B,)`` log-det.

    Example:
        >>> flow = parallel_flow(8, 2, cond_channels=4)
        >>> x, c = torch.randn(2, 8, 6, 6), torch.randn(1, 4, 6, 6)
        >>> z, log_det = flow(x, cond=c)
        >>> back, _ = flow(z, cond=c, reverse=True)
        >>> bool(torch.allclose(x, back, atol=1e-5)), tuple(log_det.shape)
        (True, (2,))
    """
    return SequentialFlow([
        AllInOneCoupling(channels, conv_ln_subnet(3), cond_channels=cond_channels, clamp=clamp)
        for _ in range(n_blocks)
    ])


_POOLS = {"avg": lambda: nn.AvgPool2d(3, stride=2, padding=1),
          "max": lambda: nn.MaxPool2d(3, stride=2, padding=1),
          "none": nn.Identity}


#: ``quick``: EfficientNet-Lite0 stages at strides 4/8/16 (reflect padding), 256 px, 2 blocks per scale and a
#: 16-channel position encoding (the 64-channel one would dominate the narrow Lite0 maps and the CPU time),
#: a larger learning rate and 16 epochs with the paper's warm-up/decay shape.
PRESETS: dict[str, MSFlowConfig] = {
    "paper": MSFlowConfig(eval_every=4),
    "quick": MSFlowConfig(backbone="efficientnet_lite0", input_size=256, input_size_overrides={},
                          parallel_blocks=(2, 2, 2), cond_channels=16, epochs=16, batch_size=4, lr=3e-3,
                          warmup_epochs=2, lr_milestones=(11, 14), eval_every=4),
    "paper-resnet18": MSFlowConfig(backbone="resnet18", eval_every=4),
}


@register_method("msflow", MSFlowConfig, PRESETS,
                 description="MSFlow (TNNLS 2024): parallel flows + fusion flow, two aggregations")
class MSFlow(AnomalyModel):
    """The MSFlow model (one per category). See the module docstring for the pipeline.

    Attributes:
        backbone: frozen :class:`~flowlib.backbones.FeatureExtractor`.
        parallel_flows: one :func:`parallel_flow` per scale.
        fusion: the fusion flow (:func:`flowlib.fusion.fusion_flow`).
    """

    def __init__(self, config: MSFlowConfig) -> None:
        super().__init__(config)
        if config.pool not in _POOLS:
            raise ValueError(f"MSFlowConfig.pool={config.pool!r} is not one of {sorted(_POOLS)}.")
        self.backbone = FeatureExtractor(config.backbone, layers=list(config.layers),
                                         pretrained=config.pretrained, padding_mode=config.padding_mode)
        channels = list(self.backbone.channels)
        if len(config.parallel_blocks) != len(channels):
            raise ValueError(f"MSFlowConfig.parallel_blocks={config.parallel_blocks} needs one entry per "
                             f"backbone level ({len(channels)} levels: layers={config.layers}).")
        self.pool = _POOLS[config.pool]()
        self.parallel_flows = nn.ModuleList(
            parallel_flow(c, n, config.clamp, config.cond_channels)
            for c, n in zip(channels, config.parallel_blocks))
        self.fusion = fusion_flow(channels, clamp=config.clamp, hidden_ratio=config.fusion_hidden_ratio)

    @torch.no_grad()
    def extract(self, images: Tensor) -> Features:
        """Pooled backbone maps ``[(B, C_l, H_l, W_l)]`` from images ``(B, 3, S, S)`` in [0, 1]."""
        return [self.pool(f) for f in self.backbone(images)]

    def condition(self, feature: Tensor) -> Tensor | None:
        """The positional encoding ``(1, cond_channels, H, W)`` for a feature map ``(B, C, H, W)``.

        ``None`` when ``cond_channels == 0`` (an unconditional ablation). The tensor is shared by every
        call for the same grid (:func:`~flowlib.positional.shared_positional_encoding`): read it, do not
        change it in place.
        """
        if self.config.cond_channels == 0:
            return None
        h, w = feature.shape[-2:]
        pe = shared_positional_encoding(self.config.cond_channels, h, w, device=feature.device,
                                        dtype=feature.dtype)
        return pe.unsqueeze(0)

    def forward(self, features: Features) -> tuple[list[Tensor], Tensor]:
        """Latents ``[(B, C_l, H_l, W_l)]`` after the fusion flow and the total log-det ``(B,)``."""
        zs, log_det = [], features[0].new_zeros(features[0].shape[0])
        for feature, flow in zip(features, self.parallel_flows):
            z, ld = flow(feature, cond=self.condition(feature))
            zs.append(z)
            log_det = log_det + ld
        zs, ld = self.fusion(zs)
        return zs, log_det + ld

    def loss(self, features: Features, class_ids: Tensor | None = None) -> Tensor:
        zs, log_det = self(features)
        energy = sum(0.5 * z.pow(2).flatten(1).sum(dim=1) for z in zs)
        return (energy - log_det).mean()

    def score_maps(self, features: Features, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """Both aggregations: ``{"localisation": (B,H,W), "detection": (B,H,W), "score": (B,)}``."""
        zs, _ = self(features)
        loc, det, score = msflow_scores(zs, image_size, self.config.top_k)
        return {"localisation": loc, "detection": det, "score": score}

    @torch.no_grad()
    def predict(self, features: Features, image_size: tuple[int, int],
                class_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Localisation map ``(B, H, W)`` (additive) and image score ``(B,)`` (top-k of the detection map)."""
        out = self.score_maps(features, tuple(image_size))
        return out["localisation"], out["score"]

    def configure_optimizers(self, steps_per_epoch: int):
        cfg = self.config
        opt = adam(self.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step // max(1, steps_per_epoch), cfg))
        return opt, sched

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters of each parallel flow (``"scale0"``, ...) and of the fusion flow."""
        counts = {f"scale{i}": sum(p.numel() for p in flow.parameters())
                  for i, flow in enumerate(self.parallel_flows)}
        counts["fusion"] = sum(p.numel() for p in self.fusion.parameters())
        return counts


__all__ = ["MSFlow", "MSFlowConfig", "PRESETS", "lr_factor", "parallel_flow"]
