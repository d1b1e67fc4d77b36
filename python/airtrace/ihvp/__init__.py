"""Exact influence: inverse-Hessian(GGN)-vector products of the training loss over the tracked layers' parameters, by
iterative solvers on curvature-vector products (``products``, ``solvers``) configured by ``SolverConfig`` and applied
by ``InverseHVP``; imports ``airtrace.capture`` and ``airtrace.curvature``.

Example::

    products = CurvatureProducts(model, layers, loss_fn, train_batches, n, matrix="ggn")
    solver = InverseHVP(products, damping={layer: λ}, config=SolverConfig("cg"), preconditioner=ekfac)
    solved = solver.solve(query_features)          # (q, p): (H + D)⁻¹ g_q in the feature layout
    scores = solved @ train_features.T             # influence g_zᵀ (H + D)⁻¹ g_q
    solver.reports[-1]                              # SolveReport: iterations, residual

D is the damping per layer (λ_layer on every entry of its block). A solve that
does not converge raises :class:`SolverError`; nothing is returned for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from airtrace.curvature import Curvature
from airtrace.ihvp.products import MATRICES, CurvatureProducts, ParameterLayout
from airtrace.ihvp.solvers import SOLVERS, SolveReport, SolverError, arnoldi, cg, dense, dense_matrix, lissa
from airtrace.util.checks import positive_int

F64 = torch.float64
DENSE_MAX_WIDTH = 8192
"""Largest p for which ``method="dense"`` builds the explicit (p, p) matrix (512 MiB in float64)."""

__all__ = [
    "CurvatureProducts",
    "DENSE_MAX_WIDTH",
    "InverseHVP",
    "MATRICES",
    "ParameterLayout",
    "SOLVERS",
    "SolveReport",
    "SolverConfig",
    "SolverError",
]


@dataclass(frozen=True)
class SolverConfig:
    """How ``(H + D)⁻¹ g`` is computed.

    Attributes:
        method: "cg" (conjugate gradients, preconditioned by the fitted EK-FAC when there is one), "lissa",
            "arnoldi" or "dense" (explicit matrix, p <= DENSE_MAX_WIDTH).
        matrix: "ggn" (Gauss-Newton, positive semi-definite for convex losses of the outputs) or "hessian".
        tol: relative residual every solve must reach (cg, lissa).
        max_iter: most CG iterations.
        depth: most LiSSA terms.
        scale: LiSSA scale (None: 1.1 × the largest eigenvalue of H + D).
        rank: Arnoldi eigenpairs kept.
        iterations: Arnoldi steps (None: min(p, 2 × rank + 10)).
    """

    method: str = "cg"
    matrix: str = "ggn"
    tol: float = 1e-6
    max_iter: int = 500
    depth: int = 5000
    scale: float | None = None
    rank: int = 20
    iterations: int | None = None

    def __post_init__(self) -> None:
        if self.method not in SOLVERS:
            raise ValueError(f"solver method must be one of {SOLVERS}, got {self.method!r}")
        if self.matrix not in MATRICES:
            raise ValueError(f"solver matrix must be one of {MATRICES}, got {self.matrix!r}")
        if not isinstance(self.tol, float) or not 0 < self.tol < 1:
            raise ValueError(f"solver tol must be a float in (0, 1), got {self.tol!r}")
        for name in ("max_iter", "depth", "rank"):
            positive_int(f"solver {name}", getattr(self, name))
        if self.iterations is not None:
            positive_int("solver iterations", self.iterations)

    @classmethod
    def of(cls, solver: SolverConfig | Mapping | str | None) -> SolverConfig:
        """A config from a SolverConfig, a dict of its fields, a method name or None (the defaults)."""
        if isinstance(solver, SolverConfig):
            return solver
        if solver is None or isinstance(solver, str):
            return cls() if solver is None else cls(method=solver)
        if isinstance(solver, Mapping):
            unknown = sorted(set(solver) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown solver keys {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
            return cls(**solver)
        raise ValueError(f"solver must be a SolverConfig, a dict, a method name or None, got {solver!r}")

    def as_dict(self) -> dict:
        return asdict(self)


class InverseHVP:
    """``(H + D)⁻¹`` applied to rows of feature-layout vectors by the configured solver.

    Args:
        products: the :class:`CurvatureProducts` of the training loss.
        damping: {layer: λ > 0} for every layer of the layout.
        config: :class:`SolverConfig`.
        preconditioner: a fitted curvature on the same layers and unprojected dims (e.g. EK-FAC with the same
            damping) whose ``precondition`` approximates (H + D)⁻¹: used by "cg".

    Attributes:
        reports: the :class:`SolveReport` of every :meth:`solve`, in order.
    """

    def __init__(self, products: CurvatureProducts, damping: Mapping[str, float], config: SolverConfig,
                 preconditioner: Curvature | None = None):
        dims = products.layout.dims
        if set(damping) != set(dims):
            raise ValueError(f"damping must give a λ for every layer {sorted(dims)}, got {sorted(damping)}")
        if preconditioner is not None and preconditioner.dims != dims:
            raise ValueError(f"the preconditioner covers {preconditioner.dims}, the solver's layers are {dims}: "
                             "fit it on the same layers without projection")
        if config.method == "dense" and products.width > DENSE_MAX_WIDTH:
            raise ValueError(f"solver 'dense' builds a ({products.width}, {products.width}) matrix; it is meant for "
                             f"at most {DENSE_MAX_WIDTH} parameters: use 'cg'")
        if config.method == "arnoldi" and len(set(damping.values())) > 1:
            raise ValueError("solver 'arnoldi' takes one damping for every layer (the complement of its eigenvectors "
                             "is scaled by 1/λ); pass an absolute damping")
        self.products, self.config, self.preconditioner = products, config, preconditioner
        self.damping = dict(damping)
        self._diagonal = torch.cat([torch.full((d_out * d_in,), float(self.damping[name]), dtype=F64)
                                    for name, (d_out, d_in) in dims.items()])
        self._matrix: torch.Tensor | None = None
        self.reports: list[SolveReport] = []

    @property
    def width(self) -> int:
        return self.products.width

    def _precondition(self, R: torch.Tensor) -> torch.Tensor:
        """M R for R (p, r): the preconditioner's inverse block by block."""
        dims = self.products.layout.dims
        parts = torch.split(R.T, [d_out * d_in for d_out, d_in in dims.values()], dim=1)
        blocks = {name: part.reshape(-1, *d) for (name, d), part in zip(dims.items(), parts)}
        out = self.preconditioner.precondition(blocks)
        return torch.cat([out[name].reshape(R.shape[1], -1) for name in dims], dim=1).T.to(F64)

    def solve(self, rows: torch.Tensor) -> torch.Tensor:
        """``(H + D)⁻¹ g`` for every row g of ``rows`` (r, p) -> (r, p) float64, one solve for all rows.

        Raises:
            SolverError: the solve did not converge, or H + D is not positive definite.
        """
        if rows.dim() != 2 or rows.shape[1] != self.width:
            raise ValueError(f"rows must be (r, p) with p = {self.width}, got {tuple(rows.shape)}")
        c, B = self.config, rows.T.to(F64)
        device = B.device
        diagonal = self._diagonal.to(device)
        if c.method == "cg":
            pre = self._precondition if self.preconditioner is not None else None
            x, report = cg(self.products, B, diagonal, tol=c.tol, max_iter=c.max_iter, precondition=pre)
        elif c.method == "lissa":
            x, report = lissa(self.products, B, diagonal, tol=c.tol, depth=c.depth, scale=c.scale)
        elif c.method == "arnoldi":
            x, report = arnoldi(self.products, B, float(diagonal[0]), rank=min(c.rank, self.width),
                                iterations=c.iterations)
        else:
            if self._matrix is None:
                self._matrix = dense_matrix(self.products, self.width, device=device)
            x, report = dense(self.products, B, diagonal, matrix=self._matrix)
        self.reports.append(report)
        return x.T.contiguous()
