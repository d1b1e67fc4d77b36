"""The error bound every backend of every op is judged by against the float64 reference (the tests and
``airtrace selfcheck`` both use it); imports the ops' references, ``airtrace.ops.hash`` and
``airtrace.ops.merge_topk``.

Every sum an op computes in fp32 gets the fp32-accumulation bound, per element::

    |computed - exact| <= EPS32 * (C_DOT * sqrt(K) + c0) * (|a| . |b|)

and the op's result is compared with ``ref64``, its float64 reference computed from the *same rounded
inputs*: each input as the backends receive it (cast to the test dtype, and to float32 where the op
casts it), only then cast to float64, so input rounding is not counted as kernel error.

- ``(|a| . |b|)`` is the same contraction over absolute values; K is the sum's length.
- ``C_DOT = 4``: Higham & Mary (SIAM J. Sci. Comput. 2019, Thm 3.1) bound the error of an fp32
  inner product of K terms, under the model of independent mean-zero roundings, by
  ``lam sqrt(K) u (|a| . |b|)`` with probability >= 1 - 2 K exp(-lam^2 / 2), u = EPS32 / 2;
  lam = 8 puts the failure probability below 3e-14 K per element, hence C_DOT = lam / 2. (The
  deterministic worst case, K u, needs every rounding to fall one way: not round-to-nearest.)
- ``c0`` counts the roundings outside the sums, per op (see each function): the float32 store of
  a scale or a partial sum, a division, and Triton's ``tf32x3`` products on a GPU, whose split
  operands drop at most 3 * 2^-22 = 1.5 EPS32 of each product (TF32X3 per product stage).
- An op that chains stages (project_factored, precondition, group_pool_scores) bounds each stage
  so, with the exact float64 operands of that stage, and carries the stage's error to the result
  through the later stages' coefficients W by root-sum-square, ``sqrt(W^2 . bound^2)``: under the
  same model the errors of a stage's elements are independent and of random sign, so a rotation
  or a sum over tokens grows them like a random walk (an absolute-value chain would charge an
  orthonormal k x k rotation sqrt(k) times too much). Stages add up by the triangle inequality.

Every op returns float32 for float32/bfloat16/float16 inputs, so no term for rounding the output
to a 16-bit dtype appears: that rounding (``EPS16 / 2 * |ref|``) is a bug the bound rejects, as are
16-bit intermediates and 16-bit projection matrices (tests/test_bounds.py builds each and checks
that it fails). A bound of this form cannot see them on very long sums: its sqrt(K) (|a| . |b|)
grows like K^1.5 for random data while a result grows like sqrt(K), so a 16-bit rounding of the
result stays below it once one sum holds about 2e4 (bfloat16) or 3e3 (float16) terms (measured on
project_dense: p = 300 is caught with 90x / 10x margin, p = 20000 is not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from airtrace.ops import group_pool_scores as _pool
from airtrace.ops import precondition as _precondition
from airtrace.ops import project_factored as _factored
from airtrace.ops.hash import dense_entries
from airtrace.ops.merge_topk import NORM_EPS

EPS32 = torch.finfo(torch.float32).eps  # 2^-23
C_DOT = 4.0
TF32X3 = 1.5
F64 = torch.float64


@dataclass(frozen=True)
class Expected:
    """The float64 reference of one op call and the allowed error of each element.

    Attributes:
        reference: float64 tensor, the op's result computed from the rounded inputs, on the inputs' device.
        bound: float64 tensor of the same shape and device, ``>= 0``.
    """

    reference: torch.Tensor
    bound: torch.Tensor


def _seen(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``t`` as a backend receives it (cast to ``dtype`` first when the op casts it), in float64 on its device."""
    if t is None:
        return None
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    return t.to(F64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else torch.float32


def _sum_bound(K: int | torch.Tensor, c0: float) -> float | torch.Tensor:
    """EPS32 (C_DOT sqrt(K) + c0): times (|a| . |b|), the bound of one fp32 sum of K terms."""
    root = K.to(F64).sqrt() if isinstance(K, torch.Tensor) else math.sqrt(K)
    return EPS32 * (C_DOT * root + c0)


def excess(actual: torch.Tensor, expected: Expected) -> float:
    """max |actual - reference| / bound over the elements (<= 1: within the bound; inf: an error where the bound is 0).

    Raises:
        ValueError: ``actual`` does not have the reference's shape.
    """
    actual = actual.detach().to(expected.reference.device, F64)
    if tuple(actual.shape) != tuple(expected.reference.shape):
        raise ValueError(f"result has shape {tuple(actual.shape)}, the reference {tuple(expected.reference.shape)}")
    if actual.numel() == 0:
        return 0.0
    error = (actual - expected.reference).abs()
    error = torch.where(torch.isnan(error), torch.inf, error)
    ratio = torch.where(expected.bound > 0, error / expected.bound.clamp_min(1e-300), error * torch.inf)
    return float(torch.nan_to_num(ratio, nan=0.0).max())


def project_factored(
    A: torch.Tensor, G: torch.Tensor, P_in: torch.Tensor, P_out: torch.Tensor, mask: torch.Tensor | None = None
) -> Expected:
    """Reference and bound of ``project_factored(A, G, P_in, P_out, mask)``, (B, k_out, k_in).

    Stages: a = A P_in (K = d_in, c0 = TF32X3) and g = m (G P_out) (K = d_out, c0 = TF32X3 + 0.5
    for the mask product), carried through ``out = g^T a`` by root-sum-square over the tokens;
    then the sum over tokens (K = T, c0 = TF32X3 + 0.5 for the float32 partial sums of token
    splits and threads).
    """
    acc = _acc(A.dtype)
    A64, G64, Pi, Po, m = _seen(A), _seen(G), _seen(P_in, acc), _seen(P_out, acc), _seen(mask, acc)
    weight = torch.ones(A64.shape[:2], dtype=F64, device=A64.device) if m is None else m
    a, g = A64 @ Pi, (G64 @ Po) * weight[:, :, None]  # (B, T, k_in), (B, T, k_out)
    err_a = _sum_bound(A64.shape[2], TF32X3) * (A64.abs() @ Pi.abs())
    err_g = _sum_bound(G64.shape[2], TF32X3 + 0.5) * (G64.abs() @ Po.abs()) * weight.abs()[:, :, None]
    carried = ((g**2).transpose(1, 2) @ err_a**2).sqrt() + ((err_g**2).transpose(1, 2) @ a**2).sqrt()
    tokens = _sum_bound(A64.shape[1], TF32X3 + 0.5) * (g.abs().transpose(1, 2) @ a.abs())
    return Expected(_factored.reference(A64, G64, Pi, Po, m), carried + tokens)


# |error| of a Gaussian entry r cos(theta) / sqrt(k) generated in float32 (r = sqrt(-2 ln u1) <= sqrt(48 ln 2)
# = 5.77 for u1 >= 2^-24): theta = 2 pi u2 carries an absolute error <= 2 pi EPS32 and cos/sin add <= 1 EPS32,
# so <= (2 pi + 1) 5.77 = 42 EPS32 / sqrt(k) absolutely; ln, sqrt and the products add <= 3 EPS32 relatively.
# Measured on every backend (k = 7, 64, 1000): at most 15 EPS32 / sqrt(k).
GAUSSIAN_ABSOLUTE = 42.0
GAUSSIAN_RELATIVE = 3.0


def project_dense(
    X: torch.Tensor, k: int, seed: int, kind: str = "rademacher", row_offset: int = 0, rows_per_chunk: int = 4096
) -> Expected:
    """Reference and bound of ``project_dense(X, k, seed, kind, row_offset=row_offset)``, (B, k).

    One sum (K = p, c0 = TF32X3 + 1 for the float32 1/sqrt(k) scale that every entry shares and
    + 1 for the float32 partial sums over row splits) against entries the backends generate in
    float32: a Rademacher entry is exact up to that scale; a Gaussian one is within
    ``GAUSSIAN_RELATIVE |R| + GAUSSIAN_ABSOLUTE / sqrt(k)`` EPS32 of the float64 entry, each entry's
    own error carried to the result by root-sum-square over the p rows.
    """
    X64 = _seen(X)
    B, p = X64.shape
    reference, absolute, entries = (torch.zeros(B, k, dtype=F64, device=X64.device) for _ in range(3))
    for start in range(0, p, rows_per_chunk):
        stop = min(start + rows_per_chunk, p)
        R = dense_entries(torch.arange(row_offset + start, row_offset + stop), k, seed, kind).to(X64.device)
        reference += X64[:, start:stop] @ R
        absolute += X64[:, start:stop].abs() @ R.abs()
        if kind == "gaussian":
            entry = EPS32 * (GAUSSIAN_RELATIVE * R.abs() + GAUSSIAN_ABSOLUTE / math.sqrt(k))
            entries += X64[:, start:stop] ** 2 @ entry**2
    return Expected(reference, _sum_bound(p, TF32X3 + 2.0) * absolute + entries.sqrt())


def scores(Q: torch.Tensor, X: torch.Tensor, normalize: bool = False) -> Expected:
    """Reference and bound of every score ``s[i, j] = Q_i . X_j`` (cosine if ``normalize``) that score_topk ranks, (q, n).

    One sum (K = k, c0 = TF32X3). A cosine also divides by the norms of Q_i and X_j, sums of k
    squares (positive terms, each within C_DOT sqrt(k) EPS32 relatively, half of it after the
    square root), plus two square roots and the divisions (c0 = 2): ``(C_DOT sqrt(k) + 2) |s|``.
    """
    acc = _acc(torch.promote_types(Q.dtype, X.dtype))
    Q64, X64 = _seen(Q, acc), _seen(X)
    if normalize:
        Q64 = Q64 / Q64.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        X64 = X64 / X64.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    k = Q.shape[1]
    s = Q64 @ X64.T
    bound = _sum_bound(k, TF32X3) * (Q64.abs() @ X64.abs().T)
    if normalize:
        bound = bound + _sum_bound(k, 2.0) * s.abs()
    return Expected(s, bound)


def topk_excess(values: torch.Tensor, indices: torch.Tensor, expected: Expected, index_offset: int = 0) -> float:
    """How far a ``score_topk`` result is from a true top-k of ``expected`` (:func:`scores`), in units of the bound.

    The largest of: |value - s[i, j]| / bound[i, j] at the returned j, and, for a returned j,
    (s_kth - s[i, j]) / (bound[i, j] + max_j' bound[i, j']), s_kth the true k-th best score
    (> 1: j cannot be in the top-k of any scores within the bound). A malformed result
    (an index out of range or repeated, padding where rows remain or rows where padding
    belongs, values not sorted descending) gives inf.
    """
    s, bound = expected.reference, expected.bound
    values = values.detach().to(s.device, F64)
    indices = indices.detach().to(s.device)
    q, n = s.shape
    if values.shape != indices.shape or values.dim() != 2 or values.shape[0] != q:
        return math.inf
    filled = min(values.shape[1], n)
    local = indices[:, :filled] - index_offset
    padding_ok = bool(torch.all(indices[:, filled:] == -1)) and bool(torch.all(values[:, filled:] == -math.inf))
    in_range = bool(torch.all((local >= 0) & (local < n)))
    if not (padding_ok and in_range) or any(len(set(row.tolist())) != filled for row in local):
        return math.inf
    if not bool(torch.all(values[:, :filled].diff(dim=1) <= 0)):
        return math.inf
    if filled == 0:
        return 0.0
    true, b = s.gather(1, local), bound.gather(1, local)
    value_excess = excess(values[:, :filled], Expected(true, b))
    kth = s.topk(filled, dim=1).values[:, -1:]
    slack = b + bound.max(dim=1, keepdim=True).values
    shortfall = (kth - true).clamp_min(0)
    rank_excess = torch.where(slack > 0, shortfall / slack.clamp_min(1e-300), shortfall * math.inf)
    return max(value_excess, float(torch.nan_to_num(rank_excess, nan=0.0).max()))


def precondition(
    G_hat: torch.Tensor, Q_G: torch.Tensor, Q_A: torch.Tensor, Lam: torch.Tensor, damping: float
) -> Expected:
    """Reference and bound of ``precondition(G_hat, Q_G, Q_A, Lam, damping)``, (B, k_out, k_in).

    Stages: R1 = Q_G^T Ĝ (K = k_out), R2 = R1 Q_A (K = k_in), S = R2 / (Lam + damping) (1.5 EPS32:
    damping rounded to float32, the addition, the division), O1 = Q_G S (K = k_out), out = O1 Q_A^T
    (K = k_in); every product has c0 = TF32X3. Each stage's error reaches the result through the
    later rotations (and 1 / (Lam + damping)) by root-sum-square.
    """
    acc = _acc(G_hat.dtype)
    G64, QG, QA, L = _seen(G_hat), _seen(Q_G, acc), _seen(Q_A, acc), _seen(Lam, acc)
    _, k_out, k_in = G64.shape
    D = L + damping
    R1 = QG.T @ G64
    S = (R1 @ QA) / D
    O1 = QG @ S
    out_sum, in_sum = _sum_bound(k_out, TF32X3), _sum_bound(k_in, TF32X3)
    QG2, QA2 = QG**2, QA**2

    def rotate(err2: torch.Tensor, divide: bool) -> torch.Tensor:
        """sqrt((Q_G^2 (err^2 [/ D^2]) Q_A^2^T)): a squared S-stage error carried through the last two products."""
        return (QG2 @ (err2 / D**2 if divide else err2) @ QA2.T).sqrt()

    bound = (
        rotate((out_sum * (QG.abs().T @ G64.abs()))**2 @ QA2, divide=True)
        + rotate((in_sum * (R1.abs() @ QA.abs()))**2, divide=True)
        + rotate((1.5 * EPS32 * S.abs())**2, divide=False)
        + ((out_sum * (QG.abs() @ S.abs()))**2 @ QA2.T).sqrt()
        + in_sum * (O1.abs() @ QA.abs().T)
    )
    return Expected(_precondition.reference(G64, QG, QA, L, damping), bound)


def group_pool_scores(
    queries: torch.Tensor, train: torch.Tensor, offsets: torch.Tensor, members: torch.Tensor, tile: int = 8192
) -> Expected:
    """Reference and bound of ``group_pool_scores(queries, train, offsets, members)``, (q, G).

    ``f = sum_j a_j s_j`` with ``a = softmax(|s|)`` over a group's m members. Stages:

    - the member scores s_j (K = d, c0 = TF32X3), carried to f by root-sum-square with the
      weights ``df/ds_j = a_j (1 + sign(s_j) (s_j - f))``;
    - each softmax weight's own relative error, <= (z_j / 2 + 2) EPS32 for z_j = peak - |s_j|
      (rounding of the subtraction, exp within 2 ulp), which moves f by a_j (s_j - f) per unit,
      root-sum-square over the members;
    - the sums of e_j = exp(|s_j| - peak) and e_j s_j over the m members (K = m, c0 = 0.5), which
      move f = num / den by at most twice that bound times ``sum_j a_j |s_j|``, and the division
      (0.5 EPS32 |f|).
    """
    acc = _acc(torch.promote_types(queries.dtype, train.dtype))
    Q64, X64 = _seen(queries, acc), _seen(train)
    device = Q64.device
    offsets, members = offsets.detach().to(device, torch.int64), members.detach().to(device, torch.int64)
    q, G = Q64.shape[0], offsets.numel() - 1
    sizes = offsets.diff()
    group_of = torch.repeat_interleave(torch.arange(G, device=device), sizes)
    reference = _pool.reference(Q64, X64, offsets, members, tile)
    carried, mass = torch.zeros(q, G, dtype=F64, device=device), torch.zeros(q, G, dtype=F64, device=device)
    score_sum = _sum_bound(Q64.shape[1], TF32X3)
    bounds = offsets.tolist()
    for g0, g1 in _pool._group_tiles(bounds, tile):
        p0, p1 = bounds[g0], bounds[g1]
        if p0 == p1:
            continue
        rows = X64[members[p0:p1]]
        s = Q64 @ rows.T  # (q, m)
        segment = (group_of[p0:p1] - g0).expand(q, -1)

        def group_sum(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(q, g1 - g0, dtype=F64, device=device).scatter_add_(1, segment, values)

        a = s.abs()
        peak = torch.full((q, g1 - g0), -math.inf, dtype=F64, device=device).scatter_reduce(1, segment, a,
                                                                                               reduce="amax")
        z = peak.gather(1, segment) - a
        e = torch.exp(-z)
        weight = e / group_sum(e).gather(1, segment)
        gap = s - group_sum(weight * s).gather(1, segment)
        err_s = score_sum * (Q64.abs() @ rows.abs().T)
        err_w = EPS32 * (z / 2 + 2)
        carried[:, g0:g1] = group_sum((weight * (1 + a.sign() * gap) * err_s) ** 2 + (weight * err_w * gap) ** 2)
        mass[:, g0:g1] = group_sum(weight * a)
    bound = carried.sqrt() + 2 * _sum_bound(sizes[None, :], 0.5) * mass + 0.5 * EPS32 * reference.abs()
    return Expected(reference, bound)
