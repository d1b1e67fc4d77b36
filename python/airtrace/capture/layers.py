"""Which layers of a model are tracked (``LayerSpec``, ``select_layers``), each seen as a linear map with a (d_out,
d_in) weight; imports only ``airtrace.util`` (a compiled model's original module)."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from torch import nn

from airtrace.util.compiled import unwrap

ROOT = "<root>"
"""Name of the model itself when it is a tracked layer (``Attributor(nn.Linear(...))``); torch names it ''."""

PRESETS = {"lora": ("*.lora_A.*", "*.lora_B.*")}
"""Named selections: ``layers="lora"`` tracks the LoRA adapter matrices (PEFT's ``lora_A`` / ``lora_B``)."""

COMPILED = "_orig_mod."
"""Name prefix ``torch.compile`` adds to every submodule and parameter; names and patterns ignore it."""

_STORED_TRANSPOSED = ("conv1d", "embedding")
"""Kinds whose weight tensor is stored (d_in, d_out), the transpose of nn.Linear's (d_out, d_in)."""


@dataclass(frozen=True)
class LayerSpec:
    """One tracked layer, seen as a linear map with a (d_out, d_in) weight.

    Attributes:
        name: module name in ``model.named_modules()`` (:data:`ROOT` for the model itself).
        kind: "linear", "conv1d" (transformers' GPT-2 style), "conv2d" or "embedding".
        d_in: input features (C_in*kh*kw for conv2d, num_embeddings for embedding),
            plus one when ``bias`` is True.
        d_out: output features (C_out for conv2d, embedding_dim for embedding).
        bias: whether the inputs are augmented with a ones column (bias gradient).
        tied: ``(name, transposed)`` of other tracked modules that use this layer's weight
            (e.g. GPT-2's ``lm_head`` and ``transformer.wte``): their weight gradients are added
            to this layer's, so a shared weight is one feature block, its full gradient.
            ``transposed`` when that module stores the weight the other way round
            (an nn.Embedding sharing an nn.Linear's weight).
    """

    name: str
    kind: str
    d_in: int
    d_out: int
    bias: bool = False
    tied: tuple[tuple[str, bool], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "tied", tuple((str(n), bool(t)) for n, t in self.tied))  # JSON gives lists


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``unwrap(model)`` once; the model itself is named :data:`ROOT`."""
    for name, module in unwrap(model).named_modules():
        yield name or ROOT, module


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
    """Dimensions of a supported module; raises for configurations without per-example gradients.

    The bias is tracked when ``bias`` is True and the module has a bias that requires grad.
    """
    if kind == "embedding":
        if module.scale_grad_by_freq:
            raise ValueError(f"layer {name!r}: nn.Embedding(scale_grad_by_freq=True) couples examples; not supported")
        return LayerSpec(name, kind, module.num_embeddings, module.embedding_dim)
    if kind == "conv2d" and module.groups != 1:
        raise ValueError(
            f"layer {name!r}: nn.Conv2d with groups={module.groups} is not supported (groups must be 1); exclude it"
        )
    module_bias = getattr(module, "bias", None)
    with_bias = bias and module_bias is not None and module_bias.requires_grad
    weight = module.weight
    if kind == "linear":
        d_out, d_in = weight.shape
    elif kind == "conv1d":
        d_in, d_out = weight.shape
    else:
        d_out, d_in = weight.shape[0], math.prod(weight.shape[1:])
    return LayerSpec(name, kind, d_in + int(with_bias), d_out, with_bias)


def _patterns(patterns: str | Sequence[str]) -> list[str]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    out = []
    for p in patterns:
        out.extend(PRESETS.get(p, (p.replace(COMPILED, ""),)))
    return out


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(
    model: nn.Module,
    include: str | Sequence[str] = "*",
    exclude: str | Sequence[str] = (),
    *,
    bias: bool = True,
    warn_untracked: bool = True,
) -> list[LayerSpec]:
    """Trainable supported layers whose names match ``include`` and not ``exclude`` (fnmatch patterns).

    - Frozen layers (weight with ``requires_grad=False``, e.g. the base model under a LoRA
      adapter) are skipped: with a frozen base, ``"*"`` selects the adapters only.
    - A weight used by several selected modules (tied embeddings: GPT-2's ``transformer.wte``
      and ``lm_head``) is one layer: the first such module (one with a bias first), with the
      others in its ``tied``; its features are the gradient of the shared weight.
    - One warning lists the modules matched by ``include`` that hold trainable parameters
      which are not tracked (norms, EmbeddingBag, nn.Conv1d, ...; not the biases that
      ``bias=False`` leaves out).

    Args:
        model: the model (a ``torch.compile``'d model: its original module); names are those
            of ``model.named_modules()``, the model itself is :data:`ROOT`.
        include: pattern(s), e.g. ``"*.mlp.*"``; ``"lora"`` for PEFT's LoRA matrices. Only
            supported layers (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding) are kept.
        exclude: pattern(s) removed from the selection, e.g. ``"lm_head"``.
        bias: augment inputs with a ones column for layers that have a trainable bias.
        warn_untracked: warn about trainable parameters that are not tracked.

    Returns:
        LayerSpecs in ``named_modules()`` order.

    Raises:
        ValueError: an include pattern matches no trainable supported layer, nothing is
            left after ``exclude`` (the message lists available names), a matched layer is
            unsupported (grouped conv, scale_grad_by_freq), or tied modules disagree in shape.
    """
    include, exclude = _patterns(include), _patterns(exclude)
    modules = list(named_modules(model))
    candidates = [(n, m, k) for n, m in modules if (k := layer_kind(m)) is not None]
    trainable = [(n, m, k) for n, m, k in candidates if m.weight.requires_grad]
    names = [n for n, _, _ in trainable]
    available = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") or "none"
    for pattern in include:
        if not fnmatch.filter(names, pattern):
            frozen = fnmatch.filter([n for n, _, _ in candidates], pattern)
            why = f"only frozen layers ({', '.join(frozen[:3])}, ...)" if frozen else "no supported layer"
            raise ValueError(f"include pattern {pattern!r} matches {why}; available: {available}")
    chosen = [(n, m, k) for n, m, k in trainable if _matches(n, include) and not _matches(n, exclude)]
    if not chosen:
        raise ValueError(f"no layer left: include={include} exclude={exclude}; available: {available}")
    specs = _tie(chosen, bias)
    if warn_untracked:
        _warn_untracked(modules, specs, include, exclude, bias)
    return specs


def _tie(chosen: list[tuple[str, nn.Module, str]], bias: bool) -> list[LayerSpec]:
    """LayerSpecs of the chosen modules, modules sharing a weight folded into one spec (``tied``)."""
    groups: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for item in chosen:
        groups.setdefault(id(item[1].weight), []).append(item)
    specs = []
    for name, module, kind in chosen:
        group = groups[id(module.weight)]
        with_bias = [g for g in group if layer_spec(*g, bias).bias]
        primary = (with_bias or group)[0]
        if primary[0] != name:
            continue
        spec = layer_spec(name, module, kind, bias)
        tied = []
        for other, other_module, other_kind in group:
            if other == name:
                continue
            if "conv2d" in (kind, other_kind) and kind != other_kind:
                raise ValueError(f"layers {name!r} and {other!r} share a weight as a conv and a matrix; exclude one")
            transposed = (kind in _STORED_TRANSPOSED) != (other_kind in _STORED_TRANSPOSED)
            member = layer_spec(other, other_module, other_kind, False)
            expected = (spec.d_in - spec.bias, spec.d_out)
            if ((member.d_out, member.d_in) if transposed else (member.d_in, member.d_out)) != expected:
                raise ValueError(f"layers {name!r} and {other!r} share a weight but disagree on its shape")
            tied.append((other, transposed))
        specs.append(replace(spec, tied=tuple(tied)))
    return specs


def tracked_parameters(model: nn.Module, specs: Sequence[LayerSpec]) -> set[int]:
    """ids of the parameters whose gradients the features of ``specs`` hold.

    Raises:
        ValueError: a layer of ``specs`` is not a module of the model.
    """
    modules = dict(named_modules(model))
    ids = set()
    for spec in specs:
        for name in [spec.name, *(n for n, _ in spec.tied)]:
            if name not in modules:
                raise ValueError(f"layer {name!r} is not a module of the model")
            ids.add(id(modules[name].weight))
        if spec.bias:
            ids.add(id(modules[spec.name].bias))
    return ids


def _warn_untracked(modules: list[tuple[str, nn.Module]], specs: list[LayerSpec], include: list[str],
                    exclude: list[str], bias: bool) -> None:
    tracked = tracked_parameters(modules[0][1], specs)
    if not bias:  # left out on purpose
        by_name = dict(modules)
        tracked |= {id(by_name[s.name].bias) for s in specs if getattr(by_name[s.name], "bias", None) is not None}
    missed = []
    for name, module in modules:
        if not _matches(name, include) or _matches(name, exclude):
            continue
        params = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in tracked]
        if params:
            missed.append(f"{name} ({type(module).__name__}, {sum(p.numel() for p in params)} parameters)")
    if missed:
        shown = "; ".join(missed[:8]) + (f"; and {len(missed) - 8} more" if len(missed) > 8 else "")
        warnings.warn(f"airtrace: {len(missed)} modules hold trainable parameters that are not attributed "
                      f"(module types without per-example gradients here, e.g. norms): {shown}", stacklevel=3)
