"""Curvature method "identity": no preconditioning; imports ``airtrace.curvature.fitted`` and ``.fitting``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from airtrace.curvature.fitted import Curvature, LayerInverse, TensorReader
from airtrace.curvature.fitting import Dims, check_mapping


@dataclass(frozen=True)
class IdentityInverse(LayerInverse, methods=("identity",)):
    """No preconditioning."""

    dims: Dims
    damping: float = 0.0

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_tensors(cls, dims: Dims, damping: float, take: TensorReader) -> IdentityInverse:
        return cls(dims)


def identity(dims: Mapping[str, Dims]) -> Curvature:
    """No preconditioning, for layers ``{name: (k_out, k_in)}``."""
    check_mapping("dims", dims)
    return Curvature("identity", {name: IdentityInverse((int(d[0]), int(d[1]))) for name, d in dims.items()})
