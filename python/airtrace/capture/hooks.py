"""Gradient capture (``GradientCapture``): hooks on layers -> per-example projected (or flattened) weight gradients;
imports the kernels layer, ``airtrace.profiling`` and the other capture modules.

For every tracked layer a forward hook saves the layer input ``A`` (detached) and
registers a hook on the layer output that receives ``G = dLoss/dOutput`` during
the backward pass. The pair is reduced at once to per-example features, so no
``(B, T, d)`` activation outlives the backward:

- *factored* (LoGra, when ``projections`` are given): ``sum_t m_bt (G_bt P_out)^T (A_bt P_in)``
  via :func:`airtrace.ops.project_factored.project_factored`, ``(B, k_out * k_in)`` per layer;
- *flat* (no projections; small models only): the per-example weight gradient
  ``sum_t m_bt G_bt^T A_bt`` flattened, ``(B, d_out * d_in)`` per layer. Feed the
  blocks to the dense (TRAK) projection as they are:
  ``project_dense(list(cap.collect().values()), k, seed)``.

Conventions:

- Every layer is treated as a linear map ``out = A W^T`` with an (d_out, d_in)
  weight; features are that matrix's gradient, projected or flattened row-major.
  This is ``weight.grad`` itself for nn.Linear and nn.Conv2d (``d_in = C_in*kh*kw``),
  and ``weight.grad.T`` for transformers' Conv1D (weight stored (d_in, d_out)) and
  for nn.Embedding (a one-hot map: ``d_in = num_embeddings``, ``A P_in = P_in[ids]``;
  no one-hot tensor is built).
- Bias (``select_layers(..., bias=True)``, default off): ``A`` gets a ones column,
  so ``d_in`` grows by one and the last input column is the bias gradient.
- The loss must be a SUM over examples (e.g. ``per_example_loss(...).sum()``),
  not a mean: then ``G`` of example ``b`` is exactly the gradient of example
  ``b``'s own loss (a Hugging Face model's ``outputs.loss`` is a token mean: do
  not use it). Examples must not interact in the forward pass (use
  ``model.eval()``: no dropout, no batch-norm batch statistics). Batch dim first.
- A module called several times in one forward gets the sum over its calls. A
  weight shared by two modules (e.g. GPT-2's tied ``wte``/``lm_head``) gets one
  feature block per selected module, each the gradient through that module only.
- Padding: ``set_mask`` takes a (B, T) attention mask; padding tokens contribute 0
  to the token sum of layers whose input is (B, T, d). Layers with (B, d) inputs
  and nn.Conv2d ignore it. Embedding tokens equal to ``padding_idx`` contribute 0,
  as in PyTorch's own gradient.
- Token-level projections (``keep_tokens=True``, factored mode only): for K-FAC
  factors, ``collect_tokens`` also returns every layer's projected tokens
  ``a = A P_in`` (B, T, k_in) and ``g = m G P_out`` (B, T, k_out), with masked
  tokens zeroed in both; T is the layer's token count (1 for (B, d) inputs, the
  patch count for nn.Conv2d), concatenated over the calls of a module.
- Precision: A and G are cast to their common dtype; features accumulate and
  are returned in float32 (float64 for float64 models, computed on the "torch"
  backend). Bias augmentation and nn.Conv2d's unfold make one temporary copy of
  A per layer call, freed right after the reduction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from airtrace.capture.layers import LayerSpec, layer_spec
from airtrace.capture.projections import Projections
from airtrace.ops.backends import accumulation_dtype
from airtrace.ops.project_factored import project_factored
from airtrace.profiling import stage


def _tokens(x: torch.Tensor, d: int) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d) with T the product of the middle dims (1 for (B, d))."""
    return x.reshape(x.shape[0], -1, d)


def _conv_inputs(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded patches (B, L, C_in*kh*kw) matching ``weight.view(C_out, -1)``."""
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x, padding = F.pad(x, module._reversed_padding_repeated_twice, mode=mode), 0
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2)


def _with_ones(A: torch.Tensor) -> torch.Tensor:
    """(B, T, d) -> (B, T, d + 1) with a ones column (bias gradient)."""
    return torch.cat([A, A.new_ones(*A.shape[:-1], 1)], dim=-1)


class GradientCapture:
    """Context manager that turns one batched forward/backward into per-example features.

    Example::

        layers = select_layers(model, "*.mlp.*")
        proj = make_projections(layers, k_in=16, k_out=16, seed=0)
        with GradientCapture(model, layers, proj) as cap:
            cap.set_mask(batch["attention_mask"])
            per_example_loss(model(**inputs).logits, labels, "causal_lm").sum().backward()
            features = cap.collect()  # name -> (B, 16 * 16)

    Args:
        model: the model (batch dim first; in eval mode).
        layers: LayerSpecs from ``select_layers``.
        projections: per-layer (P_in, P_out) for the factored mode; None gives the
            flat per-example gradients (B, d_out * d_in).
        backend: ``project_factored`` backend ("auto" runs float64 on "torch").
        keep_tokens: also keep the projected tokens a, g of every layer for
            ``collect_tokens`` (K-FAC factors); needs ``projections``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerSpec],
        projections: Projections | None = None,
        *,
        backend: str = "auto",
        keep_tokens: bool = False,
    ):
        if keep_tokens and projections is None:
            raise ValueError("keep_tokens=True needs projections: token-level a, g are projected tokens")
        modules = dict(model.named_modules())
        for spec in layers:
            if spec.name not in modules:
                raise ValueError(f"layer {spec.name!r} is not a module of the model")
            if layer_spec(spec.name, modules[spec.name], spec.kind, spec.bias) != spec:
                raise ValueError(f"layer {spec.name!r}: {spec} does not match the model's module")
            if projections is not None:
                self._check_projection(spec, projections)
        self.layers, self.projections, self.backend = list(layers), projections, backend
        self._modules = {spec.name: modules[spec.name] for spec in layers}
        self._handles: list = []
        self._features: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self.keep_tokens = keep_tokens
        self._tokens: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._outputs: list[torch.Tensor] = []

    @staticmethod
    def _check_projection(spec: LayerSpec, projections: Projections) -> None:
        if spec.name not in projections.matrices:
            raise ValueError(f"layer {spec.name!r} has no projection; build them with make_projections(layers, ...)")
        p_in, p_out = projections[spec.name]
        if p_in.shape[0] != spec.d_in or p_out.shape[0] != spec.d_out:
            raise ValueError(
                f"layer {spec.name!r}: projections P_in {tuple(p_in.shape)}, P_out {tuple(p_out.shape)}"
                f" do not fit d_in={spec.d_in}, d_out={spec.d_out}"
            )

    def __enter__(self) -> GradientCapture:
        for spec in self.layers:
            hook = self._forward_hook(spec)
            self._handles.append(self._modules[spec.name].register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Token mask (B, T) for the following forward passes (None: all tokens count)."""
        self._mask = mask

    def take_outputs(self) -> list[torch.Tensor]:
        """The tracked layers' outputs since the last call, then cleared.

        ``torch.autograd.grad(loss, cap.take_outputs())`` runs exactly the backward
        the capture needs: dLoss/dOutput of every tracked layer, never the weight
        gradients that the features replace.
        """
        outputs, self._outputs = self._outputs, []
        return outputs

    def collect(self) -> dict[str, torch.Tensor]:
        """Features accumulated since the last ``collect``, then cleared.

        Returns:
            name -> (B, k_out * k_in) (factored) or (B, d_out * d_in) (flat),
            float32 (float64 for float64 models), in layer order.

        Raises:
            ValueError: a layer's features are not finite (NaN/Inf in its inputs
                or output gradients), or a layer was never reached by backward.
        """
        features, self._features = self._features, {}
        for spec in self.layers:
            if spec.name not in features:
                raise ValueError(
                    f"layer {spec.name!r} captured nothing: it was not called in the forward pass, or no gradient"
                    " reached its output (e.g. nn.MultiheadAttention uses out_proj.weight directly); exclude it"
                )
            if not torch.isfinite(features[spec.name]).all():
                raise ValueError(f"layer {spec.name!r}: non-finite (NaN/Inf) values in its inputs or output gradients")
        return {spec.name: features[spec.name] for spec in self.layers}

    def collect_tokens(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Projected tokens kept since the last ``collect_tokens`` (``keep_tokens=True``), then cleared.

        Returns:
            (activations, gradients): name -> a = A P_in (B, T, k_in) and
            name -> g = m G P_out (B, T, k_out), masked tokens zero in both,
            float32 (float64 for float64 models), in layer order; the calls of
            a module are concatenated along T.

        Raises:
            ValueError: ``keep_tokens`` is off, or a layer was never reached by backward.
        """
        if not self.keep_tokens:
            raise ValueError("collect_tokens() needs GradientCapture(..., keep_tokens=True)")
        tokens, self._tokens = self._tokens, {}
        missing = [spec.name for spec in self.layers if spec.name not in tokens]
        if missing:
            raise ValueError(f"layers {missing} captured no tokens: not called in the forward pass or no gradient")
        acts = {spec.name: torch.cat([a for a, _ in tokens[spec.name]], dim=1) for spec in self.layers}
        grads = {spec.name: torch.cat([g for _, g in tokens[spec.name]], dim=1) for spec in self.layers}
        return acts, grads

    def _forward_hook(self, spec: LayerSpec):
        def hook(module, args, kwargs, output):
            if not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                raise ValueError(
                    f"layer {spec.name!r}: its output does not require grad, so dLoss/dOutput cannot be captured"
                    " (set requires_grad on its weight or input)"
                )
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            output.register_hook(self._grad_hook(spec, [x, self._mask]))
            self._outputs.append(output)

        return hook

    def _grad_hook(self, spec: LayerSpec, saved: list):
        """Reduce on the first backward, then drop the saved input (the output may outlive the graph)."""

        def on_grad(grad: torch.Tensor) -> None:
            if not saved:
                raise ValueError(
                    f"layer {spec.name!r}: a second backward through one forward pass is not supported;"
                    " run the forward again"
                )
            x, mask = saved
            saved.clear()
            with stage("project"):
                feats = self._reduce(spec, x, grad, mask).reshape(x.shape[0], -1)
            prev = self._features.get(spec.name)
            self._features[spec.name] = feats if prev is None else prev + feats

        return on_grad

    def _reduce(self, spec: LayerSpec, x: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(A, G) of one call -> (B, k_out, k_in) or (B, d_out, d_in)."""
        module = self._modules[spec.name]
        if spec.kind == "conv2d":
            A, G, mask = _conv_inputs(module, x), grad.flatten(2).transpose(1, 2), None
        else:
            G = _tokens(grad, spec.d_out)
            mask = _token_mask(spec, mask, x)
            if spec.kind == "embedding":
                return self._reduce_embedding(spec, module, x.reshape(G.shape[:2]), G, mask)
            A = _tokens(x, spec.d_in - spec.bias)
        if spec.bias:
            A = _with_ones(A)
        dtype = torch.promote_types(A.dtype, G.dtype)
        A, G = A.to(dtype), G.to(dtype)
        flat = self.projections is None
        if not flat:
            p_in, p_out = self.projections[spec.name]
            exact_in, exact_out = self.projections.exact_sides(spec.name)
            flat = exact_in and exact_out  # P_in = I and P_out = I: no product with an identity
            if self.keep_tokens:
                acc = accumulation_dtype(dtype)
                self._keep(spec, A.to(acc) if exact_in else A.to(acc) @ p_in.to(A.device, acc), G,
                           None if exact_out else p_out, mask)
        if flat:
            return torch.einsum("bto,bti->boi", _masked(G, mask), A.to(accumulation_dtype(dtype)))
        return project_factored(A, G, p_in, p_out, mask, backend=self.backend)

    def _reduce_embedding(
        self, spec: LayerSpec, module: nn.Embedding, ids: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One-hot inputs ids (B, T): A P_in = P_in[ids]; the flat gradient scatters rows of G into (d, V)."""
        if module.padding_idx is not None:
            keep = ids != module.padding_idx
            mask = keep if mask is None else mask * keep
        exact_in = exact_out = False
        if self.projections is not None:
            p_in, p_out = self.projections[spec.name]
            exact_in, exact_out = self.projections.exact_sides(spec.name)
            if self.keep_tokens:
                self._keep(spec, p_in.to(G.device, accumulation_dtype(G.dtype))[ids], G,
                           None if exact_out else p_out, mask)
        if self.projections is None or (exact_in and exact_out):
            G = _masked(G, mask)
            B, T, d = G.shape
            rows = G.new_zeros(B, spec.d_in, d).scatter_add_(1, ids[:, :, None].expand(B, T, d), G)
            return rows.transpose(1, 2)
        A = p_in.to(G.device)[ids].to(G.dtype)
        eye = torch.eye(p_in.shape[1], dtype=accumulation_dtype(G.dtype), device=G.device)
        return project_factored(A, G, eye, p_out, mask, backend=self.backend)

    def _keep(
        self, spec: LayerSpec, a: torch.Tensor, G: torch.Tensor, p_out: torch.Tensor | None, mask: torch.Tensor | None
    ) -> None:
        """Keep projected tokens a (B, T, k_in) and m G P_out (B, T, k_out) (m G for an exact side, ``p_out``
        None); masked tokens zeroed in both."""
        g = _masked(G, mask)
        if p_out is not None:
            g = g @ p_out.to(G.device, accumulation_dtype(G.dtype))
        if mask is not None:
            a = a * (mask != 0).to(a.dtype)[:, :, None]
        self._tokens.setdefault(spec.name, []).append((a, g))


def _masked(G: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """G (B, T, d) in its accumulation dtype, times the (B, T) mask if any."""
    G = G.to(accumulation_dtype(G.dtype))
    return G if mask is None else G * mask.to(G.dtype)[:, :, None]


def _token_mask(spec: LayerSpec, mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The (B, T) mask for a layer whose input is (B, T, d) (ids (B, T) for embeddings).

    None without a mask or for one-token inputs (B, d) / ids (B,).
    """
    one_token_dims = 1 if spec.kind == "embedding" else 2
    if mask is None or x.dim() == one_token_dims:
        return None
    if x.dim() != one_token_dims + 1 or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"layer {spec.name!r}: mask of shape {tuple(mask.shape)} does not fit its input of shape"
            f" {tuple(x.shape)}; the mask applies to (B, T, d) inputs (set_mask(None) to drop it)"
        )
    return mask.to(x.device)
