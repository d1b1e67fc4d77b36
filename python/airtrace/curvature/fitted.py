"""A fitted curvature (``Curvature``: one damped ``LayerInverse`` per layer), applying it and its safetensors file;
imports ``airtrace.curvature.fitting``, the kernels layer and ``airtrace.util``."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from airtrace.curvature.fitting import F64, Dims, Features, check_features
from airtrace.ops.backends import accumulation_dtype


METADATA_KEY = "airtrace.curvature"
FORMAT_VERSION = 1

# take(key, shape) -> float64 tensor: reads one tensor of a layer from a file (None in shape = any size).
TensorReader = Callable[[str, tuple], torch.Tensor]
INVERSES: dict[str, type[LayerInverse]] = {}
"""Method name -> the LayerInverse class its layers use (filled by the method modules)."""


class LayerInverse(ABC):
    """Damped inverse curvature of one layer, applied to (B, k_out, k_in) float64 features.

    Attributes:
        dims: (k_out, k_in).
        damping: λ used (0.0 for identity).
    """

    dims: Dims
    damping: float

    def __init_subclass__(cls, methods: tuple[str, ...] = (), **kwargs) -> None:
        """Register the subclass as the inverse that loads the curvature ``methods``."""
        super().__init_subclass__(**kwargs)
        for method in methods:
            INVERSES[method] = cls

    @abstractmethod
    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """(B, k_out, k_in) float64 or float32 -> the same shape, dtype and device."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define this inverse, by name (saved as ``<layer>/<name>``)."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, dims: Dims, damping: float, take: TensorReader) -> LayerInverse:
        """Rebuild from saved tensors read with ``take(name, expected shape)``."""


class Curvature:
    """A fitted curvature: one damped inverse per layer.

    Attributes:
        method: "identity", "fisher", "kfac", "ekfac" or "lowrank".
        inverses: {layer name: LayerInverse}.
        damping_factor: the relative damping factor used, None for absolute or per-layer damping or identity.
        n_examples: examples the fit saw (None when built from given matrices).
        damping_rule: how λ was chosen (:meth:`airtrace.curvature.Damping.record`: rule, factor(s),
            criterion per layer), or None.
    """

    def __init__(
        self,
        method: str,
        inverses: Mapping[str, LayerInverse],
        damping_factor: float | None = None,
        n_examples: int | None = None,
        damping_rule: dict | None = None,
    ) -> None:
        if method not in INVERSES:
            raise ValueError(f"method must be one of {sorted(INVERSES)}, got {method!r}")
        self.method = method
        self.inverses = dict(inverses)
        self.damping_factor = damping_factor
        self.n_examples = n_examples
        self.damping_rule = damping_rule

    @property
    def layers(self) -> list[str]:
        return list(self.inverses)

    @property
    def dims(self) -> dict[str, Dims]:
        """{layer: (k_out, k_in)}."""
        return {name: inv.dims for name, inv in self.inverses.items()}

    @property
    def damping(self) -> dict[str, float]:
        """{layer: λ used}."""
        return {name: inv.damping for name, inv in self.inverses.items()}

    @property
    def metadata(self) -> dict:
        """JSON-able summary, stored in the safetensors metadata under ``airtrace.curvature``."""
        return {
            "format": FORMAT_VERSION,
            "method": self.method,
            "layers": self.layers,
            "dims": {name: list(d) for name, d in self.dims.items()},
            "damping": self.damping,
            "damping_factor": self.damping_factor,
            "n_examples": self.n_examples,
            "damping_rule": self.damping_rule,
        }

    def __repr__(self) -> str:
        damping = ", ".join(f"{name}: {lam:.3g}" for name, lam in self.damping.items())
        rule = ""
        if self.damping_rule is not None:
            rule = f", damping_rule={self.damping_rule['rule']!r}"
            if self.damping_rule.get("criterion"):
                criterion = ", ".join(f"{name}: {v:.3g}" for name, v in self.damping_rule["criterion"].items())
                rule += f", criterion={{{criterion}}}"
        return f"Curvature(method={self.method!r}, damping_factor={self.damping_factor}{rule}, damping={{{damping}}})"

    def precondition(self, features: Features, *, exact: bool = True) -> dict[str, torch.Tensor]:
        """Apply each layer's damped inverse curvature.

        Args:
            features: {layer: (B, k_out, k_in)} projected gradients, any subset of ``layers``.
            exact: compute in float64 (default). False computes in float32 (float64 inputs
                stay float64), K-FAC / EK-FAC through the fused ``precondition`` kernel: for
                large batches such as the self-influence of a whole store.

        Returns:
            {layer: (B, k_out, k_in)} on the features' device, float32 (float64 for float64 features).

        Raises:
            ValueError: unknown layer, wrong shape, or NaN/Inf (naming the layer).
        """
        features = check_features(features, self.dims)
        out = {}
        for name, x in features.items():
            dtype = accumulation_dtype(x.dtype)
            out[name] = self.inverses[name].apply(x.to(F64 if exact else dtype)).to(dtype)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the factors (``<layer>/<name>``, float64) and metadata to one safetensors file, atomically."""
        path = os.fspath(path)
        tensors = {
            f"{name}/{key}": t.detach().cpu().contiguous()
            for name, inv in self.inverses.items()
            for key, t in inv.tensors().items()
        }
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(self.metadata)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Curvature:
        """Read a file written by :meth:`save` (tensors on the CPU).

        Raises:
            ValueError: not a safetensors file, not an airtrace curvature, or a missing / misshapen tensor.
        """
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        if raw is None:
            raise ValueError(f"{path}: not an airtrace curvature file (no {METADATA_KEY!r} metadata)")
        try:
            meta = json.loads(raw)
            method, damping, dims = meta["method"], meta["damping"], meta["dims"]
            inverse_cls = INVERSES[method]
            inverses = {
                name: inverse_cls.from_tensors(tuple(dims[name]), damping[name], _reader(path, tensors, name))
                for name in meta["layers"]
            }
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: malformed {METADATA_KEY!r} metadata ({e!r})") from e
        return cls(method, inverses, meta.get("damping_factor"), meta.get("n_examples"), meta.get("damping_rule"))


def _reader(path: str, tensors: Mapping[str, torch.Tensor], layer: str) -> TensorReader:
    def take(key: str, shape: tuple) -> torch.Tensor:
        name = f"{layer}/{key}"
        if name not in tensors:
            raise ValueError(f"{path}: missing tensor {name!r}")
        t = tensors[name]
        if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        return t.to(F64)

    return take
