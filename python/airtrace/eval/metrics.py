"""Attribution quality metrics against retrained models: LDS, LOO correlation, top-k removal, mislabel AUC; imports only
``airtrace.eval.subsets``.

Sign conventions: a score ``scores[i, z]`` is "higher = training example z
helps query i"; a retrained output is "higher = the query is fit better"
(negative loss or margin). Good attribution has positive LDS and LOO
correlation, a positive top-k removal effect larger than the random one, and a
mislabel AUC above 0.5.

Correlations are computed per query and averaged; a query whose scores or
outputs are constant has an undefined correlation, counted as 0. Ranks are
average ranks (ties share the mean of their positions). Everything is float64
on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from airtrace.eval.subsets import SubsetPlan, _check_int

F64 = torch.float64


def _matrix(name: str, x, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """A finite 2-D float64 CPU tensor, with the given rows / cols when set."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a 2-D torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if (rows is not None and x.shape[0] != rows) or (cols is not None and x.shape[1] != cols):
        want = f"({rows if rows is not None else '*'}, {cols if cols is not None else '*'})"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    x = x.detach().to("cpu", F64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains {int((~torch.isfinite(x)).sum())} NaN/Inf value(s)")
    return x


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based) of each column of ``x`` (n, c) -> (n, c) float64; ties share their mean rank."""
    x = x.to(F64)
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        values, order = torch.sort(x[:, c], stable=True)
        _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
        ends = torch.cumsum(counts, 0).to(F64)
        mean_rank = ends - (counts.to(F64) - 1) / 2
        out[order, c] = mean_rank[inverse]
    return out


def pearson_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each column pair of a, b (n, c) -> (c,) float64; constant columns give 0."""
    a = a.to(F64) - a.to(F64).mean(0)
    b = b.to(F64) - b.to(F64).mean(0)
    denominator = a.norm(dim=0) * b.norm(dim=0)
    r = (a * b).sum(0) / denominator
    return torch.where(denominator > 0, r, torch.zeros_like(r)).clamp(-1.0, 1.0)


def spearman_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation (Pearson of average ranks) of each column pair (n, c) -> (c,); constant gives 0."""
    return pearson_columns(ranks(a), ranks(b))


def bootstrap_ci(values: torch.Tensor, samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (q,).

    Draws ``samples`` resamples of the q values with replacement from a
    generator seeded with ``seed`` (deterministic) and returns the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of their means.

    Returns:
        (lo, hi); (nan, nan) when ``samples`` is 0.
    """
    _check_int("samples", samples, 0)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if samples == 0:
        return float("nan"), float("nan")
    values = values.to(F64).flatten()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, values.numel(), (samples, values.numel()), generator=generator)
    means = values[draws].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=F64)).tolist()
    return lo, hi


# --------------------------------------------------------------------------- LDS


def group_scores(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Predicted score of each subset for each query: ``masks @ scores.T``.

    Args:
        scores: (q, n) attribution scores.
        masks: (m, n) bool subset membership.

    Returns:
        (m, q) float64.
    """
    scores = _matrix("scores", scores)
    if not isinstance(masks, torch.Tensor) or masks.dim() != 2 or masks.shape[1] != scores.shape[1]:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks must be (m, n) with n = {scores.shape[1]} (the columns of scores), got {shape}")
    return masks.to(F64) @ scores.T


@dataclass(frozen=True)
class LDSResult:
    """Linear datamodeling score.

    Attributes:
        mean: average over queries of the per-query Spearman correlation.
        per_query: (q,) float64 Spearman correlation per query (0 where undefined).
        ci: bootstrap confidence interval (lo, hi) of ``mean`` over queries.
    """

    mean: float
    per_query: torch.Tensor
    ci: tuple[float, float]


def lds(scores: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor, bootstrap: int = 1000,
        seed: int = 0, level: float = 0.95) -> LDSResult:
    """Linear datamodeling score: per query, Spearman(group scores, retrained outputs) across subsets.

    Args:
        scores: (q, n) attribution scores (higher = helps the query).
        masks: (m, n) bool subsets the models were retrained on.
        outputs: (m, q) retrained outputs (higher = the query is fit better).
        bootstrap: resamples of the queries for the confidence interval (0: none, ci = (nan, nan)).
        seed: bootstrap generator seed.
        level: confidence level of the interval.

    Returns:
        :class:`LDSResult`.

    Raises:
        ValueError: mismatched shapes or NaN/Inf.
    """
    predicted = group_scores(scores, masks)
    outputs = _matrix("outputs", outputs, rows=masks.shape[0], cols=scores.shape[0])
    per_query = spearman_columns(predicted, outputs)
    return LDSResult(float(per_query.mean()), per_query, bootstrap_ci(per_query, bootstrap, seed, level))


# --------------------------------------------------------------------------- LOO


def loo_correlation(predicted: torch.Tensor, actual: torch.Tensor) -> dict[str, float]:
    """Correlation between predicted and true leave-one-out effects, per query, averaged.

    Args:
        predicted: (q, n) predicted effect of removing each example (an attribution score).
        actual: (q, n) true effect ``full - removed`` from :func:`airtrace.eval.leave_one_out`
            (its ``removed`` is (n, q): pass ``full[None, :] - removed.T``).

    Returns:
        ``{"pearson": float, "spearman": float}``, each the mean over queries (0 where undefined).
    """
    predicted = _matrix("predicted", predicted)
    actual = _matrix("actual", actual, rows=predicted.shape[0], cols=predicted.shape[1])
    return {"pearson": float(pearson_columns(predicted.T, actual.T).mean()),
            "spearman": float(spearman_columns(predicted.T, actual.T).mean())}


# --------------------------------------------------------------------------- mislabel detection


def mislabel_auc(self_influence: torch.Tensor, flipped: torch.Tensor) -> float:
    """ROC AUC of ranking flipped-label examples first by self-influence (Mann-Whitney U / (P N), ties 1/2).

    Args:
        self_influence: (n,) scores, higher = more suspicious.
        flipped: (n,) bool, True for the examples whose label was flipped.

    Returns:
        AUC in [0, 1]: the probability that a flipped example outscores a clean one.

    Raises:
        ValueError: shapes differ, NaN/Inf, or flipped has no True or no False entry.
    """
    if not isinstance(flipped, torch.Tensor) or flipped.dtype != torch.bool or flipped.dim() != 1:
        raise ValueError(f"flipped must be a (n,) bool tensor, got {getattr(flipped, 'shape', type(flipped))}")
    scores = _matrix("self_influence", self_influence.reshape(-1, 1) if isinstance(self_influence, torch.Tensor)
                     else self_influence, rows=flipped.numel())
    positives = int(flipped.sum())
    negatives = flipped.numel() - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"flipped must mark some but not all examples, got {positives} of {flipped.numel()}")
    rank_sum = float(ranks(scores)[flipped.cpu(), 0].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


# --------------------------------------------------------------------------- top-k removal


def topk_removal_plan(scores: torch.Tensor, k: int, seed: int = 0, train_seed: int = 0) -> SubsetPlan:
    """Retraining plan for top-k removal: per query, drop its k top proponents, or k random examples.

    Args:
        scores: (q, n) attribution scores.
        k: examples removed per query, 1 <= k < n.
        seed: generator seed of the random removals.
        train_seed: training seed of every model (the same as the full model's, so only the data differ).

    Returns:
        A plan of 2q subsets: row i drops the k highest-scoring examples of query i,
        row q + i drops k examples drawn at random (without replacement) for query i.
    """
    scores = _matrix("scores", scores)
    q, n = scores.shape
    _check_int("k", k, 1)
    if k >= n:
        raise ValueError(f"k must be smaller than the {n} training examples, got {k}")
    _check_int("seed", seed, 0)
    masks = torch.ones(2 * q, n, dtype=torch.bool)
    top = torch.topk(scores, k, dim=1).indices
    generator = torch.Generator().manual_seed(seed)
    for i in range(q):
        masks[i, top[i]] = False
        masks[q + i, torch.randperm(n, generator=generator)[:k]] = False
    return SubsetPlan(masks, [train_seed] * (2 * q))


@dataclass(frozen=True)
class TopKRemoval:
    """Effect on each query of removing its top-k proponents vs k random examples.

    Attributes:
        topk: (q,) float64 ``full - output without the query's top-k proponents`` (higher = the
            removed examples mattered more).
        random: (q,) float64 the same for k random examples.
        mean_topk: mean of ``topk``.
        mean_random: mean of ``random``.
    """

    topk: torch.Tensor
    random: torch.Tensor
    mean_topk: float
    mean_random: float


def topk_removal(full: torch.Tensor, outputs: torch.Tensor) -> TopKRemoval:
    """Changes in each query's output from the models of :func:`topk_removal_plan`.

    Args:
        full: (q,) outputs of the model trained on every example (same seed).
        outputs: (2q, q) outputs of the plan's models (:func:`airtrace.eval.retrain`).

    Returns:
        :class:`TopKRemoval`; query i reads its own column from rows i and q + i.
    """
    if not isinstance(full, torch.Tensor) or full.dim() != 1:
        raise ValueError(f"full must be a (q,) tensor, got {getattr(full, 'shape', type(full))}")
    q = full.numel()
    outputs = _matrix("outputs", outputs, rows=2 * q, cols=q)
    full = _matrix("full", full.reshape(1, -1))[0]
    diag = torch.arange(q)
    topk = full - outputs[diag, diag]
    random = full - outputs[q + diag, diag]
    return TopKRemoval(topk, random, float(topk.mean()), float(random.mean()))
