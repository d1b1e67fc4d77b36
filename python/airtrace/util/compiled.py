"""A ``torch.compile``d model seen as the model it wraps (same layers, same fingerprint); imports nothing from
airtrace."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its ``_orig_mod``), else ``model``: a compiled model is the same model."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model
