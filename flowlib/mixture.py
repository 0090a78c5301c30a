"""Hierarchical Gaussian-mixture prior for unified (multi-class) flows, and its losses.

Introduced with HGAD: Yao, Li, Qian, Wang, Zhang, "Hierarchical Gaussian Mixture Normalizing Flows
Modeling for Unified Anomaly Detection", ECCV 2024, arXiv:2403.13349. The equations follow the official
code (github.com/xcyao00/HGAD, commit 67ffbd9, ``models/model.py`` and ``train.py``).

A flow maps a feature vector ``e`` (one position of one image of class ``y``) to ``z = f(e)`` with
``log|det ∂z/∂e| = logdet``. A single ``N(0, I)`` prior pulls the features of *all* classes onto one
blob, so the flow learns to give high likelihood to anything that looks like any class (the
"homogeneous mapping"). The prior here keeps classes apart, in two levels:

* **inter-class**: a mixture over the ``K`` classes with learnable centres ``μ_k`` (``(K, D)``) and
  weights ``π = softmax(φ_inter)``;
* **intra-class**: inside class ``y`` a mixture of ``M`` unit Gaussians centred at
  ``μ_{y,1} = sg(μ_y)`` and ``μ_{y,j} = sg(μ_y) + δ_{y,j}`` (``j = 2 … M``), weights
  ``ψ_y = softmax(φ_intra[y])``. ``sg`` = stop-gradient: the intra-class terms move only the offsets.

With ``d_nk = ‖z_n − μ_k‖²`` and ``d'_nj = ‖z_n − μ_{y_n,j}‖²`` the per-vector terms are (each is averaged
over the vectors of a batch):

    L_g       = [ −log Σ_k π_k exp(−½ d_nk) − logdet_n ] / D                 inter-class mixture NLL
    L_mi      = Σ_k ỹ_nk [ log softmax_k(−½ d_n· + log π̄)_k − log π̄_k ]     mutual information (π̄ = sg(π))
    L_e       = H( softmax_k(−½ d_nk) )                                        entropy of the class posterior
    L_g_intra = [ −log Σ_j ψ_{y_n,j} exp(−½ d'_nj) − logdet_n ] / D          intra-class mixture NLL
    L_z       = −log σ( log p_n / D ),                                         bounded likelihood (CFLOW-AD)
                log p_n = D·log(1/√(2π)) + log Σ_j ψ_{y_n,j} exp(−½ d'_nj) + logdet_n

``ỹ`` is the one-hot class label smoothed by ``ε`` (``(1 − ε)·onehot + ε/K``, ε = 0.02). The
Gaussian normalising constant is dropped from ``L_g`` and ``L_g_intra`` (it does not change gradients).
HGAD minimises ``λ1·L_g − λ2·L_mi + L_e`` for the first two meta-epochs, then adds ``L_g_intra + L_z``
(λ1 = 1, λ2 = 100): the mutual-information term is *maximised*, pushing every feature towards its own
class centre and away from the others. See :func:`total_loss`.

At test time the class ``c`` of the image is known; two per-position statistics are scored
(:meth:`HierarchicalGaussianMixture.log_likelihood_per_dim` and
:meth:`HierarchicalGaussianMixture.negative_entropy`): the per-dimension log-likelihood under class
``c``'s intra-class mixture and the negative entropy of the inter-class posterior.

Example:
    >>> prior = HierarchicalGaussianMixture(n_classes=3, dim=6, n_intra=4)
    >>> z, log_det, y = torch.randn(5, 6), torch.zeros(5), torch.tensor([0, 1, 2, 0, 1])
    >>> terms = prior.losses(z, log_det, y, intra=True)
    >>> sorted(terms), tuple(terms["L_g"].shape)
    (['L_e', 'L_g', 'L_g_intra', 'L_mi', 'L_z'], ())
    >>> loss = total_loss(terms, lambda1=1.0, lambda2=100.0, intra=True)
    >>> bool(loss == terms["L_g"] - 100 * terms["L_mi"] + terms["L_e"] + terms["L_g_intra"] + terms["L_z"])
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: ``log(1 / sqrt(2π))``, the per-dimension constant of a unit Gaussian's log-density.
LOG_NORMAL_CONST = -0.5 * math.log(2.0 * math.pi)


def init_class_centres(n_classes: int, dim: int) -> Tensor:
    """HGAD's deterministic start for the ``K`` class centres: scaled identity blocks.

    Columns ``K·k … K·(k+1) − 1`` hold ``c · I_K`` for ``k = 0 … D//K − 1`` with
    ``c = 5 / sqrt((2D) // K)``; the last ``D mod K`` columns stay 0. Every centre then has the same norm
    and all pairs of centres are equally far apart (``‖μ_i − μ_j‖² = 2·c²·(D//K)`` ≈ 25 for ``D ≫ K``).

    Returns a ``(K, D)`` tensor. ``D`` must be at least ``K`` (else no block fits and all centres would
    coincide at 0).

    Example:
        >>> mu = init_class_centres(3, 7)
        >>> tuple(mu.shape), round(float(mu[0, 0]), 4), float(mu[0, 1]), float(mu[0, 6])
        ((3, 7), 2.5, 0.0, 0.0)
    """
    if dim < n_classes:
        raise ValueError(f"The class centres need dim >= n_classes; got dim={dim}, n_classes={n_classes}. "
                         "Use a backbone stage with more channels than there are classes.")
    scale = 5.0 / math.sqrt((2 * dim) // n_classes)
    mu = torch.zeros(n_classes, dim)
    for k in range(dim // n_classes):
        mu[:, n_classes * k: n_classes * (k + 1)] = scale * torch.eye(n_classes)
    return mu


def squared_distances(z: Tensor, centres: Tensor) -> Tensor:
    """``‖z_n − c_k‖²`` for ``z`` ``(N, D)`` and ``centres`` ``(K, D)`` → ``(N, K)``.

    Uses ``‖z‖² − 2 z·c + ‖c‖²`` (one matrix product, no ``(N, K, D)`` intermediate), as the official code
    does; the result can be a tiny negative number through rounding, which is harmless here.
    """
    return (z * z).sum(1, keepdim=True) - 2.0 * z @ centres.t() + (centres * centres).sum(1)[None, :]


def smooth_onehot(labels: Tensor, n_classes: int, smoothing: float = 0.02) -> Tensor:
    """``(1 − ε)·onehot(labels) + ε / K``: ``(N,)`` integer labels in ``[0, K)`` → ``(N, K)``.

    The one-hot matrix is written with ``scatter_``: unlike ``F.one_hot``, which reads the labels' range
    back to the host, it never waits for the device (the caller checks the range once, see
    :meth:`HierarchicalGaussianMixture.losses`).
    """
    onehot = torch.zeros(labels.shape[0], n_classes, dtype=torch.get_default_dtype(), device=labels.device)
    onehot.scatter_(1, labels.view(-1, 1), 1.0)
    return onehot * (1.0 - smoothing) + smoothing / n_classes


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy ``−Σ_k p_k log p_k`` of ``p = softmax(logits)`` along the last dim: ``(N, K)`` → ``(N,)``."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


class HierarchicalGaussianMixture(nn.Module):
    """The learnable two-level mixture prior of one feature level (see the module docstring).

    Args:
        n_classes: ``K``, the number of classes the unified model is trained on.
        dim: ``D``, the flow's feature dimension.
        n_intra: ``M``, the number of intra-class centres per class (the class centre plus ``M − 1``
            learnable offsets; HGAD uses 10).
        generator: optional ``torch.Generator`` for the ``N(0, 1)`` start of the offsets.

    Parameters (``30,165`` for K = 15, D = 200, M = 10):
        ``mu`` ``(K, D)``: class centres, :func:`init_class_centres`.
        ``mu_delta`` ``(K, M − 1, D)``: intra-class offsets, standard normal at start.
        ``phi_inter`` ``(K,)`` and ``phi_intra`` ``(K, M)``: mixture logits, zero (uniform) at start.
    """

    def __init__(self, n_classes: int, dim: int, n_intra: int = 10,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}.")
        if n_intra < 1:
            raise ValueError(f"n_intra (intra-class centres per class) must be >= 1, got {n_intra}.")
        self.n_classes, self.dim, self.n_intra = n_classes, dim, n_intra
        self.mu = nn.Parameter(init_class_centres(n_classes, dim))
        self.mu_delta = nn.Parameter(torch.randn(n_classes, n_intra - 1, dim, generator=generator))
        self.phi_inter = nn.Parameter(torch.zeros(n_classes))
        self.phi_intra = nn.Parameter(torch.zeros(n_classes, n_intra))

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, dim={self.dim}, n_intra={self.n_intra}"

    # -- components -----------------------------------------------------------------------------
    def intra_centres(self) -> Tensor:
        """All intra-class centres ``(K, M, D)``: ``sg(μ_y)`` then ``sg(μ_y) + δ_{y,j}``."""
        main = self.mu.detach().unsqueeze(1)
        return torch.cat([main, main + self.mu_delta], dim=1)

    def inter_logits(self, z: Tensor) -> Tensor:
        """``−½‖z − μ_k‖²`` for ``z`` ``(N, D)`` → ``(N, K)``."""
        return -0.5 * squared_distances(z, self.mu)

    def intra_logits(self, z: Tensor, labels: Tensor) -> Tensor:
        """``−½‖z_n − μ_{y_n,j}‖² + log ψ_{y_n,j}`` for ``z`` ``(N, D)``, labels ``(N,)`` → ``(N, M)``."""
        self._check_labels(labels)
        return self._intra_logits(z, labels)

    def _intra_logits(self, z: Tensor, labels: Tensor) -> Tensor:
        centres = self.intra_centres()
        dist = squared_distances(z, centres.reshape(-1, self.dim)).view(-1, self.n_classes, self.n_intra)
        own = dist.gather(1, labels.view(-1, 1, 1).expand(-1, 1, self.n_intra)).squeeze(1)
        log_psi = torch.log_softmax(self.phi_intra, dim=1)[labels]
        return -0.5 * own + log_psi

    def _check_labels(self, labels: Tensor) -> None:
        """A clear error for class ids outside ``[0, K)``; one read from the device (both ends at once)."""
        if not labels.numel():
            return
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()
        if lo < 0 or hi >= self.n_classes:
            raise ValueError(f"class ids must lie in [0, {self.n_classes}); got {labels.unique().tolist()}. "
                             "Build the model with n_classes equal to the number of training categories.")

    # -- statistics used for scoring ------------------------------------------------------------
    def log_likelihood_per_dim(self, z: Tensor, log_det: Tensor, labels: Tensor) -> Tensor:
        """``log p(e | y) / D`` under class ``y``'s intra-class mixture (with the flow's log-det).

        ``z`` ``(N, D)``, ``log_det`` ``(N,)``, ``labels`` ``(N,)`` → ``(N,)``.
        """
        log_mix = torch.logsumexp(self.intra_logits(z, labels), dim=1)
        return (self.dim * LOG_NORMAL_CONST + log_mix + log_det) / self.dim

    def negative_entropy(self, z: Tensor) -> Tensor:
        """``Σ_k p_k log p_k`` of the inter-class posterior ``p = softmax(−½‖z − μ_k‖²)``: ``(N,)``.

        Near 0 when a feature sits clearly at one class centre, negative when it is between centres.
        """
        return -entropy_from_logits(self.inter_logits(z))

    # -- training -------------------------------------------------------------------------------
    def losses(self, z: Tensor, log_det: Tensor, labels: Tensor, intra: bool = True,
               label_smoothing: float = 0.02) -> dict[str, Tensor]:
        """The loss terms of the module docstring, each a scalar mean over the ``N`` vectors.

        Args:
            z: flow outputs ``(N, D)``.
            log_det: ``(N,)`` log-determinants of the flow at each vector.
            labels: ``(N,)`` class ids.
            intra: also return the stage-2 terms ``L_g_intra`` and ``L_z``.
            label_smoothing: ``ε`` of the smoothed one-hot labels in ``L_mi``.

        Returns:
            ``{"L_g", "L_mi", "L_e"}`` (+ ``"L_g_intra"``, ``"L_z"``). ``L_mi`` is to be *maximised*;
            combine them with :func:`total_loss`.
        """
        self._check_labels(labels)
        logits = self.inter_logits(z)
        log_pi = torch.log_softmax(self.phi_inter, dim=0)
        terms = {"L_g": ((-torch.logsumexp(logits + log_pi, dim=1) - log_det) / self.dim).mean()}
        log_pi_bar = log_pi.detach()
        target = smooth_onehot(labels, self.n_classes, label_smoothing).to(z.dtype)
        info = (torch.log_softmax(logits + log_pi_bar, dim=1) - log_pi_bar) * target
        terms["L_mi"] = info.sum(1).mean()
        terms["L_e"] = entropy_from_logits(logits).mean()
        if intra:
            log_mix = torch.logsumexp(self._intra_logits(z, labels), dim=1)  # labels checked above
            terms["L_g_intra"] = ((-log_mix - log_det) / self.dim).mean()
            log_p = (self.dim * LOG_NORMAL_CONST + log_mix + log_det) / self.dim
            terms["L_z"] = -F.logsigmoid(log_p).mean()
        return terms


def total_loss(terms: dict[str, Tensor], lambda1: float = 1.0, lambda2: float = 100.0,
               intra: bool = True) -> Tensor:
    """HGAD's objective: ``λ1·L_g − λ2·L_mi + L_e`` (+ ``L_g_intra + L_z`` in stage 2).

    The minus sign on ``L_mi`` is the point: the mutual information between features and class labels is
    maximised while the likelihood terms are minimised.
    """
    loss = lambda1 * terms["L_g"] - lambda2 * terms["L_mi"] + terms["L_e"]
    if intra:
        loss = loss + terms["L_g_intra"] + terms["L_z"]
    return loss
