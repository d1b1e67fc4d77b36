"""Per-token attribution of listed (query, training example) scores (``token_scores``), from the projected tokens a
featurize kept (``KeptTokens``) or by running the examples again; imports ``airtrace.capture``, ``airtrace.scoring``
and the other attribute modules.

The factored features of an example are a sum over its tokens: per layer
``ĝ = Σ_t g_t ⊗ a_t`` with ``a_t = A_t P_in`` and ``g_t = G_t P_out`` (the capture's
projected tokens). So a score ``q̃ · ĝ`` splits exactly into per-token parts
``s_t = Σ_layers g_tᵀ q̃_layer a_t``. Layers whose token axis is the example's sequence
(the attention mask's T, else the longest token axis of any layer) give per-token
parts; the others (a pooled classifier head, one-token inputs) give ``rest``, so that
``Σ_t s_t + rest`` is the score. For "cosine" and "relative" both are divided by the
score's denominator, computed from the same features.

The featurize pass of an EK-FAC or K-FAC fit already computes every projected token (for
the Kronecker factors); ``Attributor.featurize(..., keep_tokens=True)`` keeps them per
example in memory (:class:`KeptTokens`), so that the per-token scores of a later ``score`` need no
second forward/backward of the listed examples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from airtrace.attribute.batches import Batches, attention_mask, example_count, pairs, select_rows, to_device
from airtrace.attribute.featurizer import Featurizer
from airtrace.ops.merge_topk import NORM_EPS
from airtrace.scoring import TokenScores
from airtrace.util.progress import progress_bar

log = logging.getLogger("airtrace")

KEEP_TOKENS_BUDGET = 2**30
"""Most bytes :class:`KeptTokens` holds; past it, it lets go of everything and per-token scores run the examples
again (SmolLM2 with the demo's 42 layers, LoGra 16 x 16: about 0.2 MB per example of 30 tokens)."""

Parts = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
"""name -> [(a (B, T_call, k_in), g (B, T_call, k_out)), ...], one pair per call (``GradientCapture.token_parts``)."""


@dataclass
class TokenRow:
    """The projected tokens of one example.

    Attributes:
        tokens: name -> [(a (T, k_in), g (T, k_out)), ...]: the calls along the example's sequence, its
            unmasked tokens only.
        rest: name -> [(a (T_call, k_in), g (T_call, k_out)), ...]: the calls with another token axis.
        features: (width,) its features (float32; float64 for float64 models).
        length: its unmasked tokens (T).
        input_ids: its unmasked token ids, when its batch had ``input_ids``.
    """

    tokens: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    rest: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    features: torch.Tensor
    length: int
    input_ids: list[int] | None

    @property
    def nbytes(self) -> int:
        pairs_ = [p for calls in (*self.tokens.values(), *self.rest.values()) for p in calls]
        return self.features.nbytes + sum(a.nbytes + g.nbytes for a, g in pairs_)


def token_rows(batch: Any, parts: Parts, features: torch.Tensor) -> list[TokenRow]:
    """Split the projected tokens of one batch (on its device) into its examples' :class:`TokenRow` s.

    Args:
        batch: the batch the parts come from (its attention mask and ``input_ids`` are read).
        parts: its :data:`Parts`.
        features: (B, width) its features.
    """
    mask = attention_mask(batch)
    if mask is not None:
        T = mask.shape[1]
    else:
        T = max(a.shape[1] for calls in parts.values() for a, _ in calls)
    input_ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not (isinstance(input_ids, torch.Tensor) and tuple(input_ids.shape[:2]) == (features.shape[0], T)):
        input_ids = None
    rows = []
    for b in range(features.shape[0]):
        keep = (mask[b] != 0).to(features.device) if mask is not None else slice(None)
        tokens = {name: [(a[b][keep], g[b][keep]) for a, g in calls if a.shape[1] == T] for name, calls in parts.items()}
        rest = {name: [(a[b].clone(), g[b].clone()) for a, g in calls if a.shape[1] != T]
                for name, calls in parts.items()}
        length = int((mask[b] != 0).sum()) if mask is not None else T
        ids = None if input_ids is None else input_ids[b][keep.to(input_ids.device) if mask is not None else keep]
        rows.append(TokenRow({k: v for k, v in tokens.items() if v}, {k: v for k, v in rest.items() if v},
                             features[b].clone(), length, None if ids is None else ids.tolist()))
    return rows


class KeptTokens:
    """The :class:`TokenRow` of every example of a featurize pass, by id, within :data:`KEEP_TOKENS_BUDGET`.

    Attributes:
        rows: id -> TokenRow (empty once the budget was exceeded).
        overflowed: the budget was exceeded (nothing is kept).
    """

    def __init__(self, budget: int = KEEP_TOKENS_BUDGET):
        self.rows: dict[Any, TokenRow] = {}
        self.budget, self.nbytes, self.overflowed = budget, 0, False

    def add(self, ids: Sequence, batch: Any, parts: Parts, features: torch.Tensor) -> None:
        """Keep the examples ``ids`` of one batch (see :func:`token_rows`)."""
        if self.overflowed:
            return
        for i, row in zip(ids, token_rows(batch, parts, features)):
            self.rows[i] = row
            self.nbytes += row.nbytes
        if self.nbytes > self.budget:
            log.info("airtrace: the kept tokens passed %d bytes; per-token scores will run their examples again",
                     self.budget)
            self.rows, self.nbytes, self.overflowed = {}, 0, True


def token_scores(featurizer: Featurizer, Q: torch.Tensor, wanted: Mapping[object, list[tuple[int, int]]],
                 batches: Batches, *, metric: str, precondition: Callable[[torch.Tensor], torch.Tensor],
                 kept: KeptTokens | None = None, progress: bool = True) -> dict[tuple[int, int], TokenScores]:
    """Per-token scores of the training examples in ``wanted``, against the preconditioned queries ``Q``.

    Args:
        featurizer: the Attributor's featurizer (factored projection).
        Q: (q, width) preconditioned query features.
        wanted: train id -> [(query index, train row index), ...] to attribute token by token.
        batches: the training batches (the wanted examples that ``kept`` lacks are run again).
        metric: "inner", "cosine" or "relative".
        precondition: H⁻¹ on (rows, width) features (for the "relative" denominator).
        kept: the projected tokens of the featurize pass, when it kept them.
        progress: show a progress bar.

    Returns:
        {(query index, train row index): TokenScores}.

    Raises:
        ValueError: the dense projection (no token-level features), or a wanted id missing from ``batches``.
    """
    if featurizer.projections is None:
        raise ValueError("per-token attribution needs the factored projection (token-level features); "
                         "the dense projection has none")
    rows = {i: kept.rows[i] for i in wanted if kept is not None and i in kept.rows}
    if len(rows) < len(wanted):
        with progress_bar(example_count(batches), "per-token scores", progress) as bar:
            for ids, batch in pairs(batches, "token_batches"):
                positions = [j for j, i in enumerate(ids) if i in wanted and i not in rows]
                bar.update(len(ids))
                if positions:
                    sub = to_device(select_rows(batch, positions, len(ids)), featurizer.device)
                    rows.update(zip([ids[j] for j in positions], _run(featurizer, sub)))
    missing = [i for i in wanted if i not in rows]
    if missing:
        raise ValueError(f"token_batches lack training example {missing[0]!r} (and {len(missing) - 1} more) of the "
                         "scores; pass the batches the store was featurized from")
    blocks = featurizer.split(Q)
    order = list(rows)
    scale = _scale(metric, Q, torch.stack([rows[i].features for i in order]), precondition)
    out: dict[tuple[int, int], TokenScores] = {}
    for b, i in enumerate(order):
        tokens, rest = _row_parts(rows[i], blocks)
        for qi, row in wanted[i]:
            s = scale[qi, b]
            out[(qi, row)] = TokenScores((tokens[qi] * s).tolist(), float(rest[qi] * s), rows[i].input_ids)
    return out


def _run(featurizer: Featurizer, batch: Any) -> list[TokenRow]:
    """One forward/backward of ``batch`` (on the device) under a token-keeping capture: its examples' TokenRows."""
    with featurizer.capture(keep_tokens=True) as cap:
        featurizer.backward(batch, cap)
        features = featurizer.assemble(cap.collect())
        return token_rows(batch, cap.token_parts(), features)


def _row_parts(row: TokenRow, blocks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token parts (q, T) and the rest (q,) of one example's inner products with the query blocks."""
    dtype = row.features.dtype
    q = next(iter(blocks.values())).shape[0]
    tokens, rest = row.features.new_zeros(q, row.length), row.features.new_zeros(q)
    for name, calls in row.tokens.items():
        block = blocks[name].to(dtype)
        for a, g in calls:
            tokens += torch.einsum("to,qoi,ti->qt", g.to(dtype), block, a.to(dtype))
    for name, calls in row.rest.items():
        block = blocks[name].to(dtype)
        for a, g in calls:
            rest += torch.einsum("to,qoi,ti->q", g.to(dtype), block, a.to(dtype))
    return tokens, rest


def _scale(metric: str, Q: torch.Tensor, features: torch.Tensor,
           precondition: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(q, B) factors that turn inner-product parts into parts of the metric's score."""
    Q = Q.to(features.dtype)
    if metric == "inner":
        return features.new_ones(Q.shape[0], features.shape[0])
    if metric == "cosine":
        return 1.0 / (Q.norm(dim=1).clamp_min(NORM_EPS)[:, None] * features.norm(dim=1).clamp_min(NORM_EPS)[None])
    self_influence = (features * precondition(features).to(features.dtype)).sum(1)
    return (1.0 / self_influence.clamp_min(0).sqrt().clamp_min(NORM_EPS))[None].expand(Q.shape[0], -1)
