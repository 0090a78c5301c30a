"""MSFlow's two ways of turning per-scale likelihoods into anomaly maps.

Paper: Zhou et al., "MSFlow: Multi-Scale Flow-based Framework for Unsupervised Anomaly Detection",
IEEE TNNLS 2024, arXiv:2308.15300; official code cool-xuan/msflow (``post_process.py``, commit e239755).

Every scale ``l`` gives a log-likelihood map without the log-det, ``logp_l = -½ · mean_c z_l²``
(:func:`log_likelihood_map`). The paper observes that detection and localisation want different
combinations of the scales:

* **Detection** (multiplicative): ``P_mul = exp(Σ_l up(logp_l) - max)``, the product of the scales'
  likelihoods normalised by the image's own maximum; ``A_mul = max(P_mul) - P_mul``. A position must look
  normal at *every* scale to stay low, so small and large defects both push the map up; the image score
  is the mean of the top ``k = ⌊H·W·top_k⌋`` values (``top_k = 3 %``), robust to a single noisy pixel.
* **Localisation** (additive): ``P_add = Σ_l up(exp(logp_l - max_l))``, each scale's probability map
  normalised by the image's maximum at that scale; ``A_add = max(P_add) - P_add``. A sum is smoother than
  a product: one over-confident scale cannot wipe out the others, which gives better pixel rankings.

``up`` is bilinear upsampling with ``align_corners=True``; each sum over scales is one call of
:func:`flowlib.resize.resize_sum`, which upsamples and adds in one matrix product. Every maximum is
taken per image, so each map is relative to the most normal position of the same image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flowlib.resize import resize_sum


def log_likelihood_map(z: Tensor) -> Tensor:
    """``-½ · mean_c z²`` per position: ``(B, C, H, W)`` → ``(B, H, W)`` (no log-det, no constant)."""
    return -0.5 * z.pow(2).mean(dim=1)


def _image_max(maps: Tensor) -> Tensor:
    return maps.flatten(1).amax(dim=1).view(-1, 1, 1)


#: Exponents below this give ``1 − exp(·) == 1`` exactly in float32 and float64 alike
#: (``exp(−40) ≈ 4e−18`` is under half an ulp of 1 in both), so clamping them changes no value of
#: ``A_mul``; it keeps ``exp`` out of subnormal results, which cost a CPU about ten times more per
#: element (0.8 ms instead of 0.07 ms for one 256² map).
_EXP_FLOOR = -40.0


def detection_map(logps: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """MSFlow's multiplicative map ``A_mul`` ``(B, H, W)`` from per-scale maps ``(B, H_l, W_l)``.

    Example:
        >>> logp = torch.zeros(1, 2, 2)
        >>> logp[0, 0, 0] = -1.0
        >>> detection_map([logp], (2, 2))
        tensor([[[0.6321, 0.0000],
                 [0.0000, 0.0000]]])
    """
    total = resize_sum(logps, size, align_corners=True)
    prob = torch.exp((total - _image_max(total)).clamp_min_(_EXP_FLOOR))
    return _image_max(prob) - prob


def localisation_map(logps: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """MSFlow's additive map ``A_add`` ``(B, H, W)`` from per-scale maps ``(B, H_l, W_l)``.

    Example:
        >>> a, b = torch.zeros(1, 2, 2), torch.zeros(1, 1, 1)
        >>> a[0, 0, 0] = -1.0
        >>> localisation_map([a, b], (2, 2))
        tensor([[[0.6321, 0.0000],
                 [0.0000, 0.0000]]])
    """
    total = resize_sum([torch.exp(lp - _image_max(lp)) for lp in logps], size, align_corners=True)
    return _image_max(total) - total


def top_k_mean(maps: Tensor, top_k: float = 0.03) -> Tensor:
    """Mean of the largest ``k = max(1, ⌊H·W·top_k⌋)`` values of each map: ``(B, H, W)`` → ``(B,)``.

    Example:
        >>> top_k_mean(torch.arange(100.0).view(1, 10, 10), top_k=0.03)
        tensor([98.])
    """
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"top_k must be a fraction in (0, 1], got {top_k}.")
    flat = maps.flatten(1)
    k = max(1, int(flat.shape[1] * top_k))
    return flat.topk(k, dim=1).values.mean(dim=1)


def msflow_scores(zs: Sequence[Tensor], size: tuple[int, int], top_k: float = 0.03
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Both aggregations from the fusion-flow outputs ``zs`` (list of ``(B, C_l, H_l, W_l)``).

    Returns ``(localisation map (B, H, W), detection map (B, H, W), image scores (B,))``; the image
    score is the top-k mean of the detection map.
    """
    logps = [log_likelihood_map(z) for z in zs]
    det = detection_map(logps, size)
    return localisation_map(logps, size), det, top_k_mean(det, top_k)
