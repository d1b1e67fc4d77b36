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
- Bias (``select_layers(..., bias=True)``, the default): ``A`` gets a ones column,
  so ``d_in`` grows by one and the last input column is the bias gradient.
- The loss must be a SUM over examples (e.g. ``per_example_loss(...).sum()``),
  not a mean: then ``G`` of example ``b`` is exactly the gradient of example
  ``b``'s own loss (a Hugging Face model's ``outputs.loss`` is a token mean: do
  not use it). Examples must not interact in the forward pass (use
  ``model.eval()``: no dropout, no batch-norm batch statistics). Batch dim first.
- A module called several times in one forward gets the sum over its calls. A
  weight shared by several selected modules (GPT-2's tied ``wte``/``lm_head``, see
  ``LayerSpec.tied``) is one feature block: every module's gradient of that weight,
  projected with the shared layer's matrices (transposed for a module that stores
  the weight the other way round) and added, i.e. the projected gradient of the weight.
- Broadcast inputs: a layer whose input and output have batch size 1 while the
  batch has B > 1 examples (GPT-2's and BERT's position embeddings of ``position_ids``
  (1, T)) has its output expanded to B before the model broadcasts it, so each
  example gets its own gradient. B is the mask's first dim, else the first dim of
  the first tensor passed to the model. Any other batch size is an error.
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
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from airtrace.capture.layers import LayerSpec, layer_kind, layer_spec, named_modules, unwrap
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


@dataclass(frozen=True)
class _Member:
    """A module whose weight gradient goes into the feature block of ``owner`` (the layer itself, or a tied one)."""

    spec: LayerSpec  # the module's own view (kind, d_in, d_out; no bias for a tied module)
    module: nn.Module
    owner: LayerSpec
    transposed: bool  # the module stores the shared weight the other way round
    matrices: tuple[torch.Tensor, torch.Tensor] | None  # (P_in, P_out) in the module's own orientation
    exact: tuple[bool, bool]  # sides kept exact (P = I): the einsum / scatter shortcut applies


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
        model: the model (batch dim first; in eval mode); a ``torch.compile``'d model is
            hooked through its original module, so run that one.
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
        modules = dict(named_modules(model))
        members = []
        for spec in layers:
            if spec.name not in modules:
                raise ValueError(f"layer {spec.name!r} is not a module of the model")
            module = modules[spec.name]
            if layer_spec(spec.name, module, spec.kind, spec.bias) != replace(spec, tied=()):
                raise ValueError(f"layer {spec.name!r}: {spec} does not match the model's module")
            matrices = exact = None
            if projections is not None:
                self._check_projection(spec, projections)
                matrices, exact = projections[spec.name], projections.exact_sides(spec.name)
            members.append(_Member(spec, module, spec, False, matrices, exact or (False, False)))
            for name, transposed in spec.tied:
                members.append(self._tied_member(spec, module, modules, name, transposed, matrices))
        self.layers, self.projections, self.backend = list(layers), projections, backend
        self._model = unwrap(model)
        self._members = members
        self._handles: list = []
        self._features: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._batch_size: int | None = None
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

    @staticmethod
    def _tied_member(spec: LayerSpec, module: nn.Module, modules: dict, name: str, transposed: bool,
                     matrices: tuple[torch.Tensor, torch.Tensor] | None) -> _Member:
        """The module ``name`` that shares ``spec``'s weight, with the layer's matrices seen from its side:
        the bias row dropped, and P_in / P_out swapped when it stores the weight transposed."""
        other = modules.get(name)
        if other is None or getattr(other, "weight", None) is not module.weight:
            raise ValueError(f"layer {spec.name!r}: tied module {name!r} does not share its weight")
        own = layer_spec(name, other, layer_kind(other), False)
        if matrices is not None:
            p_in, p_out = matrices
            p_in = p_in[: spec.d_in - spec.bias]
            matrices = (p_out, p_in) if transposed else (p_in, p_out)
        return _Member(own, other, spec, transposed, matrices, (False, False))

    def __enter__(self) -> GradientCapture:
        self._handles.append(self._model.register_forward_pre_hook(self._note_batch_size, with_kwargs=True))
        for member in self._members:
            hook = self._forward_hook(member)
            self._handles.append(member.module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Token mask (B, T) for the following forward passes (None: all tokens count)."""
        self._mask = mask

    def _note_batch_size(self, module, args, kwargs) -> None:
        """Batch size of a model call: the first dim of its first tensor argument."""
        self._batch_size = next((v.shape[0] for v in (*args, *kwargs.values())
                                 if isinstance(v, torch.Tensor) and v.dim() >= 1), None)

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
            a module (and of the modules tied to it) are concatenated along T.

        Raises:
            ValueError: ``keep_tokens`` is off, or a layer was never reached by backward.
        """
        return self.concatenated(self.token_parts())

    @staticmethod
    def concatenated(tokens: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """:meth:`token_parts` as :meth:`collect_tokens` returns them: each layer's calls concatenated along T."""
        acts = {name: torch.cat([a for a, _ in parts], dim=1) for name, parts in tokens.items()}
        grads = {name: torch.cat([g for _, g in parts], dim=1) for name, parts in tokens.items()}
        return acts, grads

    def token_parts(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Like :meth:`collect_tokens`, one ``(a, g)`` pair per call of a module, not concatenated:
        name -> [(a (B, T_call, k_in), g (B, T_call, k_out)), ...] in call order; the token-level
        features of call ``c`` are ``g[b, t] ⊗ a[b, t]``, summing to the layer's features."""
        if not self.keep_tokens:
            raise ValueError("collect_tokens() needs GradientCapture(..., keep_tokens=True)")
        tokens, self._tokens = self._tokens, {}
        missing = [spec.name for spec in self.layers if spec.name not in tokens]
        if missing:
            raise ValueError(f"layers {missing} captured no tokens: not called in the forward pass or no gradient")
        return {spec.name: tokens[spec.name] for spec in self.layers}

    def _forward_hook(self, member: _Member):
        name = member.spec.name

        def hook(module, args, kwargs, output):
            if not torch.is_grad_enabled():
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                raise ValueError(
                    f"layer {name!r}: its output does not require grad, so dLoss/dOutput cannot be captured"
                    " (set requires_grad on its weight or input)"
                )
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            batch = self._mask.shape[0] if self._mask is not None else self._batch_size
            expanded = batch is not None and batch > 1 and output.dim() >= 1 and output.shape[0] == 1 == x.shape[0]
            if expanded:  # one row broadcast over the batch (position embeddings): one gradient per example
                output, x = output.expand(batch, *output.shape[1:]), x.expand(batch, *x.shape[1:])
            elif batch is not None and output.dim() >= 1 and output.shape[0] != batch:
                raise ValueError(
                    f"layer {name!r}: its output has {output.shape[0]} rows in its first dimension but the batch "
                    f"has {batch} examples (reshaped or pooled across examples?), so its per-example gradients "
                    "cannot be captured; exclude it"
                )
            output.register_hook(self._grad_hook(member, [x, self._mask]))
            self._outputs.append(output)
            return output if expanded else None

        return hook

    def _grad_hook(self, member: _Member, saved: list):
        """Reduce on the first backward, then drop the saved input (the output may outlive the graph)."""

        def on_grad(grad: torch.Tensor) -> None:
            if not saved:
                raise ValueError(
                    f"layer {member.spec.name!r}: a second backward through one forward pass is not supported;"
                    " run the forward again"
                )
            x, mask = saved
            saved.clear()
            with stage("project", rows=x.shape[0]):
                feats = self._reduce(member, x, grad, mask)
                if member.transposed:
                    feats = feats.transpose(1, 2)
                if member.matrices is None and member.owner.bias and member.spec is not member.owner:
                    feats = F.pad(feats, (0, 1))  # flat gradient of a tied module: no bias column
                feats = feats.reshape(x.shape[0], -1)
            owner = member.owner.name
            prev = self._features.get(owner)
            self._features[owner] = feats if prev is None else prev + feats

        return on_grad

    def _reduce(self, member: _Member, x: torch.Tensor, grad: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """(A, G) of one call -> (B, k_out, k_in) or (B, d_out, d_in), in the module's own orientation."""
        spec, module = member.spec, member.module
        if spec.kind == "conv2d":
            A, G, mask = _conv_inputs(module, x), grad.flatten(2).transpose(1, 2), None
        else:
            G = _tokens(grad, spec.d_out)
            mask = _token_mask(spec, mask, x)
            if spec.kind == "embedding":
                return self._reduce_embedding(member, x.reshape(G.shape[:2]), G, mask)
            A = _tokens(x, spec.d_in - spec.bias)
        if spec.bias:
            A = _with_ones(A)
        dtype = torch.promote_types(A.dtype, G.dtype)
        A, G = A.to(dtype), G.to(dtype)
        flat = member.matrices is None
        if not flat:
            p_in, p_out = member.matrices
            exact_in, exact_out = member.exact
            flat = exact_in and exact_out  # P_in = I and P_out = I: no product with an identity
            if self.keep_tokens:
                acc = accumulation_dtype(dtype)
                self._keep(member, A.to(acc) if exact_in else A.to(acc) @ p_in.to(A.device, acc), G,
                           None if exact_out else p_out, mask)
        if flat:
            return torch.einsum("bto,bti->boi", _masked(G, mask), A.to(accumulation_dtype(dtype)))
        return project_factored(A, G, p_in, p_out, mask, backend=self.backend)

    def _reduce_embedding(self, member: _Member, ids: torch.Tensor, G: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:
        """One-hot inputs ids (B, T): A P_in = P_in[ids]; the flat gradient scatters rows of G into (d, V)."""
        spec, module = member.spec, member.module
        if module.padding_idx is not None:
            keep = ids != module.padding_idx
            mask = keep if mask is None else mask * keep
        exact_in, exact_out = member.exact
        if member.matrices is not None:
            p_in, p_out = member.matrices
            if self.keep_tokens:
                self._keep(member, p_in.to(G.device, accumulation_dtype(G.dtype))[ids], G,
                           None if exact_out else p_out, mask)
        if member.matrices is None or (exact_in and exact_out):
            G = _masked(G, mask)
            B, T, d = G.shape
            rows = G.new_zeros(B, spec.d_in, d).scatter_add_(1, ids[:, :, None].expand(B, T, d), G)
            return rows.transpose(1, 2)
        A = p_in.to(G.device)[ids].to(G.dtype)
        eye = torch.eye(p_in.shape[1], dtype=accumulation_dtype(G.dtype), device=G.device)
        return project_factored(A, G, eye, p_out, mask, backend=self.backend)

    def _keep(
        self, member: _Member, a: torch.Tensor, G: torch.Tensor, p_out: torch.Tensor | None,
        mask: torch.Tensor | None
    ) -> None:
        """Keep projected tokens a (B, T, k_in) and m G P_out (B, T, k_out) (m G for an exact side, ``p_out``
        None) under the owning layer, swapped for a module that stores the weight transposed; masked tokens
        zeroed in both."""
        g = _masked(G, mask)
        if p_out is not None:
            g = g @ p_out.to(G.device, accumulation_dtype(G.dtype))
        if mask is not None:
            a = a * (mask != 0).to(a.dtype)[:, :, None]
        self._tokens.setdefault(member.owner.name, []).append((g, a) if member.transposed else (a, g))


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
