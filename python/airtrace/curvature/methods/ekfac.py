"""Curvature method "ekfac": K-FAC's eigenbases with eigenvalues refitted on per-example features, and its streaming
fitter (phase 2); imports ``airtrace.curvature.fitted``, ``.fitting`` and ``airtrace.curvature.methods.kfac``."""

from __future__ import annotations

from airtrace.curvature.fitted import Curvature
from airtrace.curvature.fitting import F64, Accumulator, Damping, Features, as_damping, check_layer_tensor, check_mapping, checked_spectrum
from airtrace.curvature.methods.kfac import EigenbasisInverse


def _eigenbases(fit: Curvature) -> dict[str, EigenbasisInverse]:
    if fit.method not in ("kfac", "ekfac"):
        raise ValueError(
            f"EK-FAC needs the eigenbases of a fitted K-FAC (phase 1: KFACFitter), got a {fit.method!r} curvature"
        )
    return fit.inverses


def ekfac(
    eigenbases: Curvature,
    corrections: Features,
    damping: Damping | float | None = None,
    n_examples: int | None = None,
) -> Curvature:
    """EK-FAC: ``Q [diag(vec Λ) + λI]⁻¹ Qᵀ`` with Q = kron(Q_G, Q_A) from K-FAC and Λ fitted on the data.

    Args:
        eigenbases: a fitted "kfac" (or "ekfac") curvature whose Q_G, Q_A are reused.
        corrections: {layer: Λ (k_out, k_in)} = mean over examples of (Q_Gᵀ ĝ_b Q_A)², for every layer.
        damping: λ relative to the mean of Λ.
        n_examples: recorded in the metadata.

    Raises:
        ValueError: missing layer, wrong shape, NaN/Inf, or a negative Λ entry (naming the layer).
    """
    bases = _eigenbases(eigenbases)
    check_mapping("corrections", corrections)
    if set(corrections) != set(bases):
        raise ValueError(f"corrections must cover the layers {sorted(bases)}, got {sorted(corrections)}")
    damping = as_damping(damping)
    inverses = {}
    for name, Lam in corrections.items():
        base = bases[name]
        check_layer_tensor(name, "corrections", Lam, "(k_out, k_in)")
        if tuple(Lam.shape) != base.dims:
            raise ValueError(f"layer {name!r}: corrections must be (k_out, k_in) = {base.dims}, got {tuple(Lam.shape)}")
        Lam = checked_spectrum(name, "EK-FAC eigenvalues", Lam.to(F64))
        lam = damping.resolve(name, float(Lam.mean()), "ekfac")
        inverses[name] = EigenbasisInverse(base.dims, lam, base.eigvecs_G, base.eigvecs_A, Lam)
    return Curvature("ekfac", inverses, damping.factor_for("ekfac"), n_examples, damping.record("ekfac"))


class EKFACFitter(Accumulator):
    """Phase 2 of EK-FAC: streams Λ = (1/N) Σ_b (Q_Gᵀ ĝ_b Q_A)² in the eigenbases of a fitted K-FAC.

    Args:
        eigenbases: the K-FAC from phase 1 (``KFACFitter(...).finalize()`` or ``Curvature.load``).
        damping: :class:`Damping`, a number (absolute λ) or None (the method's fixed factor × mean of Λ).
    """

    def __init__(self, eigenbases: Curvature, damping: Damping | float | None = None) -> None:
        self._bases = _eigenbases(eigenbases)
        super().__init__(eigenbases.dims)
        self.eigenbases = eigenbases
        self.damping = as_damping(damping)

    def update(self, features: Features) -> None:
        """Add one batch {layer: (B, k_out, k_in)} of projected per-example gradients, every layer.

        The rotation runs in the features' precision (float32 unless they are float64, as the
        store holds them); the squares are summed over examples in float64.
        """
        for name, x in self._feature_batch(features, dtype=None).items():
            base = self._bases[name]
            rotated = base.eigvecs_G.to(x.device, x.dtype).T @ x @ base.eigvecs_A.to(x.device, x.dtype)
            self._add(name, rotated.square().sum(0, dtype=F64))

    def finalize(self) -> Curvature:
        corrections = {name: Lam for name, (Lam,) in self._means().items()}
        return ekfac(self.eigenbases, corrections, self.damping, self.n_examples)
