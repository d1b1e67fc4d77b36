"""Per-example losses for the capture (``per_example_loss``, ``causal_lm_losses``, ``response_labels``): sums, never
batch means; imports nothing from airtrace."""

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


def causal_lm_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, reduction: str = "sum") -> torch.Tensor:
    """Per-example causal-LM losses of a Hugging Face-style model, with logits only where a label is predicted.

    The same losses as ``per_example_loss(model(...).logits, batch["labels"], "causal_lm")``,
    but the output layer (``model.get_output_embeddings()``) runs only on the hidden states of
    positions whose next token carries a label: a forward pre-hook gathers them, per row, before
    the vocabulary projection (for a small model the largest layer, at every position). When the
    output layer's weight requires grad (tracked by a capture, or trained), or the model has no
    output-embedding module that it calls, every position's logits are computed as usual.

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=...)`` that returns
            ``.logits`` (B, T, V) (or the tensor itself).
        batch: ``input_ids`` (B, T) int64, ``labels`` (B, T) int64 with -100 on ignored tokens,
            optional ``attention_mask`` (B, T).
        reduction: "sum" or "mean" over each example's labelled tokens, as in :func:`per_example_loss`.

    Returns:
        (B,) losses, float32 (float64 for float64 logits).

    Raises:
        ValueError: a model that runs its output layer more than once per forward, or reshapes its
            output into logits that are not (B, positions, V).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    labels = batch["labels"]
    kwargs = {"attention_mask": batch.get("attention_mask")}
    if hasattr(getattr(model, "config", None), "use_cache"):
        kwargs["use_cache"] = False  # no key/value cache: nothing is generated
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if head is None or (isinstance(weight, torch.Tensor) and weight.requires_grad):
        return per_example_loss(_logits(model(input_ids=batch["input_ids"], **kwargs)), labels, "causal_lm",
                                reduction=reduction)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    counts = keep.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    # per row, the positions t whose token t + 1 is labelled, first and in order; then filler
    positions = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    calls = []  # per call of the output layer: whether its input was gathered

    def gather(module, args):
        hidden = args[0]
        calls.append(not calls and hidden.shape[:2] == labels.shape[:2])
        if not calls[-1]:
            return None
        index = positions.to(hidden.device)[:, :, None].expand(-1, -1, hidden.shape[-1])
        return (hidden.gather(1, index), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        logits = _logits(model(input_ids=batch["input_ids"], **kwargs))
    finally:
        handle.remove()
    if len(calls) > 1:
        raise ValueError(f"causal_lm_losses: the model ran its output layer {len(calls)} times in one forward, so the "
                         "logits of the labelled positions cannot be told apart; use per_example_loss(model(...)"
                         ".logits, labels, 'causal_lm')")
    if calls != [True]:  # the output layer was not called on (B, T, d) hidden states: the model's own logits
        return per_example_loss(logits, labels, "causal_lm", reduction=reduction)
    if tuple(logits.shape[:2]) != tuple(positions.shape):
        raise ValueError(f"causal_lm_losses: the model turned the output layer's {tuple(positions.shape)} positions "
                         f"into logits of shape {tuple(logits.shape)}; use per_example_loss(model(...).logits, labels, "
                         "'causal_lm')")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    valid = torch.arange(width, device=labels.device)[None] < counts[:, None]
    wanted = targets.gather(1, positions).masked_fill(~valid, IGNORE_INDEX)
    losses = F.cross_entropy(logits.transpose(1, 2), wanted.to(logits.device), ignore_index=IGNORE_INDEX,
                             reduction="none").sum(1)
    if reduction == "mean":
        return losses / counts.to(losses.device).clamp_min(1).to(losses.dtype)
    return losses


def _logits(output) -> torch.Tensor:
    """A model output's logits: ``.logits``, or the output itself."""
    return output if isinstance(output, torch.Tensor) else output.logits


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
