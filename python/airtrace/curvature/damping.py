"""Damping rules: λ per layer from a fitted curvature's spectrum and the moments of the training features; imports
nothing from airtrace.

Every curvature inverts ``C + λI`` per layer, with C's eigenvalues e (the
Fisher's, K-FAC's ``e_G e_Aᵀ``, EK-FAC's Λ). The rules here are retraining-free:
they read only e and the training features ĝ_i (per-example projected
gradients), and were chosen by leave-one-task-out LDS on the development suite
(:mod:`airtrace.eval.suite`, ``benches/bench_damping.py``).

- ``"auto"`` (:func:`auto_factors`, the Attributor's default): ``λ = κ_method × mean(e) × ρ^b`` with the
  mean-gradient ratio ``ρ = ‖mean_i ĝ_i‖² / mean_i ‖ĝ_i‖²`` of the layer (in
  [0, 1]) and b = ½. The mean training gradient is what the training left
  unfitted against its explicit or implicit regularisation: at a stationary
  point of ``L(θ) + (λ*/2)‖θ - θ₀‖²`` it equals ``-λ*(θ - θ₀)``, so ρ grows as
  λ*² and ``ρ^½`` follows the regularisation that the retrained models really
  have, which is the damping that predicts them best; κ absorbs the scale
  (``‖θ - θ₀‖² / mean ‖ĝ‖²``) and is fitted per method.
- Fixed factor (:data:`DEFAULT_FACTORS`, what a :class:`airtrace.curvature.Damping` without a value or
  factor gives): ``λ = f_method × mean(e)``.

- ``"stationary"`` (:func:`stationary_damping`, what ``damping="auto"`` gives the exact solver, curvature
  "exact"): one absolute ``λ = -⟨ḡ, θ⟩ / ‖θ‖²`` from the mean *unprojected* training gradient ḡ and
  the tracked parameters θ: the L2 strength at which θ is a stationary point of
  ``L(θ) + (λ/2)‖θ‖²``, so ``H + λI`` is the Hessian (Gauss-Newton matrix) of that objective. On
  the development suite it recovers the five tabular tasks' L2 coefficient within 30%, and on the
  four where the exact solver was run over a grid of λ (1e-5..1; not the digits MLP) its LDS at that
  λ is within 0.04 of the grid's best, where the ``"auto"`` λ of EK-FAC (10-1000x smaller there)
  gave 0.31 on the wine MLP and left the digits MLP's CG unconverged.

The bench compares them with two parameter-free criteria, which did worse
there: generalized cross-validation on the linearised model (:func:`gcv`) and
the Oracle Approximating Shrinkage of the spectrum (:func:`oas_factor`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

F64 = torch.float64
DEFAULT_FACTORS = {"fisher": 1.0, "lowrank": 1.0, "kfac": 0.1, "ekfac": 0.1}
"""Relative damping factor of each curvature method when none is given (λ = factor × mean eigenvalue);
low rank takes the Fisher's."""
AUTO_KAPPA = {"fisher": 10 ** (4 / 3), "lowrank": 10 ** (4 / 3), "kfac": 10 ** (2 / 3), "ekfac": 10 ** (2 / 3)}
"""κ of the ``"auto"`` rule per curvature method (λ = κ × mean(e) × ρ^b); low rank takes the Fisher's."""
AUTO_EXPONENT = 0.5
"""b of the ``"auto"`` rule: fixed by the ridge argument of the module docstring (λ* ∝ ρ^½), not fitted."""
AUTO_FLOOR = 1e-6
"""Smallest relative factor of the ``"auto"`` rule (ρ = 0: features whose mean is exactly zero)."""


def default_factor(method: str) -> float:
    """The relative damping factor of ``method`` ("fisher", "lowrank", "kfac" or "ekfac") when none is given."""
    if method not in DEFAULT_FACTORS:
        raise ValueError(f"no default damping for curvature {method!r}; methods: {sorted(DEFAULT_FACTORS)}")
    return DEFAULT_FACTORS[method]


# --------------------------------------------------------------------------- feature moments


@dataclass(frozen=True)
class FeatureMoments:
    """First and second moments of the training features of every layer.

    Attributes:
        n: examples.
        mean: {layer: (k_out * k_in,) float64} mean feature vector ``mean_i vec(ĝ_i)``.
        mean_sq_norm: {layer: float} ``mean_i ‖ĝ_i‖²``.
    """

    n: int
    mean: dict[str, torch.Tensor]
    mean_sq_norm: dict[str, float]

    def ratio(self, layer: str) -> float:
        """The mean-gradient ratio ``ρ = ‖mean_i ĝ_i‖² / mean_i ‖ĝ_i‖²`` of one layer, in [0, 1] (0: zero features)."""
        second = self.mean_sq_norm[layer]
        return 0.0 if second <= 0 else min(1.0, float(self.mean[layer].square().sum()) / second)


# --------------------------------------------------------------------------- rules


def mean_gradient_factor(ratio: float, kappa: float, exponent: float) -> float:
    """Relative damping factor of the mean-gradient rule: ``max(κ ρ^b, AUTO_FLOOR)`` for ρ in [0, 1]."""
    return max(kappa * ratio**exponent, AUTO_FLOOR)


def auto_factors(method: str, moments: FeatureMoments) -> tuple[dict[str, float], dict[str, float]]:
    """The ``"auto"`` rule's relative factor of every layer (:func:`mean_gradient_factor` with the shipped constants).

    Args:
        method: the curvature method ("fisher", "lowrank", "kfac", "ekfac").
        moments: the training features' moments (:class:`airtrace.curvature.moments.MomentAccumulator`).

    Returns:
        ({layer: relative factor}, {layer: ρ}); λ of a layer = factor × its mean eigenvalue.
    """
    if method not in AUTO_KAPPA:
        raise ValueError(f"damping 'auto' is defined for curvatures {sorted(AUTO_KAPPA)}, got {method!r}")
    ratios = {name: moments.ratio(name) for name in moments.mean}
    return {name: mean_gradient_factor(r, AUTO_KAPPA[method], AUTO_EXPONENT) for name, r in ratios.items()}, ratios


def stationary_damping(mean_gradient: torch.Tensor, theta: torch.Tensor) -> tuple[float, float]:
    """The L2 strength at which ``theta`` is a stationary point: ``λ = -⟨ḡ, θ⟩ / ‖θ‖²`` (least squares of ḡ = -λθ).

    Args:
        mean_gradient: (p,) ḡ, the mean over the training set of the per-example loss gradients (unprojected).
        theta: (p,) the parameters in the same layout.

    Returns:
        (λ, cosine of -ḡ and θ): λ <= 0 when the mean gradient does not point against θ (no L2 pull to read).
    """
    g, t = mean_gradient.to(F64).flatten(), theta.to(F64).flatten()
    if g.shape != t.shape:
        raise ValueError(f"mean_gradient and theta must have the same size, got {g.numel()} and {t.numel()}")
    sq = float(t @ t)
    if sq == 0 or float(g.norm()) == 0:
        return 0.0, 0.0
    inner = -float(g @ t)
    return inner / sq, inner / (float(g.norm()) * math.sqrt(sq))


def oas_factor(eigenvalues: torch.Tensor, n: int) -> float:
    """Relative damping of the Oracle Approximating Shrinkage of a covariance with spectrum e from n samples.

    OAS (Chen et al. 2010, as scikit-learn's ``OAS``) shrinks S to ``(1 - s) S + s μ I`` with
    ``μ = tr(S)/p``, ``s = min(1, (tr(S²)/p² + μ²) / ((n + 1)(tr(S²)/p² - μ²/p)))``; up to scale that
    is ``S + λI`` with ``λ = s / (1 - s) × μ``.

    Returns:
        ``s / (1 - s)`` (inf for s = 1).
    """
    e = eigenvalues.to(F64).flatten()
    p = e.numel()
    mu, alpha = float(e.sum()) / p, float(e.square().sum()) / p**2
    den = (n + 1) * (alpha - mu * mu / p)
    s = 1.0 if den <= 0 else min((alpha + mu * mu) / den, 1.0)
    return math.inf if s >= 1 else s / (1 - s)


def gcv(features: Mapping[str, torch.Tensor], eigenvalues: Mapping[str, torch.Tensor], damping: Mapping[str, float],
        y: torch.Tensor | None = None, kind: str = "gcv") -> float:
    """Cross-validation error of the ridge regression of y on the features with the curvature's hat matrix.

    The hat matrix of the damped curvature is the influence matrix of the training set,
    ``H = (1/n) Σ_layers X (diag(e) + λI)⁻¹ Xᵀ`` with X the (n, p) features in the curvature's
    eigenbasis (for the damped Fisher exactly the ridge hat matrix ``X (XᵀX + nλI)⁻¹ Xᵀ``).
    With the fitted values ``ŷ = H y``:

    - "gcv": ``mean((y - ŷ)²) / (1 - tr(H)/n)²`` (Craven and Wahba);
    - "loo": ``mean(((y - ŷ) / (1 - H_ii))²)``, the exact leave-one-out error of the ridge fit.

    Args:
        features: {layer: (n, p) float} rotated training features.
        eigenvalues: {layer: (p,)} e >= 0.
        damping: {layer: λ > 0}.
        y: (n,) response (default ones: the regression of the Gauss-Newton step of the mean loss).
        kind: "gcv" or "loo".

    Returns:
        The criterion (lower is better).
    """
    if kind not in ("gcv", "loo"):
        raise ValueError(f"kind must be 'gcv' or 'loo', got {kind!r}")
    n = next(iter(features.values())).shape[0]
    y = torch.ones(n, dtype=F64) if y is None else y.to(F64)
    fitted, leverage = torch.zeros(n, dtype=F64), torch.zeros(n, dtype=F64)
    for name, e in eigenvalues.items():
        X = features[name].to(F64)
        weight = 1.0 / (e.to(F64) + float(damping[name]))
        fitted += X @ (weight * (X.T @ y)) / n
        leverage += (X.square() * weight).sum(1) / n
    residual = y - fitted
    if kind == "gcv":
        return float(residual.square().mean()) / (1 - float(leverage.mean())) ** 2
    return float((residual / (1 - leverage)).square().mean())
