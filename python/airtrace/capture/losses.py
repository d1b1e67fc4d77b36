"""Per-example losses for the capture (``per_example_loss``, ``response_labels``): sums, never batch means; imports
nothing from airtrace."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, task: str = "classification", *,
                     reduction: str = "sum") -> torch.Tensor:
    """Per-example losses; ``.sum()`` them before ``backward()`` for the capture.

    Args:
        logits: (B, C) for "classification"; (B, T, V) for "causal_lm".
        labels: (B,) int64 classes; or (B, T) int64 token ids with -100 for
            ignored tokens (prompt, padding), as in Hugging Face causal LMs.
        task: "classification" (cross-entropy) or "causal_lm" (token ``t+1`` is
            predicted from position ``t``).
        reduction: how "causal_lm" combines an example's token losses (its non-ignored
            tokens): "sum" (default: the example's negative log-likelihood, so a long
            answer weighs more; the gradient of what training on it sums), or "mean"
            (the average per token, what a Hugging Face model's ``outputs.loss`` reports
            for a batch of one; an example without tokens gets 0).

    Returns:
        (B,) losses, float32 (float64 for float64 logits).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if task == "classification":
        return F.cross_entropy(logits, labels, reduction="none")
    if task == "causal_lm":
        shifted, targets = logits[:, :-1], labels[:, 1:]
        losses = F.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        if reduction == "mean":
            return losses.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp_min(1).to(losses.dtype)
        return losses.sum(dim=1)
    raise ValueError(f"task must be 'classification' or 'causal_lm', got {task!r}")


def response_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """Causal-LM labels where only response tokens count (instruction tuning).

    Args:
        input_ids: (B, T) int64 prompt+response tokens, right-padded.
        attention_mask: (B, T), 0 at padding.
        prompt_lengths: (B,) number of prompt tokens per example.

    Returns:
        (B, T) int64 copy of ``input_ids`` with -100 on prompt and padding tokens.
    """
    lengths = torch.as_tensor(prompt_lengths, device=input_ids.device)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    ignored = (positions[None, :] < lengths[:, None]) | (attention_mask == 0)
    return input_ids.masked_fill(ignored, IGNORE_INDEX)
