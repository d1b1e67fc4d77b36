"""Hessian- and Gauss-Newton-vector products of the mean training loss over the tracked layers' weights and biases, in
the feature layout (``ParameterLayout``, ``CurvatureProducts``), by torch.func; imports ``airtrace.capture``.

The feature layout is the one of an unprojected capture: per tracked layer a
(d_out, d_in) block, the weight as a linear map ``out = A Wᵀ`` (transposed for
transformers' Conv1D and nn.Embedding, flattened for nn.Conv2d) with the bias as
its last input column when the layer tracks it; blocks concatenated row-major in
layer order, p entries in all. A vector in that layout is a direction in the
tracked parameters, so the solved ``(H + D)⁻¹ g_query`` takes inner products with
stored unprojected features directly.

Products, for the mean loss ``L(θ) = (1/n) Σ_z loss_fn(model_θ, z)`` over the
training batches (the model in eval mode, its other parameters fixed):

- ``matrix="hessian"``: ``∇²L v`` by forward-over-reverse differentiation
  (``torch.func.jvp`` of ``torch.func.grad``);
- ``matrix="ggn"``: the generalised Gauss-Newton ``Jᵀ ∇²ℓ J v``: the same
  forward-over-reverse product of the loss of the model linearised at θ,
  ``f(θ) + J (θ' - θ)`` (the model's outputs through ``torch.func.jvp``), whose
  Hessian is exactly the GGN; positive semi-definite for a convex loss of the
  outputs (cross-entropy, squared error).

Columns of a (p, r) block of directions are mapped with ``torch.func.vmap``. The
products run ``F.scaled_dot_product_attention`` on its math backend: the fused
kernels (flash attention on the CPU among them) have no forward-mode derivative.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from airtrace.capture import LayerSpec

F64 = torch.float64
MATRICES = ("ggn", "hessian")
CHUNK_ELEMENTS = 2**19
"""Tangent entries (columns × p) one vmapped product holds by default."""


class ParameterLayout:
    """The map between feature-layout vectors (p,) and the tracked parameters {name: tensor}.

    Args:
        model: the model.
        layers: the tracked LayerSpecs, in feature layout order.

    Attributes:
        names: the tracked parameter names (``model.named_parameters()`` names).
        dims: {layer: (d_out, d_in)} feature blocks.
        width: p = Σ d_out d_in.

    Raises:
        ValueError: a parameter tracked by two layers (tied weights): its gradient would count twice.
    """

    def __init__(self, model: nn.Module, layers: Sequence[LayerSpec]):
        modules = dict(model.named_modules())
        owners: dict[int, str] = {}
        names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        self.layers = list(layers)
        self.names: list[str] = []
        for spec in self.layers:
            module = modules[spec.name]
            for attr in ("weight", "bias") if spec.bias else ("weight",):
                param = getattr(module, attr)
                if id(param) in owners:
                    raise ValueError(f"layers {owners[id(param)]!r} and {spec.name!r} share the parameter "
                                     f"{names[id(param)]!r} (tied weights); exact influence needs each parameter in "
                                     f"one tracked layer: exclude one of them")
                owners[id(param)] = spec.name
                self.names.append(names[id(param)])
        self.shapes = {name: model.get_parameter(name).shape for name in self.names}
        self.dims = {spec.name: (spec.d_out, spec.d_in) for spec in self.layers}
        self.width = sum(d_out * d_in for d_out, d_in in self.dims.values())

    def params(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """(p,) feature-layout vector -> {parameter name: tensor of the parameter's shape}."""
        out, start, index = {}, 0, 0
        for spec in self.layers:
            d_out, d_in = spec.d_out, spec.d_in
            block = vector[start : start + d_out * d_in].reshape(d_out, d_in)
            start += d_out * d_in
            d = d_in - int(spec.bias)
            weight = block[:, :d]
            if spec.kind in ("conv1d", "embedding"):
                weight = weight.T
            name = self.names[index]
            out[name] = weight.reshape(self.shapes[name])
            index += 1
            if spec.bias:
                out[self.names[index]] = block[:, d]
                index += 1
        return out

    def vector(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """{parameter name: tensor} (every tracked parameter) -> (p,) feature-layout vector."""
        blocks, index = [], 0
        for spec in self.layers:
            weight = params[self.names[index]]
            index += 1
            weight = weight.T if spec.kind in ("conv1d", "embedding") else weight.reshape(spec.d_out, -1)
            if spec.bias:
                weight = torch.cat([weight, params[self.names[index]][:, None]], dim=1)
                index += 1
            blocks.append(weight.reshape(-1))
        return torch.cat(blocks)


class _LossSum(nn.Module):
    """``forward(batch) = loss_fn(model, batch).sum()``: the summed per-example loss as a module (for functional_call)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch).sum()


class _Linearized(nn.Module):
    """The model linearised at θ along δ: ``forward(...) = f_θ(...) + J_θ δ`` (outputs of any pytree structure).

    Attributes the loss function reads (e.g. ``model.config``) come from the model.
    """

    def __init__(self, model: nn.Module, theta: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]):
        super().__init__()
        self.inner = model
        self.theta, self.delta = theta, delta

    def forward(self, *args, **kwargs):
        primal, tangent = jvp(lambda p: functional_call(self.inner, p, args, kwargs), (self.theta,), (self.delta,))
        return tree_map(lambda a, b: a + b if isinstance(a, torch.Tensor) else a, primal, tangent)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class CurvatureProducts:
    """``V (p, r) -> H V`` for the mean training loss, H its Hessian or GGN over the tracked parameters.

    Args:
        model: the model (its current weights are θ).
        layers: the tracked LayerSpecs (feature layout order).
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses.
        batches: re-iterable of training batches (already on the model's device), passed once per product.
        n: training examples in ``batches`` (the mean's denominator).
        matrix: "ggn" or "hessian".
        chunk: columns mapped at once by vmap (None: :data:`CHUNK_ELEMENTS` // p, clamped to [32, 256]: wide
            vmaps amortise the per-call cost on small models, narrow ones bound the memory of large ones).

    Attributes:
        layout: the :class:`ParameterLayout`.
        products: products computed so far (columns × passes over the data).
    """

    def __init__(self, model: nn.Module, layers: Sequence[LayerSpec], loss_fn, batches: Iterable, n: int, *,
                 matrix: str = "ggn", chunk: int | None = None):
        if matrix not in MATRICES:
            raise ValueError(f"matrix must be one of {MATRICES}, got {matrix!r}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be the number of training examples (>= 1), got {n!r}")
        self.model, self.loss_fn, self.batches, self.n, self.matrix = model, loss_fn, batches, n, matrix
        self.layout = ParameterLayout(model, layers)
        self.chunk = chunk if chunk is not None else max(32, min(256, CHUNK_ELEMENTS // self.layout.width))
        param = model.get_parameter(self.layout.names[0])
        self.dtype, self.device = param.dtype, param.device
        self.products = 0

    @property
    def width(self) -> int:
        return self.layout.width

    def _theta(self) -> dict[str, torch.Tensor]:
        return {name: self.model.get_parameter(name).detach() for name in self.layout.names}

    def _product_fn(self, batch: Any, theta: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """(p,) direction -> (p,) summed-loss curvature product on one batch."""
        layout = self.layout
        if self.matrix == "hessian":
            wrapper = _LossSum(self.model, self.loss_fn)

            def loss(params):
                return functional_call(wrapper, {f"model.{k}": v for k, v in params.items()}, (batch,))

            def product(v):
                return layout.vector(jvp(grad(loss), (theta,), (layout.params(v),))[1])
        else:
            def loss(delta):
                return self.loss_fn(_Linearized(self.model, theta, delta), batch).sum()

            zero = {name: torch.zeros_like(t) for name, t in theta.items()}

            def product(v):
                return layout.vector(jvp(grad(loss), (zero,), (layout.params(v),))[1])

        return product

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        """H V for V (p, r) any float dtype -> (p, r) float64 (computed in the model's dtype)."""
        if V.dim() != 2 or V.shape[0] != self.width:
            raise ValueError(f"directions must be (p, r) with p = {self.width}, got {tuple(V.shape)}")
        columns = V.T.to(self.device, self.dtype)
        out = torch.zeros(V.shape[1], self.width, dtype=F64, device=self.device)
        theta = self._theta()
        # the transforms differentiate inside (the untracked weights not); attention on the backend with forward AD
        with _eval(self.model), torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            for batch in self.batches:
                product = vmap(self._product_fn(batch, theta))
                for start in range(0, columns.shape[0], self.chunk):
                    out[start : start + self.chunk] += product(columns[start : start + self.chunk]).to(F64)
        self.products += V.shape[1]
        return (out / self.n).T.to(V.device)


@contextlib.contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
