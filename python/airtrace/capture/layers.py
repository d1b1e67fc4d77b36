"""Which layers of a model are tracked (``LayerSpec``, ``select_layers``), each seen as a linear map with a (d_out,
d_in) weight; imports nothing from airtrace."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """One tracked layer, seen as a linear map with a (d_out, d_in) weight.

    Attributes:
        name: module name in ``model.named_modules()``.
        kind: "linear", "conv1d" (transformers' GPT-2 style), "conv2d" or "embedding".
        d_in: input features (C_in*kh*kw for conv2d, num_embeddings for embedding),
            plus one when ``bias`` is True.
        d_out: output features (C_out for conv2d, embedding_dim for embedding).
        bias: whether the inputs are augmented with a ones column (bias gradient).
    """

    name: str
    kind: str
    d_in: int
    d_out: int
    bias: bool = False


def layer_kind(module: nn.Module) -> str | None:
    """"linear", "conv1d", "conv2d" or "embedding" for a supported module, else None.

    transformers' Conv1D is recognised by class name "Conv1D" with an ``nf``
    attribute, without importing transformers.
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def layer_spec(name: str, module: nn.Module, kind: str, bias: bool) -> LayerSpec:
    """Dimensions of a supported module; raises for configurations without per-example gradients."""
    if kind == "embedding":
        if module.scale_grad_by_freq:
            raise ValueError(f"layer {name!r}: nn.Embedding(scale_grad_by_freq=True) couples examples; not supported")
        return LayerSpec(name, kind, module.num_embeddings, module.embedding_dim)
    if kind == "conv2d" and module.groups != 1:
        raise ValueError(
            f"layer {name!r}: nn.Conv2d with groups={module.groups} is not supported (groups must be 1); exclude it"
        )
    with_bias = bias and getattr(module, "bias", None) is not None
    weight = module.weight
    if kind == "linear":
        d_out, d_in = weight.shape
    elif kind == "conv1d":
        d_in, d_out = weight.shape
    else:
        d_out, d_in = weight.shape[0], math.prod(weight.shape[1:])
    return LayerSpec(name, kind, d_in + int(with_bias), d_out, with_bias)


def _patterns(patterns: str | Sequence[str]) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def select_layers(
    model: nn.Module,
    include: str | Sequence[str] = "*",
    exclude: str | Sequence[str] = (),
    *,
    bias: bool = False,
) -> list[LayerSpec]:
    """Supported layers whose names match ``include`` and not ``exclude`` (fnmatch patterns).

    Args:
        model: the model; names are those of ``model.named_modules()``.
        include: pattern(s), e.g. ``"*.mlp.*"``; only supported layers
            (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding) are kept.
        exclude: pattern(s) removed from the selection, e.g. ``"lm_head"``.
        bias: augment inputs with a ones column for layers that have a bias.

    Returns:
        LayerSpecs in ``named_modules()`` order.

    Raises:
        ValueError: an include pattern matches no supported layer, nothing is
            left after ``exclude`` (the message lists available names), or a
            matched layer is unsupported (grouped conv, scale_grad_by_freq).
    """
    include, exclude = _patterns(include), _patterns(exclude)
    candidates = [(n, m, k) for n, m in model.named_modules() if (k := layer_kind(m)) is not None]
    names = [n for n, _, _ in candidates]
    available = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") or "none"
    for pattern in include:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"include pattern {pattern!r} matches no supported layer; available: {available}")
    chosen = [
        (n, m, k)
        for n, m, k in candidates
        if any(fnmatch.fnmatchcase(n, p) for p in include) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]
    if not chosen:
        raise ValueError(f"no layer left: include={include} exclude={exclude}; available: {available}")
    return [layer_spec(n, m, k, bias) for n, m, k in chosen]
