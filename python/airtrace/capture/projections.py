"""The factored capture's per-layer Gaussian projections (``Projections``, ``make_projections``): seeded per layer, the
same on every device; imports ``airtrace.capture.layers`` and ``airtrace.util``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from airtrace.capture.layers import LayerSpec
from airtrace.util.checks import positive_int

LAYER_SEED_STRIDE = 2**20
MAX_SEED = 2**32


def layer_seed(seed: int, index: int) -> int:
    """Generator seed of the ``index``-th layer: ``seed * 2^20 + index`` (distinct for index < 2^20)."""
    return seed * LAYER_SEED_STRIDE + index


@dataclass
class Projections:
    """Per-layer Gaussian projections for the factored capture.

    Attributes:
        seed: base seed, 0 <= seed < 2^32.
        k_in: input-side projection dimension.
        k_out: output-side projection dimension.
        layers: the LayerSpecs, in order (a layer's index enters its seed).
        matrices: name -> (P_in (d_in, k_in'), P_out (d_out, k_out')), where k' = k, or
            k' = d with P = I_d for a side with d <= k when ``exact_small``, and for both sides of a
            layer with d_out * d_in <= ``exact_budget``.
        exact_small: layer sides no wider than k are kept exact (identity) instead of projected.
        exact_budget: layers whose whole gradient has at most this many entries (d_out * d_in) are kept
            exact on both sides (0: none).
    """

    seed: int
    k_in: int
    k_out: int
    layers: tuple[LayerSpec, ...]
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]
    exact_small: bool = False
    exact_budget: int = 0

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.matrices[name]

    def dims(self) -> dict[str, tuple[int, int]]:
        """{layer: (k_out', k_in')}: each layer's feature block shape."""
        return {name: (p_out.shape[1], p_in.shape[1]) for name, (p_in, p_out) in self.matrices.items()}

    def exact_sides(self, name: str) -> tuple[bool, bool]:
        """(input side, output side) of layer ``name`` kept exact (P = I) by ``exact_small`` or ``exact_budget``."""
        p_in, p_out = self.matrices[name]
        whole = p_in.shape[0] * p_out.shape[0] <= self.exact_budget
        return (whole or self.exact_small and p_in.shape[0] <= self.k_in,
                whole or self.exact_small and p_out.shape[0] <= self.k_out)

    def config(self) -> dict:
        """JSON-able record from which ``from_config`` rebuilds the same matrices."""
        return {
            "kind": "gaussian",
            "recipe": ("torch.Generator().manual_seed(seed * 2**20 + index); float64 randn P_in then P_out, / sqrt(k); "
                       "P = I_d instead for a side with d <= k when exact_small, and for both sides when "
                       "d_out * d_in <= exact_budget"),
            "torch": torch.__version__,
            "seed": self.seed,
            "k_in": self.k_in,
            "k_out": self.k_out,
            "exact_small": self.exact_small,
            "exact_budget": self.exact_budget,
            "layers": [asdict(spec) for spec in self.layers],
        }

    @classmethod
    def from_config(
        cls, config: dict, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> Projections:
        """Rebuild the projections recorded by ``config()``."""
        layers = [LayerSpec(**spec) for spec in config["layers"]]
        return make_projections(layers, config["k_in"], config["k_out"], config["seed"],
                                exact_small=config.get("exact_small", False),
                                exact_budget=config.get("exact_budget", 0), dtype=dtype, device=device)


def make_projections(
    layers: Sequence[LayerSpec],
    k_in: int,
    k_out: int,
    seed: int,
    *,
    exact_small: bool = False,
    exact_budget: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Projections:
    """Deterministic Gaussian projections: P_in ~ N(0, 1/k_in), P_out ~ N(0, 1/k_out).

    Layer ``i`` draws P_in (d_in, k_in) then P_out (d_out, k_out) in float64 from a
    CPU ``torch.Generator`` seeded with ``layer_seed(seed, i)``, then casts to
    ``dtype`` on ``device``: the same values on every device. With ``exact_small``,
    a side with d <= k gets P = I_d instead (its features are the exact gradient
    on that side, d wide: no distortion of inner products or Kronecker factors,
    and no wider than needed); a layer with ``d_out * d_in <= exact_budget``
    gets P = I on both sides (its features are its whole gradient). The draws
    are made all the same, so the other side's matrix does not depend on the
    choice.

    Args:
        layers: LayerSpecs from ``select_layers``.
        k_in: input-side dimension (>= 1).
        k_out: output-side dimension (>= 1).
        seed: 0 <= seed < 2^32.
        exact_small: keep sides with d <= k unprojected.
        exact_budget: keep layers with d_out * d_in <= exact_budget unprojected (>= 0).
        dtype: matrix dtype.
        device: matrix device.

    Returns:
        Projections; its ``config()`` records what rebuilds them.
    """
    positive_int("k_in", k_in)
    positive_int("k_out", k_out)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2^32), got {seed!r}")
    if not isinstance(exact_small, bool):
        raise ValueError(f"exact_small must be a bool, got {exact_small!r}")
    if isinstance(exact_budget, bool) or not isinstance(exact_budget, int) or exact_budget < 0:
        raise ValueError(f"exact_budget must be an int >= 0 (gradient entries of a layer kept exact), "
                         f"got {exact_budget!r}")
    matrices = {}
    for index, spec in enumerate(layers):
        gen = torch.Generator().manual_seed(layer_seed(seed, index))
        p_in = torch.randn(spec.d_in, k_in, generator=gen, dtype=torch.float64) / math.sqrt(k_in)
        p_out = torch.randn(spec.d_out, k_out, generator=gen, dtype=torch.float64) / math.sqrt(k_out)
        whole = spec.d_in * spec.d_out <= exact_budget
        if whole or exact_small and spec.d_in <= k_in:
            p_in = torch.eye(spec.d_in, dtype=torch.float64)
        if whole or exact_small and spec.d_out <= k_out:
            p_out = torch.eye(spec.d_out, dtype=torch.float64)
        matrices[spec.name] = (p_in.to(device, dtype), p_out.to(device, dtype))
    return Projections(seed, k_in, k_out, tuple(layers), matrices, exact_small, exact_budget)
