"""Scores of one fitted curvature at many dampings from one featurize pass: features in the curvature's eigenbasis;
imports ``airtrace.curvature``.

Every damped curvature that airtrace fits is diagonal in a fixed eigenbasis
per layer: ``(C + λI)⁻¹ = Q diag(1 / (e + λ)) Qᵀ`` with Q = kron(Q_G, Q_A) and
e = Λ for K-FAC / EK-FAC, and Q, e the eigenpairs of F for the damped Fisher.
Rotating the training and query features into that basis once,
``r = Qᵀ vec(ĝ)``, makes the inner-product scores at any per-layer damping
``score(x, z) = Σ_layers Σ_c r_x,c r_z,c / (e_c + λ_layer)`` one matrix product,
so a grid of dampings costs one featurize and one fit (:class:`Spectral`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from airtrace.curvature import Curvature

F64 = torch.float64
METHODS = ("fisher", "kfac", "ekfac")


@dataclass(frozen=True)
class Spectral:
    """Training and query features in a curvature's eigenbasis, per layer.

    Attributes:
        method: "fisher", "kfac" or "ekfac".
        train: {layer: (n, p) float32} rotated training features, p = k_out * k_in.
        query: {layer: (q, p) float32} rotated query features.
        eigenvalues: {layer: (p,) float64} e >= 0 of the undamped curvature in that basis.
    """

    method: str
    train: dict[str, torch.Tensor]
    query: dict[str, torch.Tensor]
    eigenvalues: dict[str, torch.Tensor]

    @property
    def n(self) -> int:
        """Training examples."""
        return next(iter(self.train.values())).shape[0]

    def scores(self, damping: Mapping[str, float]) -> torch.Tensor:
        """(q, n) float64 inner-product scores ``ĝ_xᵀ (C + λ_layer I)⁻¹ ĝ_z`` summed over layers.

        Args:
            damping: {layer: λ > 0} for every layer.
        """
        missing = sorted(set(self.eigenvalues) - set(damping))
        if missing:
            raise ValueError(f"damping must give a λ for every layer, missing {missing}")
        total = None
        for name, e in self.eigenvalues.items():
            weight = (1.0 / (e + float(damping[name]))).to(torch.float32)
            part = (self.query[name] * weight) @ self.train[name].T
            total = part.to(F64) if total is None else total + part.to(F64)
        return total


def _rotate(features: torch.Tensor, Q_G: torch.Tensor, Q_A: torch.Tensor) -> torch.Tensor:
    """(B, k_out, k_in) -> (B, k_out * k_in) float32 ``vec(Q_Gᵀ ĝ Q_A)``, computed in float64."""
    return (Q_G.T @ features.to(F64) @ Q_A).reshape(features.shape[0], -1).to(torch.float32)


def spectral(curvature: Curvature, train: Mapping[str, torch.Tensor], query: Mapping[str, torch.Tensor]) -> Spectral:
    """Rotate features into the eigenbasis of a fitted curvature.

    Args:
        curvature: a fitted "kfac" or "ekfac" curvature (its eigenbases and Λ are used), or a
            "fisher" one (its F is recomputed from ``train``: ``F = (1/n) Σ vec(ĝ) vec(ĝ)ᵀ``,
            the matrix :class:`airtrace.curvature.FisherFitter` factors).
        train: {layer: (n, k_out, k_in)} training features (every layer of the curvature).
        query: {layer: (q, k_out, k_in)} query features.

    Returns:
        :class:`Spectral`.

    Raises:
        ValueError: another curvature method, or layers that differ from the curvature's.
    """
    if curvature.method not in METHODS:
        raise ValueError(f"spectral needs a curvature of {METHODS}, got {curvature.method!r}")
    if set(train) != set(curvature.dims) or set(query) != set(curvature.dims):
        raise ValueError(f"train and query must cover the curvature's layers {sorted(curvature.dims)}, "
                         f"got {sorted(train)} and {sorted(query)}")
    rotated_train, rotated_query, eigenvalues = {}, {}, {}
    for name, inverse in curvature.inverses.items():
        if curvature.method == "fisher":
            x = train[name].reshape(train[name].shape[0], -1).to(F64)
            e, U = torch.linalg.eigh(x.T @ x / x.shape[0])
            eigenvalues[name] = e.clamp_min(0)
            rotated_train[name] = (x @ U).to(torch.float32)
            rotated_query[name] = (query[name].reshape(query[name].shape[0], -1).to(F64) @ U).to(torch.float32)
        else:
            eigenvalues[name] = inverse.eigenvalues.reshape(-1)
            rotated_train[name] = _rotate(train[name], inverse.eigvecs_G, inverse.eigvecs_A)
            rotated_query[name] = _rotate(query[name], inverse.eigvecs_G, inverse.eigvecs_A)
    return Spectral(curvature.method, rotated_train, rotated_query, eigenvalues)
