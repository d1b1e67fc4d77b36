"""Training-data selection from attribution scores: random, top-k, LESS and BIDS over a (n_train, q) score matrix
with one task label per query column, read from the full-matrix file block by block (memory bounded by a block and
the per-row statistics, not by n_train x q); the apps layer, imports
``airtrace.scoring`` (the file's tensor and metadata names) and ``airtrace.store`` (the train ids).

Strategies (``budget`` rows are chosen; ``S`` is the (n_train, q) score matrix, higher = the training row helps the
query more, see :mod:`airtrace.scoring`; or AirRep's, :func:`embedding_scores`):

- ``"random"``: a uniformly random subset (``torch.randperm`` under ``seed``).
- ``"topk"``: the rows of highest mean score over all queries, ``mean_j S[i, j]``.
- ``"less"``: LESS (Xia, Malladi, Gururangan, Arora, Chen, "LESS: Selecting Influential Data for Targeted
  Instruction Tuning", ICML 2024, arXiv:2402.04333): per task ``t`` the mean of the row's scores over the task's
  validation queries, ``L[i, t] = mean_{j in t} S[i, j]``; a row's score is ``max_t L[i, t]``; the highest are taken.
  The paper's scores are cosines of (Adam-preconditioned LoRA) gradient features: score with ``--metric cosine``.
- ``"bids"``: BIDS (Dai, Zhang, Ma, Peng, "Improving Influence-based Instruction Tuning Data Selection for Balanced
  Learning of Diverse Capabilities", 2025, arXiv:2501.12147). What the paper's published descriptions specify (its
  abstract, the abstract of an earlier version, and summaries of its method section; its Algorithm 1 itself was not
  readable here): (1) instance-level normalisation of the attribution matrix: every query column (one validation
  instance) is z-scored over the training rows, ``Z[i, j] = (S[i, j] - mu_j) / sigma_j``, so no task dominates
  because its scores are larger; (2) an iterative selection that at each step adds the training example with the
  highest influence on the task the currently selected data represents least. This implementation's reading of
  what those descriptions leave open: the std is the population one (a constant column becomes 0); the
  task-level influence is ``B[i, t] = mean_{j in t} Z[i, j]``; the selection ``R`` represents task ``t`` by
  ``mean_{i in R} B[i, t]``; each step takes the task of lowest representation and the unselected row of highest
  ``B[i, t]`` on it. A summary of the method writes a candidate's marginal gain as its normalised influence
  minus the selection's mean normalised influence on the same task; for a fixed task that orders the candidates
  as ``B[i, t]`` does, so the row chosen for a task is the same.

Deterministic ties: tasks are ordered by their first appearance in ``tasks``; among equal scores the lower row
index wins, among equally covered tasks the earlier task (with nothing selected yet every task is equally covered,
so BIDS starts with the first task).

Coverage (the same for every strategy, so they can be compared): per task, ``mean_normalized`` is the mean of
``B[i, t]`` over the selected rows (0 means as influential as an average training row; higher is better), and
``best`` counts the selected rows whose highest ``B[i, t]`` is on that task.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from airtrace.scoring import METADATA_KEY, SCORES

STRATEGIES = ("random", "topk", "less", "bids")
STRATEGY_DEFINITIONS = {
    "random": "a uniformly random subset (seeded)",
    "topk": "highest mean score over all queries",
    "less": "LESS: per task the mean score over its queries, each row's max over tasks, highest first",
    "bids": "BIDS: per-query z-scores, per-task means, then repeatedly the best row for the least covered task",
}
"""One line per strategy."""
ROWS_PER_BLOCK = 65536
"""Training rows :func:`select` reads from a matrix file at a time: memory ROWS_PER_BLOCK x q, beside the per-row
statistics (n_train x (1 + 2 tasks))."""
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
"""safetensors dtype names of a score matrix."""


@dataclass
class Selection:
    """What :func:`select` chose.

    Attributes:
        rows: selected train row indices, in selection order.
        tasks: the task labels, in order of first appearance.
        coverage: per task ``{"mean_normalized": float, "best": int}`` (see the module docstring).
        strategy: the strategy used.
    """

    rows: list[int]
    tasks: list
    coverage: dict
    strategy: str


def matrix_header(path: str | os.PathLike) -> tuple[int, int, dict]:
    """The shape and metadata of a full score matrix file written by ``airtrace score --full-matrix``, without
    reading the matrix.

    Args:
        path: safetensors file holding tensor "scores" of shape (q, n_train), float32 or float64.

    Returns:
        (n_train, q, the file's metadata: metric, query_ids, store, fingerprint when recorded).

    Raises:
        ValueError: naming the file: unreadable, not safetensors, no tensor "scores", not a 2-D float matrix, or
            metadata that is not JSON.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            if SCORES not in f.keys():
                raise ValueError(f"{path}: no tensor {SCORES!r}; write the matrix with airtrace score --full-matrix")
            piece = f.get_slice(SCORES)
            shape, dtype = piece.get_shape(), piece.get_dtype()
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors score matrix ({exc})") from None
    if len(shape) != 2 or dtype not in FLOAT_DTYPES:
        raise ValueError(f"{path}: tensor {SCORES!r} is {tuple(shape)} {dtype}; expected a (q, n) float "
                         "matrix as airtrace score --full-matrix writes")
    try:
        info = json.loads(meta.get(METADATA_KEY, "{}"))
    except ValueError:
        raise ValueError(f"{path}: its {METADATA_KEY} metadata is not JSON") from None
    return shape[1], shape[0], info if isinstance(info, dict) else {}


def matrix_blocks(path: str | os.PathLike, rows: int = ROWS_PER_BLOCK) -> Iterator[torch.Tensor]:
    """The training rows of a matrix file (checked by :func:`matrix_header`), ``rows`` at a time: (rows, q) float64
    blocks read as column slices of the file's (q, n_train) tensor."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        piece = f.get_slice(SCORES)
        n = piece.get_shape()[1]
        for start in range(0, n, rows):
            yield piece[:, start:start + rows].T.to(torch.float64).contiguous()


def load_matrix(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """The whole score matrix of a file written by ``airtrace score --full-matrix``, as (n_train, q) rows per
    training example (:func:`select` reads a path block by block instead).

    Returns:
        (scores (n_train, q) float64, the file's metadata, see :func:`matrix_header`).

    Raises:
        ValueError: as :func:`matrix_header`.
    """
    meta = matrix_header(path)[2]
    return torch.cat(list(matrix_blocks(path))), meta


def embedding_scores(train: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """AirRep scores of every training example for every query, ``S[i, j] = e(z_i)·e(x_j)`` (AirRep's score of a
    group of one, :mod:`airtrace.airrep.pooling`), from the embeddings ``airtrace airrep embed`` writes.

    Args:
        train: (n_train, d) float embeddings of the training examples.
        queries: (q, d) float embeddings of the validation queries.

    Returns:
        (n_train, q) float64 scores for :func:`select`.

    Raises:
        ValueError: an argument is not a non-empty 2-D float tensor, or the widths d differ.
    """
    for name, e in (("train", train), ("queries", queries)):
        if not isinstance(e, torch.Tensor) or e.ndim != 2 or not e.is_floating_point() or 0 in e.shape:
            shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"{name} embeddings must be a non-empty 2-D float tensor (rows, d), got {shape}")
    if train.shape[1] != queries.shape[1]:
        raise ValueError(f"train embeddings have d = {train.shape[1]} but queries d = {queries.shape[1]}; embed both "
                         "with the same encoder")
    return train.detach().to("cpu", torch.float64) @ queries.detach().to("cpu", torch.float64).T


def budget_rows(budget: int | float, n: int) -> int:
    """Rows a budget stands for: an int is a count in [1, n]; a float in (0, 1] a fraction of n, rounded half up,
    at least 1.

    Raises:
        ValueError: naming ``budget`` and the allowed range.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ValueError(f"budget must be a row count (int) or a fraction (float in (0, 1]), got {budget!r}")
    if isinstance(budget, (int, np.integer)):
        if not 1 <= budget <= n:
            raise ValueError(f"budget={budget} rows is outside [1, {n}] (the matrix has {n} training rows)")
        return int(budget)
    if not (math.isfinite(budget) and 0 < budget <= 1):
        raise ValueError(f"budget={budget} is not a fraction in (0, 1]; pass an int for a row count")
    return max(1, min(n, math.floor(budget * n + 0.5)))


def task_order(tasks: Sequence, q: int) -> tuple[list, torch.Tensor]:
    """The distinct task labels in order of first appearance, and each query column's task index (q,) int64.

    Raises:
        ValueError: ``tasks`` does not hold one hashable label per query column.
    """
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise ValueError(f"tasks must be a list of one task label per query column, got {type(tasks).__name__}")
    if len(tasks) != q:
        raise ValueError(f"tasks has {len(tasks)} labels but the score matrix has {q} query columns; give one label "
                         "per query, in the matrix's query order")
    labels: dict = {}
    try:
        index = [labels.setdefault(t, len(labels)) for t in tasks]
    except TypeError:
        raise ValueError("tasks must hold hashable labels (strings or numbers)") from None
    return list(labels), torch.tensor(index, dtype=torch.int64)


def task_means(S: torch.Tensor, column_task: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """Per row and task the mean over the task's query columns: (n, q) -> (n, n_tasks) float64."""
    sums = torch.zeros(S.shape[0], n_tasks, dtype=torch.float64).index_add_(1, column_task, S)
    return sums / torch.bincount(column_task, minlength=n_tasks).to(torch.float64)


@dataclass
class RowStatistics:
    """Per training row what the strategies rank by.

    Attributes:
        mean: (n,) float64 mean score over all queries (top-k).
        task_mean: (n, T) float64 mean score over each task's queries, ``L`` (LESS).
        normalized: (n, T) float64 mean z-score over each task's queries, ``B`` (BIDS and the coverage).
    """

    mean: torch.Tensor
    task_mean: torch.Tensor
    normalized: torch.Tensor


def row_statistics(blocks: Callable[[], Iterable[torch.Tensor]], column_task: torch.Tensor,
                   n_tasks: int) -> RowStatistics:
    """Two passes over the training rows: the column moments, then every row's statistics.

    Pass 1 merges the blocks' column means and sums of squared deviations (Chan, Golub, LeVeque's pairwise update:
    ``M2 = M2_a + M2_b + delta^2 n_a n_b / (n_a + n_b)``) into the population std over all rows; pass 2 z-scores
    each block's columns with them (a constant column becomes 0) and averages per task.

    Args:
        blocks: called once per pass; yields (n_b, q) float64 blocks of consecutive training rows.
        column_task: (q,) int64 task index of each query column.
        n_tasks: T.

    Raises:
        ValueError: a block holds NaN or inf (naming the first training row and query).
    """
    count, mean, m2 = 0, None, None
    for S in blocks():
        if not torch.isfinite(S).all():
            bad = (~torch.isfinite(S)).nonzero()[0].tolist()
            raise ValueError(f"scores holds NaN or inf (first at row {count + bad[0]}, query {bad[1]}); score again "
                             "or drop them")
        block_mean = S.mean(dim=0)
        block_m2 = ((S - block_mean) ** 2).sum(dim=0)
        if mean is None:
            mean, m2 = block_mean, block_m2
        else:
            delta, total = block_mean - mean, count + S.shape[0]
            mean = mean + delta * (S.shape[0] / total)
            m2 = m2 + block_m2 + delta ** 2 * (count * S.shape[0] / total)
        count += S.shape[0]
    std = (m2 / count).sqrt()
    constant = std == 0
    parts: tuple[list, list, list] = ([], [], [])
    for S in blocks():
        Z = torch.where(constant, 0.0, (S - mean) / torch.where(constant, 1.0, std))
        parts[0].append(S.mean(dim=1))
        parts[1].append(task_means(S, column_task, n_tasks))
        parts[2].append(task_means(Z, column_task, n_tasks))
    return RowStatistics(*(torch.cat(part) for part in parts))


def ranked(values: torch.Tensor) -> list[int]:
    """Row indices by descending value, the lower index first among equal values."""
    v = values.numpy()
    return np.lexsort((np.arange(v.shape[0]), -v)).tolist()


def bids_order(B: torch.Tensor, k: int) -> list[int]:
    """BIDS's iterative selection of ``k`` rows from task-level normalised influence B (n, T) float64."""
    n, n_tasks = B.shape
    by_task = [ranked(B[:, t]) for t in range(n_tasks)]
    cursor = [0] * n_tasks
    taken = np.zeros(n, dtype=bool)
    sums = np.zeros(n_tasks)
    rows: list[int] = []
    for _ in range(k):
        t = int(np.argmin(sums))  # the mean over the selection orders tasks like the sum; argmin takes the first tie
        while taken[by_task[t][cursor[t]]]:
            cursor[t] += 1
        row = by_task[t][cursor[t]]
        taken[row] = True
        rows.append(row)
        sums += B[row].numpy()
    return rows


def select(scores: torch.Tensor | str | os.PathLike, tasks: Sequence, budget: int | float,
           strategy: str = "bids", *, seed: int = 0) -> Selection:
    """Choose ``budget`` training rows by ``strategy`` (see the module docstring for each rule).

    Args:
        scores: (n_train, q) float scores (score > 0: the row helps the query), or the path of a matrix file written
            by ``airtrace score --full-matrix`` (its (q, n_train) tensor), read twice, :data:`ROWS_PER_BLOCK`
            training rows at a time, never whole.
        tasks: q task labels, one per query column.
        budget: a row count (int in [1, n_train]) or a fraction (float in (0, 1], rounded half up, at least 1).
        strategy: one of :data:`STRATEGIES`.
        seed: the random strategy's seed.

    Returns:
        :class:`Selection`: row indices in selection order and the per-task coverage.

    Raises:
        ValueError: unknown strategy, a matrix that is not 2-D / empty / holds NaN or inf, a task list whose length
            is not q, a budget out of range.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    if isinstance(scores, (str, os.PathLike)):
        n, q, _ = matrix_header(scores)
        path = scores

        def blocks() -> Iterator[torch.Tensor]:
            return matrix_blocks(path, ROWS_PER_BLOCK)
    else:
        if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or not scores.is_floating_point():
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"scores must be a 2-D float tensor (n_train, q), got {shape}")
        n, q = scores.shape
        whole = [scores.detach().to("cpu", torch.float64).contiguous()]

        def blocks() -> list[torch.Tensor]:
            return whole
    if n == 0 or q == 0:
        raise ValueError(f"scores is empty: shape ({n}, {q}); it needs training rows and query columns")
    labels, column_task = task_order(tasks, q)
    k = budget_rows(budget, n)
    stats = row_statistics(blocks, column_task, len(labels))
    B = stats.normalized
    if strategy == "random":
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist()
    elif strategy == "topk":
        rows = ranked(stats.mean)[:k]
    elif strategy == "less":
        rows = ranked(stats.task_mean.max(dim=1).values)[:k]
    else:
        rows = bids_order(B, k)
    chosen = B[rows]
    best = torch.bincount(chosen.argmax(dim=1), minlength=len(labels)).tolist()
    coverage = {str(t): {"mean_normalized": float(chosen[:, i].mean()), "best": best[i]}
                for i, t in enumerate(labels)}
    return Selection(rows, labels, coverage, strategy)
