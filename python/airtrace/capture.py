"""Gradient capture: hooks on layers -> per-example projected (or flattened) weight gradients.

For every tracked layer a forward hook saves the layer input ``A`` (detached) and
registers a hook on the layer output that receives ``G = dLoss/dOutput`` during
the backward pass. The pair is reduced at once to per-example features, so no
``(B, T, d)`` activation outlives the backward:

- *factored* (LoGra, when ``projections`` are given): ``sum_t m_bt (G_bt P_out)^T (A_bt P_in)``
  via :func:`airtrace.ops.project_factored`, ``(B, k_out * k_in)`` per layer;
- *flat* (no projections; small models only): the per-example weight gradient
  ``sum_t m_bt G_bt^T A_bt`` flattened, ``(B, d_out * d_in)`` per layer. Feed the
  blocks to the dense (TRAK) projection as they are:
  ``ops.project_dense(list(cap.collect().values()), k, seed)``.

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

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from airtrace import ops
from airtrace._checks import positive_int
from airtrace.profiling import stage
from airtrace.ref.project import accumulation_dtype

IGNORE_INDEX = -100
LAYER_SEED_STRIDE = 2**20
MAX_SEED = 2**32


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


def _layer_spec(name: str, module: nn.Module, kind: str, bias: bool) -> LayerSpec:
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
    return [_layer_spec(n, m, k, bias) for n, m, k in chosen]


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
            k' = d with P = I_d for a side with d <= k when ``exact_small``.
        exact_small: layer sides no wider than k are kept exact (identity) instead of projected.
    """

    seed: int
    k_in: int
    k_out: int
    layers: tuple[LayerSpec, ...]
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]
    exact_small: bool = False

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.matrices[name]

    def dims(self) -> dict[str, tuple[int, int]]:
        """{layer: (k_out', k_in')}: each layer's feature block shape."""
        return {name: (p_out.shape[1], p_in.shape[1]) for name, (p_in, p_out) in self.matrices.items()}

    def exact_sides(self, name: str) -> tuple[bool, bool]:
        """(input side, output side) of layer ``name`` kept exact (P = I) by ``exact_small``."""
        p_in, p_out = self.matrices[name]
        return self.exact_small and p_in.shape[0] <= self.k_in, self.exact_small and p_out.shape[0] <= self.k_out

    def config(self) -> dict:
        """JSON-able record from which ``from_config`` rebuilds the same matrices."""
        return {
            "kind": "gaussian",
            "recipe": ("torch.Generator().manual_seed(seed * 2**20 + index); float64 randn P_in then P_out, / sqrt(k); "
                       "P = I_d instead for a side with d <= k when exact_small"),
            "torch": torch.__version__,
            "seed": self.seed,
            "k_in": self.k_in,
            "k_out": self.k_out,
            "exact_small": self.exact_small,
            "layers": [asdict(spec) for spec in self.layers],
        }

    @classmethod
    def from_config(
        cls, config: dict, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> Projections:
        """Rebuild the projections recorded by ``config()``."""
        layers = [LayerSpec(**spec) for spec in config["layers"]]
        return make_projections(layers, config["k_in"], config["k_out"], config["seed"],
                                exact_small=config.get("exact_small", False), dtype=dtype, device=device)


def make_projections(
    layers: Sequence[LayerSpec],
    k_in: int,
    k_out: int,
    seed: int,
    *,
    exact_small: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Projections:
    """Deterministic Gaussian projections: P_in ~ N(0, 1/k_in), P_out ~ N(0, 1/k_out).

    Layer ``i`` draws P_in (d_in, k_in) then P_out (d_out, k_out) in float64 from a
    CPU ``torch.Generator`` seeded with ``layer_seed(seed, i)``, then casts to
    ``dtype`` on ``device``: the same values on every device. With ``exact_small``,
    a side with d <= k gets P = I_d instead (its features are the exact gradient
    on that side, d wide: no distortion of inner products or Kronecker factors,
    and no wider than needed); the draws are made all the same, so the other
    side's matrix does not depend on the choice.

    Args:
        layers: LayerSpecs from ``select_layers``.
        k_in: input-side dimension (>= 1).
        k_out: output-side dimension (>= 1).
        seed: 0 <= seed < 2^32.
        exact_small: keep sides with d <= k unprojected.
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
    matrices = {}
    for index, spec in enumerate(layers):
        gen = torch.Generator().manual_seed(layer_seed(seed, index))
        p_in = torch.randn(spec.d_in, k_in, generator=gen, dtype=torch.float64) / math.sqrt(k_in)
        p_out = torch.randn(spec.d_out, k_out, generator=gen, dtype=torch.float64) / math.sqrt(k_out)
        if exact_small and spec.d_in <= k_in:
            p_in = torch.eye(spec.d_in, dtype=torch.float64)
        if exact_small and spec.d_out <= k_out:
            p_out = torch.eye(spec.d_out, dtype=torch.float64)
        matrices[spec.name] = (p_in.to(device, dtype), p_out.to(device, dtype))
    return Projections(seed, k_in, k_out, tuple(layers), matrices, exact_small)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, task: str = "classification") -> torch.Tensor:
    """Per-example losses; ``.sum()`` them before ``backward()`` for the capture.

    Args:
        logits: (B, C) for "classification"; (B, T, V) for "causal_lm".
        labels: (B,) int64 classes; or (B, T) int64 token ids with -100 for
            ignored tokens (prompt, padding), as in Hugging Face causal LMs.
        task: "classification" (cross-entropy) or "causal_lm" (token ``t+1`` is
            predicted from position ``t``; cross-entropy summed over each
            example's non-ignored tokens, not averaged).

    Returns:
        (B,) losses, float32 (float64 for float64 logits).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if task == "classification":
        return F.cross_entropy(logits, labels, reduction="none")
    if task == "causal_lm":
        shifted, targets = logits[:, :-1], labels[:, 1:]
        losses = F.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        return losses.sum(dim=1)
    raise ValueError(f"task must be 'classification' or 'causal_lm', got {task!r}")


def response_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """Causal-LM labels where only response tokens count (instruction tuning).

    Args:
        input_ids: (B, T) int64 prompt+response tokens, right-padded.
        attention_mask: (B, T), 0 at padding.
        prompt_lengths: (B,) number of prompt tokens per example.

    Returns:
        (B, T) int64 copy of ``input_ids`` with -100 on prompt and padding tokens.
    """
    lengths = torch.as_tensor(prompt_lengths, device=input_ids.device)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    ignored = (positions[None, :] < lengths[:, None]) | (attention_mask == 0)
    return input_ids.masked_fill(ignored, IGNORE_INDEX)


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
        backend: ``project_factored`` backend; "auto" uses "torch" for float64.
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
            if _layer_spec(spec.name, modules[spec.name], spec.kind, spec.bias) != spec:
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
        return ops.project_factored(A, G, p_in, p_out, mask, backend=self._backend(dtype))

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
        return ops.project_factored(A, G, eye, p_out, mask, backend=self._backend(G.dtype))

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

    def _backend(self, dtype: torch.dtype) -> str:
        return "torch" if self.backend == "auto" and dtype == torch.float64 else self.backend


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
