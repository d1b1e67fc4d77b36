"""A fitted curvature (``Curvature``: one damped ``LayerInverse`` per layer), applying it, the model and store it was
fitted for, and its checksummed safetensors file; imports ``airtrace.curvature.fitting``, the kernels layer and
``airtrace.util``."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import torch

from airtrace.curvature.fitting import F64, Dims, Features, check_features
from airtrace.ops.backends import accumulation_dtype
from airtrace.util.checked_file import load_checked, save_checked


METADATA_KEY = "airtrace.curvature"
FORMAT_VERSION = 2
"""2: the file records the model fingerprint and store content key it was fitted for, and a checksum."""

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
        damping_factor: the relative damping factor used, None for absolute damping or identity.
        n_examples: examples the fit saw (None when built from given matrices).
        fingerprint: :func:`airtrace.store.model_fingerprint` of the model it was fitted for (None: not bound).
        store_key: ``Store.content_key()`` of the store it was fitted on (None: fitted on batches, or not bound).
        path: the file it was saved to or loaded from (None: in memory only).
    """

    def __init__(
        self,
        method: str,
        inverses: Mapping[str, LayerInverse],
        damping_factor: float | None = None,
        n_examples: int | None = None,
    ) -> None:
        if method not in INVERSES:
            raise ValueError(f"method must be one of {sorted(INVERSES)}, got {method!r}")
        self.method = method
        self.inverses = dict(inverses)
        self.damping_factor = damping_factor
        self.n_examples = n_examples
        self.fingerprint: str | None = None
        self.store_key: str | None = None
        self.path: str | None = None

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
            "fingerprint": self.fingerprint,
            "store_key": self.store_key,
        }

    def check_for(self, fingerprint: str, store_key: str, store_path: str) -> None:
        """Refuse to precondition for another model or store than the ones it was fitted for.

        Args:
            fingerprint: the scoring model's fingerprint.
            store_key: the scored store's ``content_key()``; store_path: its directory (for the message).

        Raises:
            ValueError: naming this curvature's file and both fingerprints or both content keys.
        """
        where = self.path or "the fitted curvature"
        if self.fingerprint is not None and self.fingerprint != fingerprint:
            raise ValueError(f"{where}: refused, it was fitted for model fingerprint {self.fingerprint!r}, this "
                             f"model's is {fingerprint!r}; its factors describe another model's gradients. Fix: fit "
                             "the curvature for this model")
        if self.store_key is not None and self.store_key != store_key:
            raise ValueError(f"{where}: refused, it was fitted on the store with content key {self.store_key!r}, "
                             f"the store {store_path} has {store_key!r}. Fix: fit the curvature on this store")

    def __repr__(self) -> str:
        damping = ", ".join(f"{name}: {lam:.3g}" for name, lam in self.damping.items())
        return f"Curvature(method={self.method!r}, damping_factor={self.damping_factor}, damping={{{damping}}})"

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
        """Write the factors (``<layer>/<name>``, float64) and metadata with a checksum to one safetensors file,
        atomically (a failed write leaves an existing file as it was).

        Raises:
            OSError: naming ``path`` and the cause (e.g. a full disk).
        """
        tensors = {
            f"{name}/{key}": t
            for name, inv in self.inverses.items()
            for key, t in inv.tensors().items()
        }
        save_checked(tensors, path, METADATA_KEY, self.metadata)
        self.path = os.fspath(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Curvature:
        """Read a file written by :meth:`save` (tensors on the CPU), its checksum checked.

        Raises:
            ValueError: not a safetensors file, not an airtrace curvature, a checksum mismatch, an older format,
                or a missing / misshapen tensor.
        """
        path = os.fspath(path)
        tensors, meta = load_checked(path, METADATA_KEY, "an airtrace curvature file")
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: curvature format {meta.get('format')!r}, this airtrace reads format "
                             f"{FORMAT_VERSION} (which records the model and store it was fitted for). Fix: fit it "
                             "again")
        try:
            method, damping, dims = meta["method"], meta["damping"], meta["dims"]
            inverse_cls = INVERSES[method]
            inverses = {
                name: inverse_cls.from_tensors(tuple(dims[name]), damping[name], _reader(path, tensors, name))
                for name in meta["layers"]
            }
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: malformed {METADATA_KEY!r} metadata ({e!r})") from e
        curvature = cls(method, inverses, meta.get("damping_factor"), meta.get("n_examples"))
        curvature.fingerprint, curvature.store_key, curvature.path = meta["fingerprint"], meta["store_key"], path
        return curvature


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
