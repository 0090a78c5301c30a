"""HGAD: one normalizing flow for all classes, with a hierarchical Gaussian-mixture prior.

Yao, Li, Qian, Wang, Zhang, "Hierarchical Gaussian Mixture Normalizing Flows Modeling for Unified
Anomaly Detection", ECCV 2024, arXiv:2403.13349. Official code: github.com/xcyao00/HGAD (read at commit
67ffbd9; this module follows it except where a docstring says otherwise).

Pipeline:

1. **Features** (:meth:`HGAD.extract`): one stride-16 stage of a frozen EfficientNet applied to several
   resized copies of the image (paper: ``tf_efficientnet_b6`` stage 3, 200 channels, on 1024², 512² and
   256² copies → maps of 64², 32², 16² positions). Each copy gives one "feature level".
2. **Flow** (:class:`PositionFlow`): per level, a conditional flow of 12 ``AllInOneCoupling`` blocks that
   treats *every position as its own vector* ``(N, 200)``, conditioned on a 256-channel sinusoidal
   positional encoding of that position.
3. **Prior** (:class:`flowlib.mixture.HierarchicalGaussianMixture`): per level, a mixture over the ``K``
   training classes, each class itself a mixture of ``M = 10`` unit Gaussians. Losses and their schedule
   are in :mod:`flowlib.mixture`.
4. **Scores** (:meth:`HGAD.finalize`): for an image of class ``c`` the per-dimension log-likelihood under
   class ``c``'s intra-class mixture and the negative entropy of the inter-class posterior, each turned
   into an anomaly map normalised over *all test images of class c*, multiplied, blurred (σ = 4 px at
   256²); image score = max of the map. The class of a test image is needed (as in the official code).

One model is trained on all categories at once (``unified = True``). The class count ``K`` comes from the
data: the engine sets ``config.n_classes`` to the number of categories it trains on.

Example (random weights, tiny sizes):
    >>> flow = PositionFlow(channels=6, cond_channels=4, n_blocks=2)
    >>> z, log_det = flow.forward_map(torch.randn(2, 6, 3, 5))
    >>> tuple(z.shape), tuple(log_det.shape)
    ((2, 6, 3, 5), (2, 3, 5))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import Tensor, nn
from torch.nn import functional as F

from flowlib.backbones import FeatureExtractor
from flowlib.coupling import AllInOneCoupling, SequentialFlow
from flowlib.mixture import LOG_NORMAL_CONST, HierarchicalGaussianMixture, total_loss
from flowlib.models.base import AnomalyModel, Features, MethodConfig, adam, register_method
from flowlib.positional import shared_positional_encoding
from flowlib.resize import resize_sum
from flowlib.subnets import mlp_subnet

PRIORS = ("hierarchical", "gaussian")


@dataclass
class HGADConfig(MethodConfig):
    """HGAD settings (defaults = the official MVTec AD run).

    Attributes:
        layer: timm feature-stage index of the backbone (3 = stride 16).
        scales: relative sizes of the image copies fed to the backbone (one feature level each).
        n_classes: ``K``, number of training classes; the engine sets it to the number of categories.
        n_intra_centers: ``M``, Gaussians per class.
        coupling_blocks, clamp, subnet_ratio: the per-level flow (12 blocks, tanh clamp 1.9, MLP hidden
            width = 2 × input width).
        pos_embed_dim: channels of the positional condition (multiple of 4).
        prior: ``"hierarchical"`` (HGAD) or ``"gaussian"``: the same flow with a single ``N(0, I)`` prior
            (the unified baseline that suffers from the homogeneous mapping; scored with the
            likelihood map only).
        lambda1, lambda2: weights of ``L_g`` and ``L_mi``; label_smoothing: ``ε`` of ``L_mi``.
        intra_start_epoch: first epoch of stage 2 (adds ``L_g_intra`` and ``L_z``); official: 2 meta-epochs
            of 8 epochs = 16.
        sub_epochs: epochs per "meta-epoch": the cosine schedule changes once per meta-epoch.
        warmup_epochs: linear warm-up from lr/10, per iteration (official: 2 meta-epochs = 16 epochs).
        lr_min_factor: cosine floor as a fraction of ``lr`` (official 0.1³).
        centre_lr_factor: learning-rate multiplier of the class centres and offsets (official intent 3;
            see :meth:`HGAD.configure_optimizers`).
        betas: Adam betas.
        positions_per_step: if set, each step trains on this many random positions per level instead
            of all of them (a CPU shortcut; the official code uses all positions).
        map_size: side of the maps that are normalised, blurred and maxed (official 256); they are
            resized to the evaluation size afterwards if it differs.
        blur_sigma: Gaussian blur of each map in pixels at ``map_size``.
        input_norm: standardise each feature channel with a fixed shift and scale taken from the first
            training batch (Glow's data-dependent ActNorm initialisation, kept frozen). Not in the
            official code; it lets the short CPU schedule converge (raw EfficientNet features have a
            standard deviation of about 6, which 4 blocks with a 1.9 clamp need many steps to undo).
            It adds a constant to every log-likelihood of a level, so the maps are unchanged by it.
    """

    backbone: str = "tf_efficientnet_b6"
    layer: int = 3
    scales: tuple[float, ...] = (1.0, 0.5, 0.25)
    input_size: int = 1024
    n_classes: int = 15
    n_intra_centers: int = 10
    coupling_blocks: int = 12
    clamp: float = 1.9
    subnet_ratio: float = 2.0
    pos_embed_dim: int = 256
    prior: str = "hierarchical"
    lambda1: float = 1.0
    lambda2: float = 100.0
    label_smoothing: float = 0.02
    intra_start_epoch: int = 16
    sub_epochs: int = 8
    warmup_epochs: int = 16
    lr_min_factor: float = 1e-3
    centre_lr_factor: float = 3.0
    betas: tuple[float, float] = (0.95, 0.99)
    positions_per_step: int | None = None
    map_size: int = 256
    blur_sigma: float = 4.0
    input_norm: bool = False
    epochs: int = 200
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 1e-4


# Features at 1024 px are 4.3 MB per image (three levels), too many to cache for a whole dataset.
_PAPER = HGADConfig(cache_features=False)
PRESETS = {
    # MVTec AD, 15 classes in one model (README: 98.4 / 97.9 image / pixel AUROC).
    "paper": _PAPER,
    # The other datasets of the README differ only in the class count (the engine sets it from the
    # categories anyway); same backbone, sizes and schedule. "union" = MVTec AD + BTAD + MVTec 3D-AD + VisA.
    "paper-btad": _PAPER.replace(n_classes=3),
    "paper-mvtec3d": _PAPER.replace(n_classes=10),
    "paper-visa": _PAPER.replace(n_classes=12),
    "paper-union": _PAPER.replace(n_classes=40),
    # CPU tutorial, all built-in categories in one model: offline EfficientNet-Lite0 (112 channels at
    # stride 16) on the 128² and 64² copies of the 256 px image (8² + 4² positions), 4 blocks, 32-channel
    # positional encoding, 20 short epochs on 512 random positions per level and step. Two departures
    # make this short run work: ``input_norm`` (see HGADConfig) and λ2 = 1. With λ2 = 100 and a few
    # hundred steps the mutual-information term wins: the flow contracts every class into a small ball
    # around its centre (log-det about −0.4 per dimension, variance about 0.35) and the likelihood map
    # no longer separates defects (mean image AUROC of the likelihood map 0.60 instead of 0.82 on the
    # built-in data).
    "quick": HGADConfig(backbone="efficientnet_lite0", layer=3, scales=(0.5, 0.25), input_size=256,
                        n_classes=4, n_intra_centers=10, coupling_blocks=4, pos_embed_dim=32, lambda2=1.0,
                        intra_start_epoch=4, sub_epochs=1, warmup_epochs=1, epochs=20, batch_size=16,
                        lr=5e-3, positions_per_step=512, input_norm=True, map_size=256, blur_sigma=4.0),
}


class PositionFlow(nn.Module):
    """A conditional flow applied independently at every position of a feature map (CFLOW-AD, HGAD).

    ``n_blocks`` × ``AllInOneCoupling(C, Linear → ReLU → Linear, cond_channels=P, clamp, soft
    permutation)``; the condition of a position is its ``P``-channel sinusoidal positional encoding.

    Args:
        channels: ``C`` of the features.
        cond_channels: ``P`` of the positional encoding (multiple of 4; 0 = unconditional).
        n_blocks, clamp, hidden_ratio: see :class:`HGADConfig`.
    """

    def __init__(self, channels: int, cond_channels: int = 256, n_blocks: int = 12, clamp: float = 1.9,
                 hidden_ratio: float = 2.0) -> None:
        super().__init__()
        self.channels, self.cond_channels = channels, cond_channels
        self.flow = SequentialFlow([
            AllInOneCoupling(channels, mlp_subnet(hidden_ratio), cond_channels=cond_channels, clamp=clamp,
                             permute_soft=True)
            for _ in range(n_blocks)])

    def forward(self, x: Tensor, cond: Tensor | None = None, reverse: bool = False) -> tuple[Tensor, Tensor]:
        """Vectors ``x`` ``(N, C)`` and conditions ``(N, P)`` → ``z`` ``(N, C)`` and log-dets ``(N,)``."""
        return self.flow(x, cond=cond, reverse=reverse)

    def condition(self, height: int, width: int, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
        """Positional encodings of an ``height × width`` grid as rows ``(height·width, P)`` (row-major)."""
        pe = shared_positional_encoding(self.cond_channels, height, width, device=device, dtype=dtype)
        return pe.permute(1, 2, 0).reshape(height * width, self.cond_channels)

    def forward_map(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """A whole map ``(B, C, H, W)`` → ``z`` ``(B, C, H, W)`` and log-dets ``(B, H, W)``."""
        b, c, h, w = feature.shape
        x = feature.permute(0, 2, 3, 1).reshape(-1, c)
        cond = None
        if self.cond_channels:
            cond = self.condition(h, w, feature.device, feature.dtype).repeat(b, 1)
        z, log_det = self(x, cond)
        return z.view(b, h, w, c).permute(0, 3, 1, 2), log_det.view(b, h, w)


@register_method("hgad", HGADConfig, PRESETS,
                 "hierarchical Gaussian-mixture flows: one model for all classes (ECCV 2024)")
class HGAD(AnomalyModel):
    """HGAD (see the module docstring). ``unified``: the engine trains one model on all categories.

    Training calls :meth:`loss` with the class id of every image; scoring needs the class ids too.
    """

    unified = True

    def __init__(self, config: HGADConfig) -> None:
        super().__init__(config)
        if config.prior not in PRIORS:
            raise ValueError(f"HGADConfig.prior={config.prior!r} is not one of {PRIORS}.")
        if config.n_classes < 1:
            raise ValueError(f"HGADConfig.n_classes={config.n_classes}: set it to the number of training "
                             "categories (the engine does this for you).")
        if not config.scales:
            raise ValueError("HGADConfig.scales is empty; give at least one image scale, e.g. (1.0,).")
        self.backbone = FeatureExtractor(config.backbone, layers=[config.layer], pretrained=config.pretrained)
        dim = self.backbone.channels[0]
        self.dim = dim
        self.flows = nn.ModuleList(
            PositionFlow(dim, config.pos_embed_dim, config.coupling_blocks, config.clamp, config.subnet_ratio)
            for _ in config.scales)
        self.priors = nn.ModuleList(
            HierarchicalGaussianMixture(config.n_classes, dim, config.n_intra_centers)
            for _ in config.scales) if config.prior == "hierarchical" else nn.ModuleList()
        n_levels = len(config.scales)
        self.register_buffer("input_mean", torch.zeros(n_levels, dim))
        self.register_buffer("input_log_std", torch.zeros(n_levels, dim))
        self.register_buffer("input_ready", torch.tensor(not config.input_norm))
        self._steps_per_epoch: int | None = None
        self._train_steps = 0
        self._epoch: int | None = None
        self._level_shapes: list[tuple[int, int]] = []
        self._image_size: tuple[int, int] | None = None
        self.last_terms: dict[str, float] = {}

    # -- features -------------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, images: Tensor) -> Features:
        """Images ``(B, 3, S, S)`` → one ``(B, C, S·s/16, S·s/16)`` map per scale ``s`` of the config.

        The copies are made with bilinear interpolation (``align_corners=True``, as the official code).
        """
        size = images.shape[-2:]
        feats = []
        for s in self.config.scales:
            x = images
            if s != 1.0:
                x = F.interpolate(images, size=(round(size[0] * s), round(size[1] * s)), mode="bilinear",
                                  align_corners=True)
            feats.append(self.backbone(x)[0])
        return feats

    # -- flow -----------------------------------------------------------------------------------
    def forward(self, features: Features) -> tuple[list[Tensor], Tensor]:
        """Feature maps ``[(B, C, H_l, W_l)]`` → latents of the same shapes and ``(B,)`` total log-dets."""
        pairs = self.latents(features)
        return [z for z, _ in pairs], sum(ld.flatten(1).sum(1) for _, ld in pairs)

    def latents(self, features: Features) -> list[tuple[Tensor, Tensor]]:
        """Per level, latents ``(B, C, H_l, W_l)`` and per-position log-dets ``(B, H_l, W_l)``."""
        out = []
        for level, feat in enumerate(features):
            b, c, h, w = feat.shape
            x, cond, _ = self._vectors(feat, level, feat.new_zeros(b, dtype=torch.long), None)
            z, log_det = self._flow(level, x, cond)
            out.append((z.view(b, h, w, c).permute(0, 3, 1, 2), log_det.view(b, h, w)))
        return out

    def current_epoch(self) -> int:
        """0-based training epoch: from :meth:`set_epoch`, else counted from the optimiser steps."""
        if self._epoch is not None:
            return self._epoch
        if self._steps_per_epoch:
            return self._train_steps // self._steps_per_epoch
        return 0

    def set_epoch(self, epoch: int | None) -> None:
        """Fix the epoch that selects the loss stage (``None`` = count optimiser steps again)."""
        self._epoch = epoch

    def in_stage_two(self) -> bool:
        """Whether the intra-class terms are trained (from ``intra_start_epoch`` on)."""
        return self.current_epoch() >= self.config.intra_start_epoch

    @torch.no_grad()
    def init_input_norm(self, features: Features) -> None:
        """Set the frozen per-channel standardisation of every level from a batch of features."""
        for level, feat in enumerate(features):
            x = feat.transpose(0, 1).reshape(feat.shape[1], -1)
            self.input_mean[level] = x.mean(1)
            self.input_log_std[level] = torch.log(x.std(1).clamp_min(1e-6))
        self.input_ready.fill_(True)

    def _vectors(self, feat: Tensor, level: int, class_ids: Tensor, sample: int | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """Positions as vectors ``(N, C)`` (standardised if ``input_norm``), conditions and labels."""
        b, c, h, w = feat.shape
        x = feat.permute(0, 2, 3, 1).reshape(-1, c)
        if self.config.input_norm:
            x = (x - self.input_mean[level]) * torch.exp(-self.input_log_std[level])
        cond = self.flows[level].condition(h, w, feat.device, feat.dtype).repeat(b, 1)
        labels = class_ids.view(-1, 1).expand(b, h * w).reshape(-1)
        if sample is not None and sample < x.shape[0]:
            idx = torch.randperm(x.shape[0], device=x.device)[:sample]
            x, cond, labels = x[idx], cond[idx], labels[idx]
        return x, cond, labels

    def _flow(self, level: int, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        z, log_det = self.flows[level](x, cond)
        if self.config.input_norm:  # the standardisation is part of the map from features to z
            log_det = log_det - self.input_log_std[level].sum()
        return z, log_det

    def loss(self, features: Features, class_ids: Tensor | None = None) -> Tensor:
        """Sum over levels of HGAD's objective on the positions of the batch (a scalar).

        Flows and priors of different levels share no parameters, so one Adam step on the sum equals the
        official three separate steps (one per level).
        """
        if class_ids is None:
            raise ValueError("HGAD trains with the class id of every image; pass class_ids (the engine does "
                             "this when the dataset is a MultiCategoryDataset).")
        class_ids = torch.as_tensor(class_ids, device=features[0].device).long()
        if not bool(self.input_ready):
            self.init_input_norm(features)
        stage_two = self.in_stage_two()
        total = features[0].new_zeros(())
        logged: list[tuple[str, Tensor]] = []
        for level, feat in enumerate(features):
            x, cond, labels = self._vectors(feat, level, class_ids, self.config.positions_per_step)
            z, log_det = self._flow(level, x, cond)
            if self.config.prior == "hierarchical":
                terms = self.priors[level].losses(z, log_det, labels, intra=stage_two,
                                                  label_smoothing=self.config.label_smoothing)
                loss = total_loss(terms, self.config.lambda1, self.config.lambda2, intra=stage_two)
            else:
                terms = _single_gaussian_terms(z, log_det)
                loss = terms["L_nll"] + terms["L_z"]
            total = total + loss
            logged.extend(terms.items())
        # the terms are logged with one read from the device per step, not one per term and level
        values = torch.stack([v.detach() for _, v in logged]).tolist()
        terms_sum: dict[str, float] = {}
        for (k, _), v in zip(logged, values, strict=True):
            terms_sum[k] = terms_sum.get(k, 0.0) + v
        self.last_terms = terms_sum
        if self.training and torch.is_grad_enabled():
            self._train_steps += 1
        return total

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def level_statistics(self, features: Features, class_ids: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per level, the two per-position statistics that HGAD scores, both "higher = more normal":

        * ``log_lik`` ``(B, H_l, W_l)``: per-dimension log-likelihood under the image's class mixture
          (under ``N(0, I)`` for ``prior="gaussian"``);
        * ``neg_entropy`` ``(B, H_l, W_l)``: ``Σ_k p_k log p_k`` of the class posterior (zeros for the
          single-Gaussian prior, which has no classes).
        """
        out = []
        class_ids = torch.as_tensor(class_ids, device=features[0].device).long()
        for level, feat in enumerate(features):
            b, _, h, w = feat.shape
            x, cond, labels = self._vectors(feat, level, class_ids, None)
            z, log_det = self._flow(level, x, cond)
            if self.config.prior == "hierarchical":
                prior = self.priors[level]
                log_lik = prior.log_likelihood_per_dim(z, log_det, labels)
                neg_ent = prior.negative_entropy(z)
            else:
                log_lik = (self.dim * LOG_NORMAL_CONST - 0.5 * (z * z).sum(1) + log_det) / self.dim
                neg_ent = torch.zeros_like(log_lik)
            out.append((log_lik.view(b, h, w), neg_ent.view(b, h, w)))
        return out

    @torch.no_grad()
    def predict(self, features: Features, image_size: tuple[int, int],
                class_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Raw statistics of a batch, packed as ``(B, 2, P)``; :meth:`finalize` turns them into maps.

        HGAD's maps are defined relative to *all* test images of a class (each level's log-likelihoods
        are shifted by their maximum over that set before ``exp``), so a single batch cannot produce
        them. ``P = Σ_l H_l·W_l`` holds every level's positions (row-major, level after level); channel 0
        is the log-likelihood, channel 1 the negative entropy (see :meth:`level_statistics`). The
        returned scores are provisional (the largest per-dimension NLL of the image). Use
        :meth:`anomaly_maps` to get finished maps for a set of images in one call.
        """
        if class_ids is None:
            raise ValueError("HGAD scores an image with its class's own mixture; pass class_ids (the "
                             "engine does this for unified methods).")
        stats = self.level_statistics(features, class_ids)
        self._level_shapes = [tuple(s[0].shape[-2:]) for s in stats]
        self._image_size = tuple(int(v) for v in image_size)
        log_lik = torch.cat([s[0].flatten(1) for s in stats], dim=1)
        neg_ent = torch.cat([s[1].flatten(1) for s in stats], dim=1)
        return torch.stack([log_lik, neg_ent], dim=1), -log_lik.amin(1)

    def finalize(self, maps: Tensor, scores: Tensor, class_ids: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
        """Packed statistics of a whole test set ``(N, 2, P)`` → anomaly maps ``(N, H, W)`` and scores.

        For every class ``c`` separately (its test images only), for each statistic: per level subtract
        the maximum over the class's images, ``exp``, upsample bilinearly (``align_corners=True``) to
        ``map_size``, sum over levels, turn into ``A = max_set − sum`` and blur each image with σ =
        ``blur_sigma``. The map is ``A_loglik · A_entropy`` (``A_loglik`` alone for the single-Gaussian
        prior); the image score is its maximum. Maps are then resized to the evaluation size.
        """
        if maps.ndim != 3 or maps.shape[1] != 2 or not self._level_shapes:
            raise ValueError("HGAD.finalize expects the packed (N, 2, P) statistics returned by HGAD.predict "
                             f"(got shape {tuple(maps.shape)}); call predict on the test set first.")
        if sum(h * w for h, w in self._level_shapes) != maps.shape[2]:
            raise ValueError(f"Packed statistics have {maps.shape[2]} positions but the last predict call "
                             f"saw levels {self._level_shapes}; predict every test image at the same size.")
        if class_ids is None:
            class_ids = torch.zeros(maps.shape[0], dtype=torch.long)
        class_ids = torch.as_tensor(class_ids).cpu().long()
        size = self.config.map_size
        out = torch.zeros(maps.shape[0], size, size)
        for c in class_ids.unique().tolist():
            idx = (class_ids == c).nonzero().flatten()
            stats = maps[idx].double().cpu()
            amap = _set_normalised_map(stats[:, 0], self._level_shapes, size, self.config.blur_sigma)
            if self.config.prior == "hierarchical":
                amap = amap * _set_normalised_map(stats[:, 1], self._level_shapes, size,
                                                  self.config.blur_sigma)
            out[idx] = amap.float()
        image_scores = out.flatten(1).amax(1)
        target = self._image_size or (size, size)
        if tuple(target) != (size, size):
            out = resize_sum([out], target, align_corners=False)
        return out, image_scores

    @torch.no_grad()
    def anomaly_maps(self, features: Features, class_ids: Tensor, image_size: tuple[int, int]
                     ) -> tuple[Tensor, Tensor]:
        """:meth:`predict` + :meth:`finalize` on one set of images: maps ``(B, H, W)``, scores ``(B,)``."""
        stats, scores = self.predict(features, image_size, class_ids)
        return self.finalize(stats, scores, class_ids)

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self, steps_per_epoch: int
                             ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Adam (betas 0.95, 0.99) with three groups and HGAD's warm-up + cosine schedule.

        Groups: flows (``lr``, weight decay ``weight_decay``); class centres and offsets
        (``centre_lr_factor · lr``, no decay); mixture logits (``lr``, no decay). The scheduler multiplies
        each group's own rate by the same factor every iteration, so the centres keep their 3× rate. The
        official code intends the same groups, but its ``adjust_learning_rate`` / ``warmup_learning_rate``
        write one absolute value into every group, so there the centres train at the flows' rate after
        the first call.

        Factor at iteration ``t`` (epoch ``e = t // steps_per_epoch``, meta-epoch ``m = e // sub_epochs``,
        ``T = epochs / sub_epochs`` meta-epochs, floor ``η = lr_min_factor``):
        ``cos(m) = η + (1 − η)(1 + cos(π m / T)) / 2``; during the first ``warmup_epochs`` it rises
        linearly per iteration from 0.1 to ``cos(warmup_epochs / sub_epochs)``.
        """
        cfg = self.config
        self._steps_per_epoch = max(1, int(steps_per_epoch))
        self._train_steps = 0
        flow_params = [p for p in self.flows.parameters() if p.requires_grad]
        centres = [p for prior in self.priors for p in (prior.mu, prior.mu_delta)]
        logits = [p for prior in self.priors for p in (prior.phi_inter, prior.phi_intra)]
        groups = [{"params": flow_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if centres:
            groups += [{"params": centres, "lr": cfg.lr * cfg.centre_lr_factor, "weight_decay": 0.0},
                       {"params": logits, "lr": cfg.lr, "weight_decay": 0.0}]
        optimizer = adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        schedule = CosineWarmup(self._steps_per_epoch, cfg.epochs, cfg.sub_epochs, cfg.warmup_epochs,
                                cfg.lr_min_factor)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class CosineWarmup:
    """HGAD's (and CFLOW-AD's) learning-rate factor per iteration; see :meth:`HGAD.configure_optimizers`.

    Example:
        >>> f = CosineWarmup(steps_per_epoch=10, epochs=200, sub_epochs=8, warmup_epochs=16)
        >>> round(f(0), 3), round(f(160), 4), round(f(1999), 4)
        (0.1, 0.9843, 0.0049)
    """

    def __init__(self, steps_per_epoch: int, epochs: int, sub_epochs: int = 8, warmup_epochs: int = 16,
                 min_factor: float = 1e-3) -> None:
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.sub_epochs = max(1, sub_epochs)
        self.meta_epochs = max(1.0, epochs / self.sub_epochs)
        self.warmup_epochs = warmup_epochs
        self.min_factor = min_factor

    def cosine(self, meta_epoch: float) -> float:
        m = self.min_factor
        return m + (1.0 - m) * (1.0 + math.cos(math.pi * meta_epoch / self.meta_epochs)) / 2.0

    def __call__(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        if epoch < self.warmup_epochs:
            p = step / (self.warmup_epochs * self.steps_per_epoch)
            end = self.cosine(self.warmup_epochs / self.sub_epochs)
            return 0.1 + p * (end - 0.1)
        return self.cosine(epoch // self.sub_epochs)


def _single_gaussian_terms(z: Tensor, log_det: Tensor) -> dict[str, Tensor]:
    """Losses of the same flow under one ``N(0, I)`` prior: per-dimension NLL and CFLOW's ``L_z``."""
    dim = z.shape[1]
    log_p = (dim * LOG_NORMAL_CONST - 0.5 * (z * z).sum(1) + log_det) / dim
    return {"L_nll": -log_p.mean(), "L_z": -F.logsigmoid(log_p).mean()}


def _set_normalised_map(stat: Tensor, shapes: list[tuple[int, int]], size: int, sigma: float) -> Tensor:
    """One statistic of a set of images ``(n, P)`` (higher = normal) → blurred anomaly maps ``(n, S, S)``.

    Per level: ``exp(stat − max over the set)``, bilinear upsampling to ``S``; then sum over levels,
    ``A = max − sum`` over the set, Gaussian blur σ per image (scipy, reflect border, as the official code).
    """
    probs, start = [], 0
    for h, w in shapes:
        level = stat[:, start:start + h * w].reshape(-1, h, w)
        start += h * w
        probs.append(torch.exp(level - level.max()))
    total = resize_sum(probs, (size, size), align_corners=True)
    amap = (total.max() - total).numpy()
    if sigma > 0:
        amap = np.stack([gaussian_filter(m, sigma=sigma) for m in amap])
    return torch.from_numpy(amap)
