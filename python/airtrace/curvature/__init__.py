"""Curvature in projected-gradient space, per layer: identity, damped Fisher, K-FAC, EK-FAC, low rank; one module per
method (``methods/``) plus the shared fitting machinery (``fitting``), the damping rules (``damping``, ``moments``) and
the fitted ``Curvature`` (``fitted``), re-exported here; they import the kernels layer and ``airtrace.util``.

Every method ends in a :class:`Curvature`: one damped inverse per layer, applied
to per-example projected gradients by :meth:`Curvature.precondition` and saved
to / loaded from one safetensors file.

Conventions:
    * Features are per-example projected gradients ``ĝ_b`` of shape
      (k_out, k_in) per layer (``airtrace.ops.project_factored.project_factored``). ``vec`` is
      row-major: entry (i, j) is index ``i * k_in + j``, which pairs with
      ``kron(S_G, S_A)``.
    * N is the number of examples. Fisher: ``F = (1/N) Σ_b vec(ĝ_b) vec(ĝ_b)ᵀ``.
      K-FAC factors sum over tokens and divide by examples:
      ``S_A = (1/N) Σ_b Σ_t a_bt a_btᵀ``, ``S_G = (1/N) Σ_b Σ_t g_bt g_btᵀ`` with
      ``a_bt = A_bt P_in`` (k_in,) and ``g_bt = G_bt P_out`` (k_out,). With T
      tokens per example ``S_G ⊗ S_A`` is thus of order T × F; EK-FAC's second
      pass refits the eigenvalues on the per-example features, and with relative
      damping a curvature scaled by c only scales the preconditioned features by
      1/c, so rankings do not depend on this convention.
    * Everything is accumulated, factorised (eigh, Cholesky) and applied in
      float64, except that the K-FAC / EK-FAC fitters form each batch's
      products in the features' precision (float32 unless float64) before
      adding them to float64 sums. ``precondition`` returns float32 (float64 for
      float64 inputs).
    * Damping (:class:`Damping`): ``λ = f × mean eigenvalue`` of the layer's
      spectrum (F for Fisher and low rank; the Kronecker spectrum ``e_G e_Aᵀ``
      for K-FAC; Λ for EK-FAC) with the method's fixed factor f
      (:mod:`airtrace.curvature.damping`) unless given, or per-layer factors
      (its ``"auto"`` rule, which the Attributor applies by default), or an
      absolute value. The λ used per layer and the rule are kept in
      ``Curvature.damping`` / ``damping_rule`` and in the saved metadata.
    * A factor whose lowest eigenvalue is below ``-PSD_TOL × max|eigenvalue|`` is
      rejected (``PSD_TOL_FLOAT32`` for K-FAC factors summed from float32
      products); smaller negative eigenvalues (round-off) are clamped to 0.

Fitting is streamed: call ``update(...)`` once per batch, then ``finalize()``.
EK-FAC takes two passes over the data::

    kfac_fitter = KFACFitter()                 # phase 1: Kronecker factors
    for a, g, mask in token_batches:           # {layer: (B, T, k_in)}, {layer: (B, T, k_out)}, (B, T)
        kfac_fitter.update(a, g, mask)
    kfac_fit = kfac_fitter.finalize()          # K-FAC; its eigenbases start phase 2

    ekfac_fitter = EKFACFitter(kfac_fit)       # phase 2: eigenvalue corrections
    for features in feature_batches:           # {layer: (B, k_out, k_in)}
        ekfac_fitter.update(features)
    ekfac_fit = ekfac_fitter.finalize()
    ekfac_fit.save("curvature.safetensors")
    preconditioned = Curvature.load("curvature.safetensors").precondition(query_features)
"""

from airtrace.curvature.fitted import FORMAT_VERSION, INVERSES, METADATA_KEY, Curvature, LayerInverse, TensorReader
from airtrace.curvature.fitting import (
    F64,
    PSD_TOL,
    PSD_TOL_FLOAT32,
    STATE_KEY,
    AccumulatorState,
    Damping,
    Dims,
    Features,
)
from airtrace.curvature.methods.ekfac import EKFACFitter, ekfac
from airtrace.curvature.methods.fisher import CholeskyInverse, FisherFitter, damped_fisher
from airtrace.curvature.methods.identity import IdentityInverse, identity
from airtrace.curvature.methods.kfac import EigenbasisInverse, KFACFitter, kfac
from airtrace.curvature.methods.lowrank import LowRankFitter, LowRankInverse, low_rank
from airtrace.curvature.moments import MomentAccumulator

__all__ = [
    "AccumulatorState",
    "CholeskyInverse",
    "Curvature",
    "Damping",
    "Dims",
    "EKFACFitter",
    "EigenbasisInverse",
    "F64",
    "FORMAT_VERSION",
    "Features",
    "FisherFitter",
    "INVERSES",
    "IdentityInverse",
    "KFACFitter",
    "LayerInverse",
    "LowRankFitter",
    "LowRankInverse",
    "METADATA_KEY",
    "MomentAccumulator",
    "PSD_TOL",
    "PSD_TOL_FLOAT32",
    "STATE_KEY",
    "TensorReader",
    "damped_fisher",
    "ekfac",
    "identity",
    "kfac",
    "low_rank",
]
