"""Low-rank adapters (LoRA) on the linear layers of the AirRep encoder's top transformer layers; imports only torch.

A wrapped linear layer computes ``y = x Wᵀ + b + (α / r) · (x Aᵀ) Bᵀ`` with the
frozen weight ``W`` (out, in) and bias ``b``, and the trained factors ``A``
(r, in) and ``B`` (out, r). ``A`` starts uniform in ``±1/√in`` (drawn from a
seeded generator) and ``B`` at zero, so a fresh adapter leaves the encoder's
output exactly as it was. There is no adapter dropout: the encoder must stay
deterministic for gradient caching (:mod:`airtrace.airrep.train`).

Targets in each wrapped BERT-style layer: ``"attention"`` = the query, key,
value and attention output projections; ``"mlp"`` = the intermediate and output
projections; ``"attention+mlp"`` = all six.

:func:`merged_state_dict` folds the adapters into the weights
(``W + (α / r) B A``) under the plain module names, so a trained encoder is
saved, loaded and run as an ordinary encoder (no inference cost from the
adapters); :func:`merge` does the same in place.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = {
    "attention": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    "mlp": ("intermediate.dense", "output.dense"),
}
TARGETS["attention+mlp"] = TARGETS["attention"] + TARGETS["mlp"]


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus a trained low-rank update ``(α / r) B A``.

    Args:
        linear: the layer wrapped (its weight and bias are shared, not copied, and frozen).
        rank: r >= 1.
        alpha: α > 0.
        generator: draws ``A`` (seeded by the caller).
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        bound = 1.0 / math.sqrt(self.in_features)
        a = (torch.rand(rank, self.in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.lora_a = nn.Parameter(a.to(self.weight.device, self.weight.dtype))
        self.lora_b = nn.Parameter(self.weight.new_zeros(self.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b + scale · (x Aᵀ) Bᵀ`` for x (..., in) -> (..., out)."""
        return super().forward(x) + self.scale * ((x @ self.lora_a.T) @ self.lora_b.T)

    def merged_weight(self) -> torch.Tensor:
        """``W + scale · B A`` (out, in), detached."""
        return (self.weight + self.scale * (self.lora_b @ self.lora_a)).detach()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def check_settings(rank: int, alpha: float, targets: str) -> None:
    """ValueError naming the setting unless rank is an int >= 1, alpha > 0 and targets one of :data:`TARGETS`."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if targets not in TARGETS:
        raise ValueError(f"LoRA targets must be one of {sorted(TARGETS)}, got {targets!r}")


def apply(layers: nn.ModuleList, rank: int, alpha: float, targets: str = "attention+mlp", *,
          seed: int = 0) -> list[nn.Parameter]:
    """Wrap the ``targets`` linear layers of every layer in ``layers`` (BERT-style) with adapters, in place.

    Args:
        layers: the transformer layers to adapt (e.g. the top N of ``backbone.encoder.layer``).
        rank, alpha: adapter rank r and scale α (update ``(α / r) B A``).
        targets: "attention", "mlp" or "attention+mlp" (see the module docstring).
        seed: seeds the ``A`` factors (drawn in layer order).

    Returns:
        The adapter parameters ``[A, B, ...]`` (the only ones with ``requires_grad`` among the wrapped layers).

    Raises:
        ValueError: bad settings, a layer already wrapped, or a target that is not an ``nn.Linear``.
    """
    check_settings(rank, alpha, targets)
    generator = torch.Generator().manual_seed(seed)
    params = []
    for index, layer in enumerate(layers):
        for path in TARGETS[targets]:
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            linear = getattr(parent, name, None)
            if isinstance(linear, LoRALinear):
                raise ValueError(f"layer {index}: {path} already has a LoRA adapter")
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"layer {index}: {path} is {type(linear).__name__}, not nn.Linear; LoRA needs a "
                                 "BERT-style layer")
            wrapped = LoRALinear(linear, rank, alpha, generator)
            setattr(parent, name, wrapped)
            params += [wrapped.lora_a, wrapped.lora_b]
    return params


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every adapter folded into its weight and the adapter tensors dropped: the state
    of the plain module (keys and shapes as before :func:`apply`)."""
    state = module.state_dict()
    for prefix, sub in module.named_modules():
        if isinstance(sub, LoRALinear):
            key = f"{prefix}." if prefix else ""
            state[f"{key}weight"] = sub.merged_weight()
            del state[f"{key}lora_a"], state[f"{key}lora_b"]
    return state


def merge(module: nn.Module) -> int:
    """Replace every :class:`LoRALinear` in ``module`` by a plain ``nn.Linear`` holding ``W + (α / r) B A``; the
    number replaced. The merged weights keep ``requires_grad = False``."""
    wrapped = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, LoRALinear)]
    for name, sub in wrapped:
        parent_path, _, attr = name.rpartition(".")
        plain = nn.Linear(sub.in_features, sub.out_features, bias=sub.bias is not None, device=sub.weight.device,
                          dtype=sub.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(sub.merged_weight())
            if sub.bias is not None:
                plain.bias.copy_(sub.bias)
        plain.requires_grad_(False)
        setattr(module.get_submodule(parent_path) if parent_path else module, attr, plain)
    return len(wrapped)
