"""Solvers of ``(H + D) X = B`` for a symmetric matrix H given only as products ``H V``: preconditioned conjugate
gradients, LiSSA, Arnoldi (top eigenpairs + damping) and the explicit dense inverse; imports nothing from airtrace.

Every solver takes the right-hand sides as columns, B (p, r) float64, and a
``matvec(V (p, r)) -> H V (p, r)``; D = diag(damping) (p,) > 0 is added here.
Each returns ``(X (p, r) float64, SolveReport)`` and raises :class:`SolverError`
instead of returning a solve that did not converge: a residual
``‖B - (H + D) X‖ / ‖B‖`` above ``tol`` for some column after the iteration
budget, a direction of non-positive curvature (CG, dense: H + D is not positive
definite), or Ritz pairs that did not converge (Arnoldi).

- ``cg``: conjugate gradients per column (all columns share each product),
  preconditioned by ``precondition(R (p, r)) ≈ (H + D)⁻¹ R``, e.g. a fitted
  EK-FAC; exact in exact arithmetic after p steps.
- ``lissa``: the truncated Neumann series ``X_T = (1/s) Σ_{j<=T} (I - (H + D)/s)^j B``
  (Agarwal et al. 2017) with full-batch products: error ``(I - (H + D)/s)^(T+1) (H + D)⁻¹ B``;
  the scale s defaults to 1.1 × the largest eigenvalue of H + D (power iteration).
- ``arnoldi``: Arnoldi iteration on H (Schioppa et al. 2022) for ``iterations``
  steps from a seeded random start, the ``rank`` Ritz pairs of largest magnitude
  (U, e), then ``X = U diag(1/(e + d)) Uᵀ B + (B - U Uᵀ B) / d`` for a uniform damping d:
  the inverse of the rank-r truncation of H plus dI, not the inverse of H + dI.
  Its residual is reported, not checked (it is an approximation by design).
- ``dense``: H built from p products with the identity, ``(H + D)⁻¹ B`` by a
  float64 Cholesky solve (tiny models).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

F64 = torch.float64
MatVec = Callable[[torch.Tensor], torch.Tensor]
SOLVERS = ("cg", "lissa", "arnoldi", "dense")


class SolverError(ValueError):
    """A solve that did not converge or a matrix that is not positive definite (the message says which and the fix)."""


@dataclass(frozen=True)
class SolveReport:
    """How a solve went.

    Attributes:
        method: "cg", "lissa", "arnoldi" or "dense".
        columns: right-hand sides solved.
        iterations: products with H per column (CG / LiSSA steps, Arnoldi steps, p for dense).
        residual: largest relative residual ``‖b - (H + D) x‖ / ‖b‖`` over the columns.
        converged: every column met the tolerance (always True for a returned CG / LiSSA / dense solve).
        detail: method-specific numbers (LiSSA scale, Arnoldi eigenvalues and Ritz residual, ...).
    """

    method: str
    columns: int
    iterations: int
    residual: float
    converged: bool
    detail: dict

    def as_dict(self) -> dict:
        return asdict(self)


def _checked(rhs: torch.Tensor, damping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(rhs, torch.Tensor) or rhs.dim() != 2 or rhs.shape[1] == 0:
        shape = tuple(rhs.shape) if isinstance(rhs, torch.Tensor) else type(rhs).__name__
        raise ValueError(f"right-hand sides must be a (p, r) tensor with r >= 1, got {shape}")
    if not bool(torch.isfinite(rhs).all()):
        raise ValueError("right-hand sides contain NaN/Inf values")
    damping = torch.as_tensor(damping, dtype=F64, device=rhs.device).reshape(-1)
    if damping.numel() == 1:
        damping = damping.expand(rhs.shape[0])
    if damping.numel() != rhs.shape[0] or not bool((damping > 0).all()) or not bool(torch.isfinite(damping).all()):
        raise ValueError(f"damping must be > 0 and finite, one value or one per row ({rhs.shape[0]}), got "
                         f"{damping.numel()} values with min {float(damping.min()):.3g}")
    return rhs.to(F64), damping.contiguous()


def _residual(matvec: MatVec, damping: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(r,) relative residuals ``‖b - (H + D) x‖ / ‖b‖`` (0 for a zero column b)."""
    r = rhs - matvec(x) - damping[:, None] * x
    norm = rhs.norm(dim=0)
    return torch.where(norm > 0, r.norm(dim=0) / norm.clamp_min(torch.finfo(F64).tiny), r.norm(dim=0))


def _not_converged(method: str, residual: torch.Tensor, tol: float, steps: int, fix: str) -> SolverError:
    bad = int((residual > tol).sum())
    return SolverError(f"{method} did not converge: {bad} of {residual.numel()} right-hand sides have a relative "
                       f"residual above tol = {tol:g} after {steps} iterations (largest {float(residual.max()):.3g}); "
                       f"{fix}")


def cg(matvec: MatVec, rhs: torch.Tensor, damping: torch.Tensor | float, *, tol: float = 1e-6,
       max_iter: int = 500, precondition: MatVec | None = None) -> tuple[torch.Tensor, SolveReport]:
    """Preconditioned conjugate gradients for ``(H + D) X = B``, every column at once.

    Args:
        matvec: ``V (p, r) -> H V`` float64, H symmetric.
        rhs: B (p, r).
        damping: D's diagonal (p,) or one number, > 0.
        tol: relative residual ``‖b - (H + D) x‖ / ‖b‖`` each column must reach.
        max_iter: most products with H.
        precondition: ``R (p, r) -> M R`` with M symmetric positive definite ≈ (H + D)⁻¹, or None.

    Returns:
        (X (p, r) float64, :class:`SolveReport`); the residual is recomputed from X, not the recurrence.

    Raises:
        SolverError: a column is above ``tol`` after ``max_iter`` steps, or H + D has a direction of
            non-positive curvature (not positive definite).
    """
    rhs, damping = _checked(rhs, damping)
    apply = (lambda v: matvec(v) + damping[:, None] * v)
    pre = precondition or (lambda v: v)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = pre(r)
    p = z.clone()
    rz = (r * z).sum(0)
    norm = rhs.norm(dim=0)
    active = r.norm(dim=0) > tol * norm
    steps = 0
    while bool(active.any()) and steps < max_iter:
        Ap = apply(p)
        steps += 1
        curvature = (p * Ap).sum(0)
        if bool((curvature[active] <= 0).any()):
            raise SolverError(f"cg: H + D is not positive definite (a direction with pᵀ(H + D)p = "
                              f"{float(curvature[active].min()):.3g} <= 0 at iteration {steps}); the Hessian of a "
                              "non-convex model is indefinite: use the Gauss-Newton matrix (matrix='ggn') or more "
                              "damping")
        alpha = torch.where(active, rz / torch.where(active, curvature, torch.ones_like(curvature)),
                            torch.zeros_like(rz))
        x += alpha * p
        r -= alpha * Ap
        active = active & (r.norm(dim=0) > tol * norm)
        z = pre(r)
        rz_new = (r * z).sum(0)
        beta = torch.where(active, rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    residual = _residual(matvec, damping, rhs, x)
    if bool((residual > tol).any()):
        raise _not_converged("cg", residual, tol, steps, "raise max_iter, add damping, or fit a preconditioner "
                                                         "(EK-FAC on the same layers)")
    return x, SolveReport("cg", rhs.shape[1], steps, float(residual.max()), True,
                          {"preconditioned": precondition is not None})


def top_eigenvalue(matvec: MatVec, p: int, *, iterations: int = 50, seed: int = 0,
                   dtype: torch.dtype = F64, device: torch.device | str = "cpu") -> float:
    """Largest |eigenvalue| of the symmetric H by power iteration (``iterations`` products from a seeded start)."""
    v = torch.randn(p, 1, generator=torch.Generator().manual_seed(seed), dtype=F64).to(device, dtype)
    value = 0.0
    for _ in range(iterations):
        w = matvec(v / v.norm())
        value = float(w.norm())
        if value == 0:
            return 0.0
        v = w
    return value


def lissa(matvec: MatVec, rhs: torch.Tensor, damping: torch.Tensor | float, *, tol: float = 1e-6,
          depth: int = 5000, scale: float | None = None) -> tuple[torch.Tensor, SolveReport]:
    """LiSSA: ``X_T = (1/s) Σ_{j<=T} (I - (H + D)/s)^j B``, stopped once every column reaches ``tol``.

    Args:
        matvec, rhs, damping, tol: as for :func:`cg`.
        depth: most terms T of the series.
        scale: s > λ_max(H + D) / 2 for the series to converge; default 1.1 × λ_max(H + D).

    Returns:
        (X (p, r) float64, :class:`SolveReport` with the scale in ``detail``).

    Raises:
        SolverError: a column above ``tol`` after ``depth`` terms (the error decays as
            ``(1 - λ_min/s)^T``: raise ``depth`` or the damping), or a scale too small (the series diverges).
    """
    rhs, damping = _checked(rhs, damping)
    apply = (lambda v: matvec(v) + damping[:, None] * v)
    if scale is None:
        scale = 1.1 * top_eigenvalue(apply, rhs.shape[0], device=rhs.device)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    y = rhs.clone()
    norm = rhs.norm(dim=0).clamp_min(torch.finfo(F64).tiny)
    steps = 0
    residual = torch.full((rhs.shape[1],), math.inf, dtype=F64)
    while steps < depth:
        Ay = apply(y)
        steps += 1
        residual = (rhs - Ay / scale).norm(dim=0) / norm  # residual of x = y / s
        if bool((residual <= tol).all()) or not bool(torch.isfinite(residual).all()):
            break
        y = rhs + y - Ay / scale
    if not bool(torch.isfinite(residual).all()) or bool((residual > 1e6).any()):
        raise SolverError(f"lissa diverged (residual {float(residual.max()):.3g}): the scale s = {scale:.4g} is below "
                          "half the largest eigenvalue of H + D, or H + D is not positive definite; pass a larger "
                          "scale, or use the Gauss-Newton matrix (matrix='ggn')")
    if bool((residual > tol).any()):
        raise _not_converged("lissa", residual, tol, steps, "raise depth or the damping (the error falls as "
                                                             "(1 - λ_min/s)^T), or use cg")
    return y / scale, SolveReport("lissa", rhs.shape[1], steps, float(residual.max()), True, {"scale": scale})


def arnoldi(matvec: MatVec, rhs: torch.Tensor, damping: float, *, rank: int = 20, iterations: int | None = None,
            seed: int = 0, ritz_tol: float = 1e-6) -> tuple[torch.Tensor, SolveReport]:
    """``(U diag(e) Uᵀ + dI)⁻¹ B`` with (U, e) the ``rank`` largest-magnitude Ritz pairs of H from Arnoldi.

    Args:
        matvec: ``V (p, r) -> H V`` float64, H symmetric.
        rhs: B (p, r).
        damping: one number d > 0 (the complement of U is scaled by 1/d).
        rank: Ritz pairs kept (at most ``iterations``).
        iterations: Arnoldi steps (products with H); default min(p, 2 × rank + 10).
        seed: the random start vector's generator seed.
        ritz_tol: each kept pair must have ``‖H u - e u‖ <= ritz_tol × max|e|``.

    Returns:
        (X (p, r) float64, :class:`SolveReport`; ``detail``: the kept eigenvalues and the largest Ritz residual;
        ``residual`` is the residual against H + dI, which the truncation leaves above 0).

    Raises:
        SolverError: a kept Ritz pair did not converge (raise ``iterations``), or e + d <= 0 for a kept pair.
    """
    rhs, damping_vec = _checked(rhs, damping)
    if not bool((damping_vec == damping_vec[0]).all()):
        raise ValueError("arnoldi takes one damping value for every row (its complement is scaled by 1/d)")
    d = float(damping_vec[0])
    p = rhs.shape[0]
    iterations = min(p, 2 * rank + 10) if iterations is None else iterations
    if not 1 <= rank <= iterations <= p:
        raise ValueError(f"arnoldi needs 1 <= rank ({rank}) <= iterations ({iterations}) <= p ({p})")
    basis = torch.zeros(p, iterations + 1, dtype=F64, device=rhs.device)
    hessenberg = torch.zeros(iterations + 1, iterations, dtype=F64)
    start = torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=F64).to(rhs.device)
    basis[:, 0] = start / start.norm()
    m = iterations
    for j in range(iterations):
        w = matvec(basis[:, j : j + 1])[:, 0]
        for _ in range(2):  # Gram-Schmidt twice: orthogonal to working precision
            coefficients = basis[:, : j + 1].T @ w
            w = w - basis[:, : j + 1] @ coefficients
            hessenberg[: j + 1, j] += coefficients.cpu()
        norm = float(w.norm())
        hessenberg[j + 1, j] = norm
        if norm <= 1e-12 * float(hessenberg[: j + 1, : j + 1].abs().max()):  # invariant subspace found
            m = j + 1
            break
        basis[:, j + 1] = w / norm
    T = hessenberg[:m, :m]
    e, S = torch.linalg.eigh((T + T.T) / 2)
    keep = e.abs().argsort(descending=True)[:rank]
    e, U = e[keep], basis[:, :m] @ S[:, keep].to(rhs.device)
    ritz = float((matvec(U) - U * e.to(rhs.device)).norm(dim=0).max())
    scale = max(float(e.abs().max()), torch.finfo(F64).tiny)
    if ritz > ritz_tol * scale:
        raise SolverError(f"arnoldi: the {len(e)} kept Ritz pairs did not converge in {m} iterations (residual "
                          f"‖Hu - eu‖ = {ritz:.3g}, {ritz / scale:.3g} of the largest eigenvalue, above ritz_tol = "
                          f"{ritz_tol:g}); raise iterations or lower rank")
    if bool((e + d <= 0).any()):
        raise SolverError(f"arnoldi: a kept eigenvalue {float(e.min()):.3g} + damping {d:.3g} <= 0: H is not "
                          "positive semi-definite; use the Gauss-Newton matrix (matrix='ggn') or more damping")
    e = e.to(rhs.device)
    coefficients = U.T @ rhs
    x = U @ (coefficients / (e + d)[:, None]) + (rhs - U @ coefficients) / d
    residual = _residual(matvec, damping_vec, rhs, x)
    return x, SolveReport("arnoldi", rhs.shape[1], m, float(residual.max()), True,
                          {"rank": len(e), "eigenvalues": e.cpu().tolist(), "ritz_residual": ritz})


def dense_matrix(matvec: MatVec, p: int, *, chunk: int = 256, dtype: torch.dtype = F64,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """H (p, p) float64 from products with the identity's columns, ``chunk`` at a time, symmetrised."""
    H = torch.empty(p, p, dtype=F64, device=device)
    for start in range(0, p, chunk):
        stop = min(start + chunk, p)
        eye = torch.zeros(p, stop - start, dtype=dtype, device=device)
        eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
        H[:, start:stop] = matvec(eye).to(F64)
    return (H + H.T) / 2


def dense(matvec: MatVec, rhs: torch.Tensor, damping: torch.Tensor | float, *,
          matrix: torch.Tensor | None = None) -> tuple[torch.Tensor, SolveReport]:
    """``(H + D)⁻¹ B`` by a float64 Cholesky factorisation of the explicit H + D.

    Args:
        matvec, rhs, damping: as for :func:`cg`.
        matrix: H (p, p) when already built (:func:`dense_matrix`), else built here.

    Raises:
        SolverError: H + D is not positive definite (names its smallest eigenvalue).
    """
    rhs, damping = _checked(rhs, damping)
    H = dense_matrix(matvec, rhs.shape[0], device=rhs.device) if matrix is None else matrix.to(F64)
    A = H + torch.diag(damping)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        lowest = float(torch.linalg.eigvalsh(A)[0])
        raise SolverError(f"dense: H + D is not positive definite (smallest eigenvalue {lowest:.3g}); the Hessian of a "
                          "non-convex model is indefinite: use the Gauss-Newton matrix (matrix='ggn') or more damping")
    x = torch.cholesky_solve(rhs, L)
    r = rhs - A @ x
    residual = float((r.norm(dim=0) / rhs.norm(dim=0).clamp_min(torch.finfo(F64).tiny)).max())
    return x, SolveReport("dense", rhs.shape[1], rhs.shape[0], residual, True, {})
