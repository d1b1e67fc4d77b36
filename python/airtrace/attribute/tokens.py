"""Per-token attribution of listed (query, training example) scores: the examples are run again, token by token
(``token_scores``); imports ``airtrace.capture``, ``airtrace.scoring`` and the other attribute modules.

The factored features of an example are a sum over its tokens: per layer
``ĝ = Σ_t g_t ⊗ a_t`` with ``a_t = A_t P_in`` and ``g_t = G_t P_out`` (the capture's
projected tokens). So a score ``q̃ · ĝ`` splits exactly into per-token parts
``s_t = Σ_layers g_tᵀ q̃_layer a_t``. Layers whose token axis is the example's sequence
(the attention mask's T, else the longest token axis of any layer) give per-token
parts; the others (a pooled classifier head, one-token inputs) give ``rest``, so that
``Σ_t s_t + rest`` is the score. For "cosine" and "relative" both are divided by the
score's denominator, computed from the same recomputed features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from airtrace.attribute.batches import Batches, attention_mask, example_count, pairs, select_rows, to_device
from airtrace.attribute.featurizer import Featurizer
from airtrace.ops.merge_topk import NORM_EPS
from airtrace.scoring import TokenScores
from airtrace.util.progress import progress_bar


def token_scores(featurizer: Featurizer, Q: torch.Tensor, wanted: Mapping[object, list[tuple[int, int]]],
                 batches: Batches, *, metric: str, precondition: Callable[[torch.Tensor], torch.Tensor],
                 progress: bool = True) -> dict[tuple[int, int], TokenScores]:
    """Per-token scores of the training examples in ``wanted``, against the preconditioned queries ``Q``.

    Args:
        featurizer: the Attributor's featurizer (factored projection).
        Q: (q, width) preconditioned query features.
        wanted: train id -> [(query index, train row index), ...] to attribute token by token.
        batches: the training batches (only the wanted examples are run again).
        metric: "inner", "cosine" or "relative".
        precondition: H⁻¹ on (rows, width) features (for the "relative" denominator).
        progress: show a progress bar.

    Returns:
        {(query index, train row index): TokenScores}.

    Raises:
        ValueError: the dense projection (no token-level features), or a wanted id missing from ``batches``.
    """
    if featurizer.projections is None:
        raise ValueError("per-token attribution needs the factored projection (token-level features); "
                         "the dense projection has none")
    blocks = featurizer.split(Q)
    out: dict[tuple[int, int], TokenScores] = {}
    seen = set()
    with progress_bar(example_count(batches), "per-token scores", progress) as bar:
        for ids, batch in pairs(batches, "token_batches"):
            positions = [j for j, i in enumerate(ids) if i in wanted and i not in seen]
            bar.update(len(ids))
            if not positions:
                continue
            sub = to_device(select_rows(batch, positions, len(ids)), featurizer.device)
            tokens, rest, features = _split(featurizer, sub, blocks)
            scale = _scale(metric, Q, features, precondition)
            mask = attention_mask(sub)
            input_ids = sub.get("input_ids") if isinstance(sub, Mapping) else None
            for b, j in enumerate(positions):
                seen.add(ids[j])
                keep = slice(None) if mask is None or tokens.shape[2] != mask.shape[1] else mask[b] != 0
                token_ids = None
                if isinstance(input_ids, torch.Tensor) and input_ids.shape[:2] == (len(positions), tokens.shape[2]):
                    token_ids = input_ids[b][keep].tolist()
                for qi, row in wanted[ids[j]]:
                    s = scale[qi, b]
                    out[(qi, row)] = TokenScores((tokens[qi, b][keep] * s).tolist(), float(rest[qi, b] * s), token_ids)
    missing = [i for i in wanted if i not in seen]
    if missing:
        raise ValueError(f"token_batches lack training example {missing[0]!r} (and {len(missing) - 1} more) of the "
                         "scores; pass the batches the store was featurized from")
    return out


def _split(featurizer: Featurizer, batch, blocks: dict[str, torch.Tensor]):
    """One pass over ``batch``: per-token parts (q, B, T), the rest (q, B) and the features (B, width)."""
    with featurizer.capture(keep_tokens=True) as cap:
        featurizer.backward(batch, cap)
        features = featurizer.assemble(cap.collect())
        parts = cap.token_parts()
    mask = attention_mask(batch)
    T = mask.shape[1] if mask is not None else max(a.shape[1] for calls in parts.values() for a, _ in calls)
    q, B = next(iter(blocks.values())).shape[0], features.shape[0]
    tokens = features.new_zeros(q, B, T)
    rest = features.new_zeros(q, B)
    for name, calls in parts.items():
        block = blocks[name].to(features.dtype)
        for a, g in calls:
            c = torch.einsum("bto,qoi,bti->qbt", g.to(block.dtype), block, a.to(block.dtype))
            if c.shape[2] == T:
                tokens += c
            else:
                rest += c.sum(2)
    return tokens, rest, features


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
